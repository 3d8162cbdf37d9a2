"""Placing a checkpoint's weights on the GPUs an actor holds: a pure decision, tested without GPUs."""

from __future__ import annotations

import pytest

from meddr_ray.config import ModelBuildConfig
from meddr_ray.model.build import build_tiny
from meddr_ray.model.placement import (
    GIB,
    ModelPlacementError,
    checkpoint_bytes,
    kv_cache_bytes,
    placement_for_checkpoint,
    plan_placement,
    text_kv_cache_bytes,
)

GPU_80 = 80 * GIB
MODEL_40B_BF16 = 77 * GIB  # ~38.4B parameters x 2 bytes (InternVL3-38B, the paper preset's student)


def test_no_gpu_loads_on_the_cpu_as_before():
    assert plan_placement(0, 0, MODEL_40B_BF16, 4 * GIB) == {}


def test_a_model_that_fits_one_gpu_goes_straight_onto_it():
    assert plan_placement(1, GPU_80, 16 * GIB, 4 * GIB) == {"device_map": {"": 0}}
    assert plan_placement(2, GPU_80, 16 * GIB, 4 * GIB) == {"device_map": {"": 0}}


def test_a_40b_model_is_spread_over_the_actors_gpus_with_the_reserve_left_free():
    kwargs = plan_placement(2, GPU_80, MODEL_40B_BF16, 16 * GIB)
    assert kwargs == {"device_map": "auto", "max_memory": {0: 64 * GIB, 1: 64 * GIB}}
    assert sum(kwargs["max_memory"].values()) >= MODEL_40B_BF16


def test_the_reserve_alone_can_push_a_model_off_one_gpu():
    assert plan_placement(2, GPU_80, 70 * GIB, 4 * GIB) == {"device_map": {"": 0}}
    assert plan_placement(2, GPU_80, 70 * GIB, 16 * GIB)["device_map"] == "auto"


def test_too_few_gpus_is_an_error_naming_the_sizes_and_the_fix():
    with pytest.raises(ModelPlacementError, match=r"77\.0 GiB.*1 GPU.*at least 2 GPUs"):
        plan_placement(1, GPU_80, MODEL_40B_BF16, 16 * GIB)
    with pytest.raises(ModelPlacementError, match="gpu_reserve_gib"):
        plan_placement(2, GPU_80, MODEL_40B_BF16, 80 * GIB)


def test_kv_cache_budget_of_the_paper_presets_teacher():
    # Qwen2.5-32B, the language model of InternVL3-38B: 64 layers, 8 KV heads of 128, bf16 -> 256 KiB per token
    assert kv_cache_bytes(64, 8, 128, batch=1, tokens=1, value_bytes=2) == 256 * 1024
    # the figures in the paper preset's comments (meddr_ray/configs/paper.yaml), a large square image being
    # 3 x 3 tiles + a thumbnail = 2,560 image tokens, ~250 prompt tokens:
    per_token = kv_cache_bytes(64, 8, 128, batch=1, tokens=1, value_bytes=2)
    assert 8 * (2560 + 250 + 512) * per_token / GIB == pytest.approx(6.5, abs=0.05)  # bootstrap: 8 x 512 new
    assert 512 * per_token / 2**20 == 128  # MiB per image for max_new_tokens 512
    assert 16 * (2560 + 250 + 256) * per_token / GIB == pytest.approx(12, abs=0.1)  # evaluate: 8 images x 2
    assert 16 * (2560 + 250 + 512) * per_token / GIB == pytest.approx(13, abs=0.1)  # Serve: batch of 16
    # the weights get what the reserve leaves on 2 x 80 GB: 128 GB >= ~77 GB
    assert plan_placement(2, GPU_80, MODEL_40B_BF16, 16 * GIB)["device_map"] == "auto"


def test_checkpoint_size_is_read_from_the_safetensors_headers(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = build_tiny(tmp_path / "m", ModelBuildConfig(architecture="internvl"))
    model = AutoModelForImageTextToText.from_pretrained(path)
    params = sum(p.numel() for p in model.state_dict().values() if p.dtype == torch.float32)
    assert checkpoint_bytes(path, "float32") == 4 * params
    assert checkpoint_bytes(path, "bfloat16") == 2 * params
    size = checkpoint_bytes(path, "float32")
    assert placement_for_checkpoint(path, "float32", 0.0, []) == {}
    assert placement_for_checkpoint(path, "float32", 0.0, [size, size + 10]) == {"device_map": {"": 0}}
    half = size // 2 + 1
    assert placement_for_checkpoint(path, "float32", 0.0, [half, half]) == {
        "device_map": "auto", "max_memory": {0: half, 1: half}
    }
    text = AutoConfig.from_pretrained(path).text_config
    assert text_kv_cache_bytes(text, 2, 10, 4) == 2 * text.num_hidden_layers * text.num_key_value_heads * (
        text.hidden_size // text.num_attention_heads
    ) * 4 * 2 * 10


def test_the_cpu_path_is_unchanged(tmp_path):
    from meddr_ray.config import ModelConfig
    from meddr_ray.model import load_model
    from meddr_ray.model.loading import gpu_placement

    cfg = ModelConfig(name="tiny", path=str(build_tiny(tmp_path / "m")), device="cpu")
    assert gpu_placement(tmp_path / "m", cfg, "cpu") == {}
    model = load_model(cfg)
    assert model.placement == {} and model.device == "cpu" and not hasattr(model.model, "hf_device_map")
