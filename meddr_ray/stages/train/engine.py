"""The student with LoRA inside a DeepSpeed engine, on one training worker.

``deepspeed`` is imported only inside these functions, which run in Ray Train workers after
``DS_ACCELERATOR=cpu`` is set on CPU workers (:meth:`meddr_ray.stages.train.recipe.InstructionTuningRecipe.setup`).
"""

from __future__ import annotations

from typing import Callable, Tuple

from meddr_ray.config import Config, TrainConfig
from meddr_ray.stages.train.deepspeed_config import deepspeed_config
from meddr_ray.stages.train.plan import TrainPlan


def build_engine(cfg: Config, plan: TrainPlan, model_path: str, schedule: Callable[[int], float]):
    """Returns ``(engine, (trainable, total, share in %))``: the parameter counts of the LoRA-wrapped student."""
    import deepspeed
    import torch

    from meddr_ray.model import apply_lora, trainable_parameters
    from meddr_ray.model.loading import _load_weights

    t = cfg.train
    ds_config = deepspeed_config(t, plan)
    # ZeRO-3: while this object lives, from_pretrained builds the model inside deepspeed.zero.Init, so each rank
    # only ever holds its shard of the base weights (a 40B model never sits whole in every worker's memory).
    hf_ds_config = None
    if t.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(t.seed)  # same adapter initialisation on every rank
    # the library's loader: AutoModelForImageTextToText, or AutoModel for remote-code InternVL-Chat checkpoints
    model = _load_weights(model_path, getattr(torch, cfg.student.dtype), cfg.student.trust_remote_code)
    model.config.use_cache = False
    model = apply_lora(model, t.lora)  # LoRA tensors are created whole; deepspeed.initialize partitions them
    counts: Tuple[int, int, float] = trainable_parameters(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    del hf_ds_config  # later from_pretrained calls (the processor, other code) must not see ZeRO-3
    return engine, counts


def reapply_schedule(engine, t: TrainConfig, schedule: Callable[[int], float]) -> None:
    """Set the learning rate of this run's schedule on a restored engine.

    The restored optimizer carries the learning rate of the plan it was saved under; the next step must use this
    plan's (a re-run with more max_steps stretches the schedule).
    """
    sched = engine.lr_scheduler
    sched.base_lrs = [t.learning_rate] * len(sched.base_lrs)
    for group in sched.optimizer.param_groups:
        group["lr"] = t.learning_rate * schedule(sched.last_epoch)
