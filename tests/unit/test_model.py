"""The model layer on the offline-built checkpoints: save/load round trip, batched generation, embeddings."""

import numpy as np
import pytest
from PIL import Image

from meddr_ray.config import GenerationConfig, ModelBuildConfig, ModelConfig
from meddr_ray.model import ModelNotFoundError, apply_lora, build_tiny, load_model, trainable_parameters


def _images(n, size=28, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).convert("RGB") for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny(path, ModelBuildConfig(vision_hidden_size=96))
    return load_model(ModelConfig(name="tiny", path=str(path)))


def test_tiny_round_trips_through_save_and_load(tiny):
    assert (tiny.path / "config.json").is_file()
    assert (tiny.path / "tokenizer.json").is_file() or (tiny.path / "tokenizer_config.json").is_file()
    again = load_model(ModelConfig(name="tiny", path=str(tiny.path)))
    imgs = _images(2)
    np.testing.assert_allclose(again.embed(imgs), tiny.embed(imgs), atol=1e-6)


def test_generate_is_batched_and_padding_does_not_change_results(tiny):
    imgs = _images(3)
    prompts = ["short", "a much longer instruction that forces left padding of the others", "mid length one"]
    gen = GenerationConfig(max_new_tokens=6)
    batched = tiny.generate(imgs, prompts, gen)
    single = [tiny.generate([i], [p], gen)[0] for i, p in zip(imgs, prompts)]
    assert [b["text"] for b in batched] == [s["text"] for s in single]
    assert all(0 < b["tokens"] <= 6 for b in batched)


def test_response_prefix_is_part_of_the_text(tiny):
    out = tiny.generate(_images(1), ["x"], GenerationConfig(max_new_tokens=3, response_prefix="Findings:"))
    assert out[0]["text"].startswith("Findings:")


def test_embed_returns_unit_vectors_of_the_configured_dimension(tiny):
    emb = tiny.embed(_images(5))
    assert emb.shape == (5, 96) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert tiny.embed_dim == 96
    same = tiny.embed(_images(1, seed=0))[0]
    assert float(emb[0] @ same) == pytest.approx(1.0, abs=1e-5)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nowhere")):
        load_model(ModelConfig(name="x", path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(ModelConfig(name="x", path=str(tmp_path / "empty")))


def test_lora_wraps_only_the_language_model(tiny):
    from meddr_ray.config import LoraConfig
    from meddr_ray.model import build_tiny as _  # noqa: F401  (same model family)

    model = load_model(ModelConfig(name="tiny", path=str(tiny.path))).model
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)
    trainable, total, share = trainable_parameters(peft_model)
    assert 0 < trainable < total and 0 < share < 100


@pytest.mark.slow
def test_smol_builds_from_the_packaged_gguf_and_writes_english(tmp_path):
    from meddr_ray.model import build_smol, smol_gguf_path

    try:
        smol_gguf_path()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    opts = ModelBuildConfig(image_size=32, patch_size=16, vision_hidden_size=64, vision_layers=1)
    path = build_smol(tmp_path / "smol", opts)
    vlm = load_model(ModelConfig(name="smol", path=str(path)))
    out = vlm.generate(
        _images(2),
        ["What is the capital of France? Answer in one word.", "Say hello."],
        GenerationConfig(max_new_tokens=12, repetition_penalty=1.2),
    )
    assert "paris" in out[0]["text"].lower()
    assert vlm.embed(_images(2)).shape == (2, 64)


def test_encode_images_gives_the_embed_keys_from_one_tower_pass(tiny):
    imgs = _images(4, seed=3)
    enc = tiny.encode_images(imgs)
    assert len(enc) == 4 and enc.features is not None  # the tiny LLaVA takes pre-encoded images
    np.testing.assert_allclose(enc.keys, tiny.embed(imgs), atol=1e-6)


def test_generate_from_an_encoding_equals_generate_from_the_images(tiny, monkeypatch):
    imgs = _images(3, seed=4)
    prompts = ["describe", "a longer instruction so that the others are padded on the left", "diagnose"]
    gen = GenerationConfig(max_new_tokens=6)
    from_images = tiny.generate(imgs, prompts, gen)
    enc = tiny.encode_images(imgs)

    from meddr_ray.model.loading import vision_tower

    calls = []
    tower = vision_tower(tiny.model)
    monkeypatch.setattr(tower, "forward", lambda *a, **k: calls.append(1) or pytest.fail("tower ran again"))
    from_encoding = tiny.generate(None, prompts, gen, encoding=enc)
    assert [r["text"] for r in from_encoding] == [r["text"] for r in from_images] and not calls
    # one image answered with two prompts (retrieval off and on) reuses its row of the encoding
    twice = tiny.generate(None, [prompts[1], prompts[1]], gen, encoding=enc.select([1, 1]))
    assert twice[0]["text"] == twice[1]["text"] == from_images[1]["text"]


def test_encodings_select_and_concat_in_order(tiny):
    from meddr_ray.model import ImageEncoding

    a, b = tiny.encode_images(_images(2, seed=5)), tiny.encode_images(_images(1, seed=6))
    both = ImageEncoding.concat([a, b])
    assert len(both) == 3
    np.testing.assert_array_equal(both.select([2]).keys, b.keys)
    np.testing.assert_array_equal(both.select([1, 0]).keys, a.keys[[1, 0]])
    with pytest.raises(ValueError, match="either images or their encoding"):
        tiny.generate(_images(1), ["x"], GenerationConfig(max_new_tokens=2), encoding=b)


# -------------------------------------------------------------- checkpoints that differ from the tiny build


def test_a_list_of_end_of_sequence_ids_stops_and_is_stripped(tiny, monkeypatch):
    """Some checkpoints name several end tokens (generation_config.eos_token_id a list)."""
    gen = GenerationConfig(max_new_tokens=6)
    expected = tiny.generate(_images(2), ["a", "b"], gen)
    tok = tiny.processor.tokenizer
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", [tok.eos_token_id, tok.pad_token_id])
    assert tiny.generate(_images(2), ["a", "b"], gen) == expected


def test_a_model_that_returns_only_the_new_tokens_gives_the_same_answers(tiny, monkeypatch):
    gen = GenerationConfig(max_new_tokens=6)
    expected = tiny.generate(_images(2), ["a", "a much longer prompt"], gen)
    original = tiny.model.generate

    def new_tokens_only(**kwargs):
        out = original(**kwargs)
        return out[:, kwargs["input_ids"].shape[1]:]

    monkeypatch.setattr(tiny.model, "generate", new_tokens_only)
    assert tiny.generate(_images(2), ["a", "a much longer prompt"], gen) == expected


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_token(tmp_path):
    from transformers import AutoProcessor

    path = tmp_path / "nopad"
    build_tiny(path, ModelBuildConfig(vision_hidden_size=96))
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.pad_token = None
    processor.save_pretrained(path)
    assert AutoProcessor.from_pretrained(path).tokenizer.pad_token is None
    model = load_model(ModelConfig(name="nopad", path=str(path)))
    assert model.processor.tokenizer.pad_token == model.processor.tokenizer.eos_token
    prompts = ["short", "a much longer instruction that forces left padding"]
    batched = model.generate(_images(2), prompts, GenerationConfig(max_new_tokens=5))
    single = [model.generate([i], [p], GenerationConfig(max_new_tokens=5))[0] for i, p in zip(_images(2), prompts)]
    assert batched == single
