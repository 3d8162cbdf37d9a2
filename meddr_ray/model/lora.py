"""LoRA wrapping as the paper: adapters on the language model's linear layers, vision tower and projector frozen."""

from __future__ import annotations

from typing import Tuple

from meddr_ray.config import LoraConfig


def apply_lora(model, cfg: LoraConfig):
    """Wrap ``model`` with peft LoRA on the language model only; returns the peft model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # Restrict targets to the language model: a bare name like "q_proj" would also hit the vision tower.
    pattern = r".*language_model.*\.(" + "|".join(cfg.target_modules) + r")$"
    modules_to_save = []
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=pattern,
        bias="none",
        modules_to_save=modules_to_save or None,
    )
    peft_model = get_peft_model(model, peft_cfg)
    base = peft_model.get_base_model()
    for name, param in base.named_parameters():
        if cfg.train_vision_tower and ("vision_tower" in name or "vision_model" in name):
            param.requires_grad = True
        if cfg.train_projector and "multi_modal_projector" in name:
            param.requires_grad = True
    return peft_model


def trainable_parameters(model) -> Tuple[int, int, float]:
    """(trainable, total, share in %)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, 100.0 * trainable / max(total, 1)
