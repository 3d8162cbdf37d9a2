"""The index encoder: only a checkpoint's vision tower, for retrieval keys.

The key (:func:`meddr_ray.model.loading.pooled_keys`) is the vision tower's last hidden state, mean-pooled and
L2-normalised; nothing else of the vision-language model is needed. For the paper's ~40B InternVL that is the
6B vision encoder (~12 GB in bf16) instead of the whole model (~80 GB): one GPU per encoder actor, and the language
model's weights are never read.

:func:`load_vision_encoder` builds the tower from the checkpoint's own ``vision_config`` (the class the full model
builds for it, ``AutoModel.from_config``) and reads only its tensors from the safetensors files, so its state dict,
its outputs and its :func:`~meddr_ray.model.loading.tower_fingerprint` are those of the tower inside the full model
(an index built either way stays valid).

LoRA: the paper (and :func:`meddr_ray.model.lora.apply_lora`) adapts only the language model; the tower is frozen,
so an adapter does not change the keys and is not loaded. An adapter that does hold vision-tower weights
(``train.lora.train_vision_tower: true`` saves the tower with it) is detected from its file's tensor names, and the
whole model is loaded with the adapter merged instead, so its keys are the adapted tower's. A checkpoint whose
tower cannot be built on its own (remote code, unknown weight names) is loaded whole too, said in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from meddr_ray.config import ModelConfig
from meddr_ray.model.internvl import load_processor
from meddr_ray.model.loading import (
    _DTYPES,
    ModelNotFoundError,
    ensure_model,
    image_pixels,
    load_model,
    pooled_keys,
    register_vision_towers,
    tower_fingerprint,
)
from meddr_ray.model.lora import VISION_TOWER_NAMES
from meddr_ray.model.placement import checkpoint_tensors, safetensors_header

log = logging.getLogger("meddr_ray.model")

# Where a vision-language checkpoint keeps its tower's tensors: transformers' current names, then the older ones
# (LLaVA / InternVL -hf checkpoints saved before transformers 5 have no "model." prefix).
_TOWER_PREFIXES = tuple(f"{owner}{name}." for name in VISION_TOWER_NAMES for owner in ("model.", ""))


class VisionEncoder:
    """A checkpoint's vision tower alone, with the image preprocessing its processor applies for generation."""

    def __init__(self, path: Path, cfg: ModelConfig, tower, processor, device: str):
        self.path = path
        self.cfg = cfg
        self.tower = tower
        self.processor = processor
        self.device = device
        self._fingerprint: Optional[str] = None

    @property
    def embed_dim(self) -> int:
        return int(self.tower.config.hidden_size)

    def embed(self, images: Sequence) -> np.ndarray:
        """Retrieval keys, float32 ``(len(images), embed_dim)`` with unit rows: equal to
        :meth:`VisionLanguageModel.embed` of the same checkpoint."""
        import torch

        if not len(images):
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        pixels, tiles = image_pixels(self.processor, images, self.device, self.tower)
        with torch.inference_mode():
            hidden = self.tower(pixel_values=pixels).last_hidden_state
        return pooled_keys(hidden, tiles)

    def encoder_fingerprint(self) -> str:
        """Identifies the tower's weights: the same value :meth:`VisionLanguageModel.encoder_fingerprint` gives."""
        if self._fingerprint is None:
            self._fingerprint = tower_fingerprint(self.tower)
        return self._fingerprint


def adapter_vision_tensors(adapter_dir: str) -> List[str]:
    """Names of the tensors in a LoRA adapter that belong to a vision tower (LoRA factors on its layers, or the
    whole tower saved as a ``modules_to_save`` module); empty when the adapter leaves the tower as it is."""
    files = sorted(Path(adapter_dir).glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{adapter_dir}: no adapter weights (*.safetensors) next to adapter_config.json")
    names = [n for f in files for n in safetensors_header(f) if n != "__metadata__"]
    return [n for n in names if any(part in VISION_TOWER_NAMES for part in n.split("."))]


def load_vision_encoder(cfg: ModelConfig, adapter_dir: Optional[str] = None):
    """The vision tower of ``cfg``'s checkpoint as a :class:`VisionEncoder`; the whole model
    (:class:`~meddr_ray.model.loading.VisionLanguageModel`, same ``embed`` / ``embed_dim`` /
    ``encoder_fingerprint``) when the adapter changes the tower or the tower cannot be loaded alone."""
    path = ensure_model(cfg)
    if adapter_dir:
        if not Path(adapter_dir, "adapter_config.json").is_file():
            raise ModelNotFoundError(f"LoRA adapter not found: {adapter_dir} has no adapter_config.json")
        touched = adapter_vision_tensors(adapter_dir)
        if touched:
            log.info("%s changes the vision tower (%s, ...): loading the whole model with it", adapter_dir, touched[0])
            return load_model(cfg, adapter_dir)
    tower = _load_tower(path, cfg)
    if tower is None:
        return load_model(cfg, adapter_dir)
    device = _device(cfg.device)
    processor = load_processor(path, cfg.trust_remote_code)
    return VisionEncoder(path, cfg, tower.to(device).eval(), processor, device)


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _load_tower(path: Path, cfg: ModelConfig):
    """The vision sub-model built from the checkpoint's ``vision_config`` with only its weights read, or None."""
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.initialization import no_init_weights

    register_vision_towers()

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        log.info("%s: no vision_config in its config; loading the whole model for its vision tower", path)
        return None
    dtype = getattr(torch, _DTYPES.get(cfg.dtype, "float32"))
    try:
        with no_init_weights():  # every weight is read from the checkpoint below
            tower = AutoModel.from_config(vision_config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, KeyError) as exc:
        log.info("%s: its vision tower cannot be built alone (%s); loading the whole model", path, exc)
        return None
    wanted = set(tower.state_dict())
    located = _locate(path, wanted)
    if located is None:
        log.info("%s: the vision tower's tensors were not found under %s; loading the whole model", path, _TOWER_PREFIXES)
        return None
    tower.load_state_dict(_read(located, dtype), strict=True)
    tower.requires_grad_(False)
    return tower


def _locate(path: Path, wanted: set) -> Optional[Dict[str, tuple]]:
    """``{tower name: (checkpoint name, file)}`` under the first prefix that names every tensor of the tower."""
    listing = [(name, file) for name, _, _, file in checkpoint_tensors(path)]
    for prefix in _TOWER_PREFIXES:
        found = {name[len(prefix):]: (name, file) for name, file in listing if name.startswith(prefix)}
        if wanted and wanted <= set(found):
            return {k: found[k] for k in wanted}
    return None


def _read(located: Dict[str, tuple], dtype) -> dict:
    """The located tensors, and no other, read from their files; floating ones cast to ``dtype`` as
    ``from_pretrained`` does."""
    from safetensors import safe_open

    by_file: Dict[Path, List[str]] = {}
    for key, (name, file) in located.items():
        by_file.setdefault(file, []).append(key)
    state = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                tensor = f.get_tensor(located[key][0])
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state
