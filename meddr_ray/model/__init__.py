"""Vision-language models: load from a local directory, generate, embed images, LoRA; offline tiny/smol builds."""

from meddr_ray.model.build import build_smol, build_tiny, smol_gguf_path
from meddr_ray.model.loading import (
    ImageEncoding,
    ModelNotFoundError,
    VisionLanguageModel,
    default_adapter,
    ensure_model,
    load_model,
    vision_tower,
)
from meddr_ray.model.lora import apply_lora, trainable_parameters

__all__ = [
    "ImageEncoding",
    "ModelNotFoundError",
    "VisionLanguageModel",
    "apply_lora",
    "build_smol",
    "build_tiny",
    "default_adapter",
    "ensure_model",
    "load_model",
    "smol_gguf_path",
    "trainable_parameters",
    "vision_tower",
]
