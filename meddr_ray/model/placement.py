"""Where a checkpoint's weights go: one device, or spread over the GPUs an actor or worker holds.

A 40B model in bf16 is about 80 GB of weights; with a batch's KV cache it fits no single 80 GB GPU. A Ray actor
that asks for ``num_gpus: 2`` sees two GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``); :func:`plan_placement` turns the
GPU count, the memory of each and the size of the weights into ``from_pretrained`` keyword arguments: nothing on
the CPU (load on the CPU, move as today), the whole model on GPU 0 when it fits there with the reserve left free,
else ``device_map="auto"`` (layers balanced over the GPUs) with ``max_memory`` capping each GPU at its memory less
the reserve, and a clear error when even all of them are too small. The reserve is what a batch's activations and
KV cache need (:func:`kv_cache_bytes`), so the batch size and ``max_new_tokens`` are a memory budget.

No torch here: the decision is a pure function, tested without GPUs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

GIB = 1024**3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F64", "F32", "BF16", "F16")


class ModelPlacementError(RuntimeError):
    """The weights do not fit the GPUs given; the message names the sizes and what to change."""


def plan_placement(num_gpus: int, gpu_bytes: int, model_bytes: int, reserve_bytes: int) -> Dict[str, Any]:
    """``from_pretrained`` placement kwargs for a model of ``model_bytes`` on ``num_gpus`` GPUs of ``gpu_bytes``
    each, keeping ``reserve_bytes`` free on every GPU for activations and the KV cache.

    - no GPU: ``{}`` (load on the CPU; the caller moves the model, as before);
    - fits one GPU: ``{"device_map": {"": 0}}`` (straight onto GPU 0, never whole in host memory);
    - fits only several: ``{"device_map": "auto", "max_memory": {0: cap, 1: cap, ...}}``, ``cap = gpu - reserve``;
    - fits none: :class:`ModelPlacementError`.
    """
    if num_gpus < 0 or gpu_bytes < 0 or model_bytes < 0 or reserve_bytes < 0:
        raise ValueError(f"negative size: gpus={num_gpus} gpu={gpu_bytes} model={model_bytes} reserve={reserve_bytes}")
    if num_gpus == 0:
        return {}
    cap = gpu_bytes - reserve_bytes
    if cap <= 0:
        raise ModelPlacementError(
            f"model.gpu_reserve_gib={reserve_bytes / GIB:.1f} leaves nothing of a {gpu_bytes / GIB:.1f} GiB GPU for "
            "the weights; lower it"
        )
    if model_bytes <= cap:
        return {"device_map": {"": 0}}
    if model_bytes > cap * num_gpus:
        return _too_big(num_gpus, gpu_bytes, model_bytes, reserve_bytes, cap)
    return {"device_map": "auto", "max_memory": {i: cap for i in range(num_gpus)}}


def _too_big(num_gpus: int, gpu_bytes: int, model_bytes: int, reserve_bytes: int, cap: int):
    need = -(-model_bytes // cap)  # ceil
    raise ModelPlacementError(
        f"the weights ({model_bytes / GIB:.1f} GiB) do not fit {num_gpus} GPU(s) of {gpu_bytes / GIB:.1f} GiB with "
        f"{reserve_bytes / GIB:.1f} GiB (model.gpu_reserve_gib) kept free on each: give each actor/worker at least "
        f"{need} GPUs (pool.num_gpus / serve num_gpus), or a smaller batch and reserve"
    )


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, batch: int, tokens: int, value_bytes: int) -> int:
    """Bytes of a decoder's KV cache for ``batch`` sequences of ``tokens`` (prompt + new) tokens: a key and a value
    vector of ``num_kv_heads x head_dim`` per layer per token."""
    return 2 * num_layers * num_kv_heads * head_dim * value_bytes * batch * tokens


def text_kv_cache_bytes(text_config, batch: int, tokens: int, value_bytes: int) -> int:
    """:func:`kv_cache_bytes` with the dimensions read from a transformers text config."""
    heads = int(text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    return kv_cache_bytes(int(text_config.num_hidden_layers), int(kv_heads), int(head_dim), batch, tokens, value_bytes)


# --------------------------------------------------------------------------------------- checkpoint sizes


def safetensors_header(path: str | Path) -> Dict[str, Any]:
    """The JSON header of one ``.safetensors`` file (tensor names, dtypes, shapes), read without the tensors."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def checkpoint_tensors(directory: str | Path) -> Iterator[Tuple[str, str, Tuple[int, ...], Path]]:
    """``(name, safetensors dtype, shape, file)`` of every tensor of a checkpoint folder, from the headers only."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        for name, info in safetensors_header(file).items():
            if name != "__metadata__":
                yield name, info["dtype"], tuple(info["shape"]), file


def checkpoint_bytes(directory: str | Path, dtype: str) -> int:
    """Memory the checkpoint's weights take once loaded as ``dtype`` (floating tensors cast, the others as stored);
    from the safetensors headers, or the weight files' sizes for a checkpoint without safetensors."""
    target = DTYPE_BYTES[dtype]
    total, seen = 0, False
    for _, kind, shape, _ in checkpoint_tensors(directory):
        seen = True
        numel = 1
        for d in shape:
            numel *= int(d)
        total += numel * (target if kind in _FLOATS else _SAFETENSORS_BYTES.get(kind, 4))
    if seen:
        return total
    return sum(f.stat().st_size for f in Path(directory).glob("*.bin"))


def placement_for_checkpoint(directory: str | Path, dtype: str, reserve_gib: float, gpu_bytes: list) -> Dict[str, Any]:
    """:func:`plan_placement` for a checkpoint folder loaded as ``dtype`` on GPUs of the given memory (the
    smallest one counts); ``gpu_bytes`` empty: the CPU."""
    if not gpu_bytes:
        return {}
    return plan_placement(len(gpu_bytes), min(gpu_bytes), checkpoint_bytes(directory, dtype), int(reserve_gib * GIB))
