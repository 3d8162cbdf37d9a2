"""Load a local vision-language checkpoint and use it: batched generation and image embeddings.

One class, :class:`VisionLanguageModel`, wraps ``AutoModelForImageTextToText`` + ``AutoProcessor``. Ray actors
(bootstrap teacher, index encoder, evaluation student, Serve generator) each create one and keep it for their life.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from meddr_ray.config import GenerationConfig, ModelConfig
from meddr_ray.model.build import BUILDERS, SMOL_INSTALL


class ModelNotFoundError(FileNotFoundError):
    """A checkpoint directory that does not exist or is not a checkpoint; the message names the path."""


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def ensure_model(cfg: ModelConfig) -> Path:
    """The checkpoint directory of ``cfg``; builds the offline tiny/smol model there first if asked and missing."""
    path = Path(cfg.path)
    if (path / "config.json").is_file():
        return path
    if cfg.build:
        try:
            return BUILDERS[cfg.build](path, cfg.build_options)
        except FileNotFoundError as exc:  # smol without its package
            raise ModelNotFoundError(str(exc)) from exc
    if not path.exists():
        raise ModelNotFoundError(
            f"model checkpoint not found: {path} (model {cfg.name!r}). Put a hub-format checkpoint there "
            f"(config.json, weights, processor files), or set build: tiny|smol to build one offline"
            + (f"; smol needs `{SMOL_INSTALL}`" if "smol" in cfg.name else "")
        )
    raise ModelNotFoundError(f"{path} is not a model checkpoint: it has no config.json (model {cfg.name!r})")


def _pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def vision_tower(model):
    """The vision encoder of a LLaVA / Qwen2-VL / InternVL-style model (after peft wrapping too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for owner in (getattr(base, "model", None), base):
        if owner is None:
            continue
        for attr in ("vision_tower", "vision_model", "visual"):
            tower = getattr(owner, attr, None)
            if tower is not None:
                return tower
    raise TypeError(f"cannot find the vision tower of {type(base).__name__}")


class VisionLanguageModel:
    """A loaded checkpoint (optionally with a LoRA adapter) and its processor."""

    def __init__(self, cfg: ModelConfig, adapter_dir: Optional[str] = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg
        self.path = ensure_model(cfg)
        self.device = _pick_device(cfg.device)
        dtype = getattr(torch, _DTYPES.get(cfg.dtype, "float32"))
        self.processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=cfg.trust_remote_code)
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right
        model = _load_weights(self.path, dtype, cfg.trust_remote_code)
        self.adapter_dir = adapter_dir
        if adapter_dir:
            from peft import PeftModel

            if not Path(adapter_dir, "adapter_config.json").is_file():
                raise ModelNotFoundError(f"LoRA adapter not found: {adapter_dir} has no adapter_config.json")
            model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        self.model = model.to(self.device).eval()
        self._fingerprint: Optional[str] = None

    # ------------------------------------------------------------------------------------------ prompting

    def chat_prompt(self, text: str, with_image: bool = True) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    @property
    def embed_dim(self) -> int:
        cfg = vision_tower(self.model).config
        return int(getattr(cfg, "hidden_size"))

    # ----------------------------------------------------------------------------------------- generation

    def generate(
        self,
        images: Sequence,
        prompts: Sequence[str],
        gen: GenerationConfig,
        prefixes: Optional[Sequence[str]] = None,
    ) -> List[dict]:
        """Batched generation: one PIL image and one instruction per sample.

        Each answer starts with its prefix (``prefixes[i]``, default ``gen.response_prefix``), which is part of
        the returned text. Returns ``[{"text", "tokens"}]`` (``tokens``: generated tokens without padding), in
        input order.
        """
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not prompts:
            return []
        prefixes = list(prefixes) if prefixes is not None else [gen.response_prefix] * len(prompts)
        if len(prefixes) != len(prompts):
            raise ValueError(f"{len(prefixes)} prefixes but {len(prompts)} prompts")
        texts = [self.chat_prompt(p) + prefix for p, prefix in zip(prompts, prefixes)]
        inputs = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True).to(self.device)
        tok = self.processor.tokenizer
        kwargs = {k: v for k, v in asdict(gen).items() if v is not None and k != "response_prefix"}
        if not gen.do_sample:
            kwargs.pop("temperature", None)
            kwargs.pop("top_p", None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs, pad_token_id=tok.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1] :]
        results = []
        stop = {tok.pad_token_id, tok.eos_token_id, self.model.generation_config.eos_token_id}
        for prefix, row in zip(prefixes, new.tolist()):
            n = len(row)
            while n and row[n - 1] in stop:
                n -= 1
            text = (prefix + tok.decode(row[:n], skip_special_tokens=True)).strip()
            results.append({"text": text, "tokens": n})
        return results

    # ------------------------------------------------------------------------------------------ embedding

    def embed(self, images: Sequence) -> np.ndarray:
        """The paper's retrieval key: mean-pooled last hidden state of the model's own vision tower, L2-normalised.

        Returns float32 ``(len(images), embed_dim)`` with unit rows.
        """
        import torch

        if not len(images):
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        tower = vision_tower(self.model)
        with torch.inference_mode():
            hidden = tower(pixel_values=pixels.to(self.device, dtype=next(tower.parameters()).dtype)).last_hidden_state
            pooled = hidden.float().mean(dim=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy().astype(np.float32)

    def encoder_fingerprint(self) -> str:
        """Identifies the vision encoder's weights; an index built with another encoder is refused."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, tensor in sorted(vision_tower(self.model).state_dict().items()):
                flat = tensor.detach().float().cpu().flatten()
                h.update(name.encode())
                h.update(json.dumps(list(tensor.shape)).encode())
                h.update(flat[:: max(1, flat.numel() // 4096)].numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def _load_weights(path: Path, dtype, trust_remote_code: bool):
    """``AutoModelForImageTextToText``; checkpoints whose own code registers only ``AutoModel`` (the original
    InternVL-Chat releases) fall back to it when ``trust_remote_code`` allows their code."""
    from transformers import AutoModel, AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError:
        if not trust_remote_code:
            raise
        return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=True)


def load_model(cfg: ModelConfig, adapter_dir: Optional[str] = None) -> VisionLanguageModel:
    return VisionLanguageModel(cfg, adapter_dir)


def default_adapter(adapter_dir: str) -> Optional[str]:
    """The adapter folder if fine-tuning wrote one, else None (stages then use the base model)."""
    return adapter_dir if os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")) else None
