"""Native InternVL (the paper preset's checkpoint format) through the model layer, on the tiny offline build:
its processor without torchvision, tiled images, one vision pass for keys and generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from meddr_ray.config import GenerationConfig, ModelBuildConfig, ModelConfig
from meddr_ray.model import build_tiny, load_model, vision_tower
from meddr_ray.model.internvl import ImageOnlyInternVLProcessor


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp("models") / "internvl", ModelBuildConfig(architecture="internvl"))
    return load_model(ModelConfig(name="tiny-internvl", path=str(path)))


def _images():
    rng = np.random.default_rng(7)
    # square (one tile), wide (3 tiles + thumbnail), tall (2 + thumbnail)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(28, 28), (28, 90), (64, 32)]]


def test_the_build_is_a_native_internvl_checkpoint(internvl):
    from transformers import InternVLForConditionalGeneration

    config = json.loads((internvl.path / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["text_config"]["model_type"] == "qwen2"
    assert json.loads((internvl.path / "processor_config.json").read_text())["processor_class"] == "InternVLProcessor"
    assert isinstance(internvl.model, InternVLForConditionalGeneration)
    assert isinstance(internvl.processor, ImageOnlyInternVLProcessor)
    assert internvl.chat_prompt("hi").startswith("<|im_start|>user\n<IMG_CONTEXT>\nhi")


def test_bad_build_options_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="architecture"):
        build_tiny(tmp_path / "x", ModelBuildConfig(architecture="qwen"))
    with pytest.raises(ValueError, match="vision_tower"):
        build_tiny(tmp_path / "y", ModelBuildConfig(architecture="internvl", vision_tower="efficientnet_lite0"))


def test_a_tiled_images_key_pools_every_tile(internvl):
    images = _images()
    keys = internvl.embed(images)
    assert keys.shape == (3, internvl.embed_dim)
    tower = vision_tower(internvl.model)
    pixels = internvl.processor.image_processor(images=[images[1]], crop_to_patches=True, return_tensors="pt")
    assert pixels["pixel_values"].shape[0] == 4  # 3 tiles + a thumbnail
    with torch.no_grad():
        hidden = tower(pixel_values=pixels["pixel_values"]).last_hidden_state
    manual = torch.nn.functional.normalize(hidden.reshape(-1, hidden.shape[-1]).mean(0), dim=0).numpy()
    np.testing.assert_allclose(keys[1], manual, atol=1e-5)


def test_generate_from_one_encoding_equals_generate_from_the_images(internvl, monkeypatch):
    images = _images()
    prompts = ["describe", "a longer instruction so that the others are padded on the left", "diagnose"]
    gen = GenerationConfig(max_new_tokens=5)
    from_images = internvl.generate(images, prompts, gen)
    encoding = internvl.encode_images(images)
    assert encoding.features is not None and [f.shape[0] for f in encoding.features] == [4, 16, 12]
    np.testing.assert_allclose(encoding.keys, internvl.embed(images), atol=1e-6)
    tower = vision_tower(internvl.model)
    monkeypatch.setattr(tower, "forward", lambda *a, **k: pytest.fail("tower ran again"))
    from_encoding = internvl.generate(None, prompts, gen, encoding=encoding)
    assert [r["text"] for r in from_encoding] == [r["text"] for r in from_images]
    assert all(r["tokens"] > 0 for r in from_images)
