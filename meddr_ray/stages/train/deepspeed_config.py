"""The DeepSpeed config a training run hands to ``deepspeed.initialize``, built from the ``train`` section."""

from __future__ import annotations

from typing import Any, Dict

from meddr_ray.config import TrainConfig
from meddr_ray.stages.train.plan import TrainPlan


def _zero_section(t: TrainConfig) -> Dict[str, Any]:
    zero: Dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(
            {
                # parameters smaller than this stay whole on every rank (fewer all-gathers); 0 partitions all
                "stage3_param_persistence_threshold": t.param_persistence_threshold,
                "stage3_gather_16bit_weights_on_model_save": False,  # the adapter is gathered by hand, on rank 0
            }
        )
    if t.zero_stage > 0:
        # The fusion buckets default to 5e8 elements (2 GB in fp32) each; size them to the model instead.
        zero.update({"reduce_bucket_size": t.bucket_size, "allgather_bucket_size": t.bucket_size})
        if t.zero_stage == 3:
            zero.update({"stage3_prefetch_bucket_size": t.bucket_size})
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    return zero


def deepspeed_config(t: TrainConfig, plan: TrainPlan) -> Dict[str, Any]:
    """ZeRO stage, precision, accumulation, clipping, torch AdamW.

    The learning-rate schedule is a torch ``LambdaLR`` (:func:`meddr_ray.stages.train.schedule.lr_multiplier`)
    handed to ``deepspeed.initialize``, which steps it at accumulation boundaries and keeps its state in
    checkpoints.
    """
    config: Dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": t.gradient_clipping,
        "zero_optimization": _zero_section(t),
        # torch's AdamW: DeepSpeed's fused/CPU Adam would compile a C++/CUDA op on first use
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.learning_rate, "weight_decay": t.weight_decay, "betas": [0.9, 0.999], "torch_adam": True},
        },
        # with offload, DeepSpeed insists on its own CPU Adam unless told that torch's is fine
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # progress goes through ray.train.report, not DeepSpeed's logger
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return config
