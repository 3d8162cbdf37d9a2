"""The index encoder loads only the vision tower: its keys and fingerprint are the full model's, and
the language model's weights are never read."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from meddr_ray.config import DataConfig, LoraConfig, ModelBuildConfig, ModelConfig
from meddr_ray.stages.index.encoder import Encoder
from meddr_ray.model import apply_lora, build_tiny, load_model, vision_tower
from meddr_ray.model.vision_encoder import VisionEncoder, load_vision_encoder

ARCHITECTURES = ["llava", "internvl"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    # one square MedMNIST-sized image and wider ones: InternVL cuts those into several tiles + a thumbnail
    sizes = [(28, 28), (28, 90), (40, 64)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / request.param
    build_tiny(path, ModelBuildConfig(architecture=request.param))
    return ModelConfig(name=f"tiny-{request.param}", path=str(path))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_index_encoder_holds_the_vision_tower_and_nothing_else(checkpoint):
    full = load_model(checkpoint)
    encoder = Encoder(checkpoint, None, DataConfig()).model
    assert isinstance(encoder, VisionEncoder)
    assert _count(encoder.tower) == _count(vision_tower(full.model)) < _count(full.model)
    assert encoder.embed_dim == full.embed_dim


def test_keys_and_fingerprint_equal_the_full_models(checkpoint):
    full = load_model(checkpoint)
    encoder = load_vision_encoder(checkpoint)
    images = _images(5)
    np.testing.assert_allclose(encoder.embed(images), full.embed(images), atol=1e-6)
    assert encoder.encoder_fingerprint() == full.encoder_fingerprint()
    np.testing.assert_allclose(full.encode_images(images).keys, full.embed(images), atol=1e-6)


def test_the_language_model_weights_are_never_read(checkpoint, tmp_path):
    """A copy of the checkpoint whose file holds only the vision tower's tensors still gives the same encoder."""
    copy = tmp_path / "tower-only"
    shutil.copytree(checkpoint.path, copy)
    weights = load_file(copy / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "vision_tower" in k}
    assert 0 < len(kept) < len(weights)
    save_file(kept, copy / "model.safetensors", metadata={"format": "pt"})
    encoder = load_vision_encoder(ModelConfig(name="copy", path=str(copy)))
    assert isinstance(encoder, VisionEncoder)
    assert encoder.encoder_fingerprint() == load_vision_encoder(checkpoint).encoder_fingerprint()


def test_a_language_model_adapter_is_not_loaded_and_does_not_change_the_keys(checkpoint, tmp_path):
    base = load_model(checkpoint)
    peft_model = apply_lora(base.model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # a trained adapter: non-zero B, so merging changes the language model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    with_adapter = load_model(checkpoint, str(tmp_path / "adapter"))
    encoder = load_vision_encoder(checkpoint, str(tmp_path / "adapter"))
    assert isinstance(encoder, VisionEncoder)
    assert encoder.encoder_fingerprint() == with_adapter.encoder_fingerprint()
    images = _images(3)
    np.testing.assert_allclose(encoder.embed(images), with_adapter.embed(images), atol=1e-6)


def test_an_adapter_that_trained_the_tower_gives_the_adapted_towers_keys(checkpoint, tmp_path):
    base = load_model(checkpoint)
    peft_model = apply_lora(base.model, LoraConfig(r=4, alpha=8, train_vision_tower=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name and "vision_tower" in name:
                p.add_(0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    with_adapter = load_model(checkpoint, str(tmp_path / "adapter"))
    encoder = load_vision_encoder(checkpoint, str(tmp_path / "adapter"))
    assert encoder.encoder_fingerprint() == with_adapter.encoder_fingerprint() != load_model(checkpoint).encoder_fingerprint()
    images = _images(2)
    np.testing.assert_allclose(encoder.embed(images), with_adapter.embed(images), atol=1e-6)


def test_lora_never_reaches_the_vision_tower(checkpoint):
    model = load_model(checkpoint).model
    # bare names that the vision tower's layers also carry (InternViT: q_proj/k_proj/v_proj; SigLIP: fc1/fc2)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "fc1"]))
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all("language_model" in n and "vision_tower" not in n for n in adapted)
