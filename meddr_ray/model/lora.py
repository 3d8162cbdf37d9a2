"""LoRA wrapping: adapters on the language model's linear layers (which layers: this project's choice, the paper
names none); vision tower and projector frozen, as the paper, which trains only the LoRA component."""

from __future__ import annotations

from typing import Tuple

from meddr_ray.config import LoraConfig


# Module names of the vision tower and the vision-language projector in LLaVA / InternVL / Qwen2-VL-style models
# (native InternVL: model.vision_tower and model.multi_modal_projector; remote-code InternVL-Chat: vision_model, mlp1).
VISION_TOWER_NAMES = ("vision_tower", "vision_model", "visual")
_PROJECTORS = ("multi_modal_projector", "mlp1")


def apply_lora(model, cfg: LoraConfig):
    """Wrap ``model`` with peft LoRA on the language model only; returns the peft model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # Restrict targets to the language model: a bare name like "q_proj" would also hit the vision tower.
    pattern = r".*language_model.*\.(" + "|".join(cfg.target_modules) + r")$"
    # Unfrozen vision tower / projector go to peft's modules_to_save: trained, and saved with the adapter, so
    # PeftModel.from_pretrained restores them (a bare requires_grad would train weights the adapter never saves).
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    modules_to_save = []
    if cfg.train_vision_tower:
        modules_to_save += [n for n in VISION_TOWER_NAMES if n in names]
    if cfg.train_projector:
        modules_to_save += [n for n in _PROJECTORS if n in names]
    modules_to_save += [n for n in cfg.modules_to_save if n not in modules_to_save]
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=pattern,
        bias="none",
        modules_to_save=modules_to_save or None,
    )
    peft_model = get_peft_model(model, peft_cfg)
    _check_tower_has_no_lora(peft_model)
    return peft_model


def _check_tower_has_no_lora(peft_model) -> None:
    """The vision tower gets no LoRA factors (the index encoder relies on it: a frozen tower's keys do not depend
    on the adapter). Only ``train_vision_tower`` changes the tower, through ``modules_to_save``."""
    adapted = [
        name
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and any(part in VISION_TOWER_NAMES for part in name.split("."))
    ]
    if adapted:
        raise ValueError(f"LoRA targets reached the vision tower ({adapted[0]}, ...): only the language model is adapted")


def _numel(param) -> int:
    """Full size of a parameter, also when DeepSpeed ZeRO-3 has partitioned it (then ``numel()`` is 0)."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


def trainable_parameters(model) -> Tuple[int, int, float]:
    """(trainable, total, share in %), counting partitioned (ZeRO-3) parameters at their full size."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total, 100.0 * trainable / max(total, 1)
