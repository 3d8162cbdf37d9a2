"""The train stage: LoRA fine-tuning of the student on Ray Train with DeepSpeed ZeRO-3."""
from meddr_ray.stages.train.stage import run_train

__all__ = ["run_train"]
