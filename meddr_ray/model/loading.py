"""Load a local vision-language checkpoint and use it: batched generation and image embeddings.

One class, :class:`VisionLanguageModel`, wraps ``AutoModelForImageTextToText`` + the checkpoint's processor
(:func:`meddr_ray.model.internvl.load_processor`). Ray actors (bootstrap teacher, evaluation student, Serve
generator) each create one and keep it for their life; the index encoder loads only the vision tower
(:mod:`meddr_ray.model.vision_encoder`). On GPUs the weights go straight onto the GPUs the actor holds, spread over
several when one is too small (:mod:`meddr_ray.model.placement`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np

from meddr_ray.config import GenerationConfig, ModelConfig
from meddr_ray.model.build import BUILDERS, SMOL_INSTALL
from meddr_ray.model.chat import chat_prompt
from meddr_ray.model.internvl import load_processor
from meddr_ray.model.placement import placement_for_checkpoint

log = logging.getLogger("meddr_ray.model")


class ModelNotFoundError(FileNotFoundError):
    """A checkpoint directory that does not exist or is not a checkpoint; the message names the path."""


def register_vision_towers() -> None:
    """Registers the EfficientNet-Lite tower's config and model types with transformers (importing
    :mod:`meddr_ray.model.vision_towers` does it; torch is imported only when a model is loaded)."""
    importlib.import_module("meddr_ray.model.vision_towers")


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


@dataclass(frozen=True)
class ImageEncoding:
    """One vision-tower pass over a batch of images, kept for both of its uses (paper section 3.3: retrieval costs
    no extra encoder pass): ``keys`` is the retrieval key of each image, ``features`` what generation feeds the
    language model in place of the image tokens.

    ``features`` is the model's own image-encoder output (transformers' ``mm_encoder_outputs["image"]``: projected
    features per image in ``pooler_output``) or, for checkpoints whose ``generate`` cannot take precomputed
    features, None with the images kept so generation encodes them again (the keys are still computed once).
    """

    keys: np.ndarray
    """float32 ``(n, embed_dim)``, unit rows: equal to :meth:`VisionLanguageModel.embed` of the same images."""
    features: Any = None
    """Projected image features per image (a list of tensors), or None (see above)."""
    images: Any = None
    """The images themselves; only kept when ``features`` is None."""

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def select(self, indices: Sequence[int]) -> "ImageEncoding":
        """The encodings of ``indices`` (repeats allowed: one image answered with two prompts)."""
        idx = [int(i) for i in indices]
        return ImageEncoding(
            keys=self.keys[idx] if idx else self.keys[:0],
            features=[self.features[i] for i in idx] if self.features is not None else None,
            images=[self.images[i] for i in idx] if self.images is not None else None,
        )

    @staticmethod
    def concat(parts: Sequence["ImageEncoding"]) -> "ImageEncoding":
        """One encoding of several batches' images, in order (batches from separate requests, say)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        with_features = {p.features is not None for p in parts}
        if len(with_features) > 1:
            raise ValueError("cannot concatenate encodings with and without precomputed features")
        return ImageEncoding(
            keys=np.concatenate([p.keys for p in parts], axis=0),
            features=[f for p in parts for f in p.features] if parts[0].features is not None else None,
            images=[im for p in parts for im in p.images] if parts[0].features is None else None,
        )


def pooled_keys(last_hidden_state, tiles: Optional[Sequence[int]] = None) -> np.ndarray:
    """The retrieval key: mean over the vision tower's last hidden state (this project's choice: the paper names
    no layer or pooling), over every token of every tile of an image when the model tiles images (``tiles``: tiles
    per image, in order), L2-normalised so inner product is cosine similarity."""
    import torch

    hidden = last_hidden_state.float()
    if tiles is None:
        pooled = hidden.mean(dim=1)
    else:
        per_tile = hidden.mean(dim=1)  # every tile has the same token count: the mean of tile means is the mean
        pooled = torch.stack([part.mean(dim=0) for part in torch.split(per_tile, list(tiles))])
    return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)


class VisionLanguageModel:
    """A loaded checkpoint (optionally with a LoRA adapter) and its processor."""

    def __init__(self, cfg: ModelConfig, adapter_dir: Optional[str] = None):
        import torch

        register_vision_towers()  # before the processor, which reads the config too

        self.cfg = cfg
        self.path = ensure_model(cfg)
        self.device = _pick_device(cfg.device)
        dtype = getattr(torch, _DTYPES.get(cfg.dtype, "float32"))
        self.processor = load_processor(self.path, cfg.trust_remote_code)
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right
        _ensure_pad_token(self.processor.tokenizer, self.path)
        placement = gpu_placement(self.path, cfg, self.device)
        model = _load_weights(self.path, dtype, cfg.trust_remote_code, **placement)
        self.adapter_dir = adapter_dir
        if adapter_dir:
            from peft import PeftModel

            if not Path(adapter_dir, "adapter_config.json").is_file():
                raise ModelNotFoundError(f"LoRA adapter not found: {adapter_dir} has no adapter_config.json")
            model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        if placement:  # already on its GPU(s); inputs go where the embeddings are
            self.device = str(model.get_input_embeddings().weight.device)
        else:
            model = model.to(self.device)
        self.model = model.eval()
        self.placement = placement
        self._fingerprint: Optional[str] = None

    # ------------------------------------------------------------------------------------------ prompting

    def chat_prompt(self, text: str, with_image: bool = True) -> str:
        """The user turn as this model sees it (:func:`meddr_ray.model.chat.chat_prompt`)."""
        return chat_prompt(self.processor, text, with_image)

    @property
    def embed_dim(self) -> int:
        cfg = vision_tower(self.model).config
        return int(getattr(cfg, "hidden_size"))

    # ----------------------------------------------------------------------------------------- generation

    def generate(
        self,
        images: Optional[Sequence],
        prompts: Sequence[str],
        gen: GenerationConfig,
        prefixes: Optional[Sequence[str]] = None,
        encoding: Optional[ImageEncoding] = None,
    ) -> List[dict]:
        """Batched generation: one image and one instruction per sample.

        The images come either as PIL images or as ``encoding`` (:meth:`encode_images`, row i for prompt i), in
        which case the vision tower does not run again. Each answer starts with its prefix (``prefixes[i]``,
        default ``gen.response_prefix``), which is part of the returned text. Returns ``[{"text", "tokens"}]``
        (``tokens``: generated tokens without padding), in input order.
        """
        import torch

        if (images is None) == (encoding is None):
            raise ValueError("pass either images or their encoding")
        n_images = len(encoding) if encoding is not None else len(images)
        if n_images != len(prompts):
            raise ValueError(f"{n_images} images but {len(prompts)} prompts")
        if not prompts:
            return []
        prefixes = list(prefixes) if prefixes is not None else [gen.response_prefix] * len(prompts)
        if len(prefixes) != len(prompts):
            raise ValueError(f"{len(prefixes)} prefixes but {len(prompts)} prompts")
        texts = [self.chat_prompt(p) + prefix for p, prefix in zip(prompts, prefixes)]
        if encoding is not None and encoding.features is None:
            images, encoding = encoding.images, None  # this checkpoint cannot take pre-encoded images
        if encoding is None:
            inputs = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        else:
            inputs = self._text_inputs(texts, [int(f.shape[0]) for f in encoding.features])
            # transformers' hook for pre-encoded images: generate() scatters them into the image tokens
            inputs["mm_encoder_outputs"] = {"image": _encoder_output(encoding.features, self._joined_features())}
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        tok = self.processor.tokenizer
        kwargs = {k: v for k, v in asdict(gen).items() if v is not None and k != "response_prefix"}
        if not gen.do_sample:
            kwargs.pop("temperature", None)
            kwargs.pop("top_p", None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs, pad_token_id=tok.pad_token_id)
        new = _new_tokens(out, inputs["input_ids"])
        results = []
        stop = _token_ids(tok.pad_token_id, tok.eos_token_id, self.model.generation_config.eos_token_id)
        for prefix, row in zip(prefixes, new.tolist()):
            n = len(row)
            while n and row[n - 1] in stop:
                n -= 1
            text = (prefix + tok.decode(row[:n], skip_special_tokens=True)).strip()
            results.append({"text": text, "tokens": n})
        return results

    # ------------------------------------------------------------------------------------------ embedding

    def embed(self, images: Sequence) -> np.ndarray:
        """The retrieval key: the model's own vision encoder's embedding (section 3.3; the paper names no layer or
        pooling, this project mean-pools the vision tower's last hidden state), L2-normalised.

        Returns float32 ``(len(images), embed_dim)`` with unit rows.
        """
        import torch

        if not len(images):
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        tower = vision_tower(self.model)
        pixels, tiles = image_pixels(self.processor, images, self.device, tower)
        with torch.inference_mode():
            hidden = tower(pixel_values=pixels).last_hidden_state
        return pooled_keys(hidden, tiles)

    def encode_images(self, images: Sequence) -> ImageEncoding:
        """One vision-tower pass giving both the retrieval keys (equal to :meth:`embed`) and the image features
        :meth:`generate` takes (``encoding=``): the query image is encoded once for retrieval and answering."""
        import torch

        if not len(images):
            raise ValueError("encode_images needs at least one image")
        tower = vision_tower(self.model)
        pixels, tiles = image_pixels(self.processor, images, self.device, tower)
        image_features = getattr(self.model, "get_image_features", None)
        if image_features is None or not self._takes_encoder_outputs():
            with torch.inference_mode():
                keys = pooled_keys(tower(pixel_values=pixels).last_hidden_state, tiles)
            return ImageEncoding(keys=keys, images=list(images))
        with torch.inference_mode():
            out = image_features(pixel_values=pixels, return_dict=True)
        # LLaVA-style models return the vision tower's own output with the projected features in pooler_output
        # (LLaVA: one entry per image; InternVL: one per tile, joined here per image)
        features = list(out.pooler_output)
        if tiles is not None:
            bounds = np.cumsum([0, *tiles])
            features = [torch.cat(features[a:b], dim=0) for a, b in zip(bounds[:-1], bounds[1:])]
        return ImageEncoding(keys=pooled_keys(out.last_hidden_state, tiles), features=features)

    def _takes_encoder_outputs(self) -> bool:
        supports = getattr(self.model, "_supports_mm_encoder_outputs", None)
        return bool(supports and supports())

    def _joined_features(self) -> bool:
        """InternVL's forward takes pre-encoded images as one tensor of every image token; LLaVA's as a list."""
        return getattr(self.model.config, "model_type", None) == "internvl"

    def _text_inputs(self, texts: Sequence[str], image_tokens: Sequence[int]) -> dict:
        """Token ids of chat texts whose image placeholder is repeated once per image feature, as the processor
        expands it when it gets the images itself (InternVL also wraps them in ``<img>`` ... ``</img>``)."""
        token = self.processor.image_token
        start = getattr(self.processor, "start_image_token", "") or ""
        end = getattr(self.processor, "end_image_token", "") or ""
        expanded = []
        for text, n in zip(texts, image_tokens):
            if text.count(token) != 1:
                raise ValueError(f"expected one {token!r} placeholder in the chat prompt, found {text.count(token)}")
            expanded.append(text.replace(token, start + token * n + end))
        return dict(self.processor.tokenizer(expanded, return_tensors="pt", padding=True))

    def encoder_fingerprint(self) -> str:
        """Identifies the vision encoder's weights; an index built with another encoder is refused."""
        if self._fingerprint is None:
            self._fingerprint = tower_fingerprint(vision_tower(self.model))
        return self._fingerprint


def tower_fingerprint(tower) -> str:
    """A vision tower's weights in 16 hex digits (names, shapes and a strided sample of every tensor)."""
    h = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        flat = tensor.detach().float().cpu().flatten()
        h.update(name.encode())
        h.update(json.dumps(list(tensor.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].numpy().tobytes())
    return h.hexdigest()[:16]


def image_pixels(processor, images: Sequence, device, tower):
    """The vision tower's input for ``images`` as the processor prepares it for generation, and the tiles of each
    image (InternVL cuts an image into tiles: ``num_patches``), None for one input per image."""
    kwargs = dict(getattr(processor, "images_kwargs", None) or {})  # InternVLProcessor: crop_to_patches=True
    out = processor.image_processor(images=list(images), return_tensors="pt", **kwargs)
    tiles = out.get("num_patches")
    tiles = [int(t) for t in tiles] if tiles is not None else None
    return out["pixel_values"].to(device, dtype=next(tower.parameters()).dtype), tiles


def _token_ids(*values) -> set:
    """Token ids from ints, lists of ints (a checkpoint may name several end-of-sequence tokens) and Nones."""
    out = set()
    for value in values:
        if isinstance(value, (list, tuple)):
            out.update(int(v) for v in value if v is not None)
        elif value is not None:
            out.add(int(value))
    return out


def _new_tokens(out, input_ids):
    """The generated tokens of each row. transformers' ``generate`` returns prompt + new tokens; some remote-code
    models return only the new ones, which cutting the prompt length off would silently empty."""
    length = input_ids.shape[1]
    if out.shape[1] >= length and bool((out[:, :length] == input_ids.to(out.device)).all()):
        return out[:, length:]
    return out


def _ensure_pad_token(tokenizer, path) -> None:
    """Batched generation pads the prompts: a tokenizer without a pad token pads with its end-of-sequence token
    (the common convention), and one with neither cannot batch, said with the checkpoint's path."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ModelNotFoundError(
            f"{path}: the tokenizer has neither a pad nor an end-of-sequence token, so prompts cannot be batched; "
            "add a pad token to the checkpoint's tokenizer"
        )
    log.info("%s: the tokenizer has no pad token; padding with its end-of-sequence token %r", path, tokenizer.eos_token)
    tokenizer.pad_token = tokenizer.eos_token


def _encoder_output(features, joined: bool = False):
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=torch.cat(list(features)) if joined else list(features))


def _load_weights(path: Path, dtype, trust_remote_code: bool, **placement):
    """``AutoModelForImageTextToText``; checkpoints whose own code registers only ``AutoModel`` (the original
    InternVL-Chat releases) fall back to it when ``trust_remote_code`` allows their code. ``placement``:
    ``device_map`` / ``max_memory`` from :func:`gpu_placement` (none: on the CPU)."""
    from transformers import AutoModel, AutoModelForImageTextToText

    register_vision_towers()

    try:
        return AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, **placement
        )
    except ValueError:
        if not trust_remote_code:
            raise
        return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=True, **placement)


def gpu_placement(path: Path, cfg: ModelConfig, device: str) -> dict:
    """``device_map`` / ``max_memory`` for the GPUs this process sees (a Ray actor: the ones it was given), from
    the checkpoint's size and ``cfg.gpu_reserve_gib``; ``{}`` on the CPU (the model is moved whole, as before)."""
    if not device.startswith("cuda"):
        return {}
    import torch

    gpus = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    if device.startswith("cuda:"):  # one named GPU
        gpus = [gpus[int(device.split(":", 1)[1])]]
    placement = placement_for_checkpoint(path, _DTYPES.get(cfg.dtype, "float32"), cfg.gpu_reserve_gib, gpus)
    if device.startswith("cuda:") and placement.get("device_map") == {"": 0}:
        placement = {"device_map": {"": device}}
    log.info("%s: %s on %d GPU(s): %s", cfg.name, path, len(gpus), placement)
    return placement


def load_model(cfg: ModelConfig, adapter_dir: Optional[str] = None) -> VisionLanguageModel:
    return VisionLanguageModel(cfg, adapter_dir)


def default_adapter(adapter_dir: str) -> Optional[str]:
    """The adapter folder if fine-tuning wrote one, else None (stages then use the base model)."""
    return adapter_dir if os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")) else None
