"""The learning-rate schedule: a factor of the peak learning rate per optimizer step (a torch ``LambdaLR``)."""

from __future__ import annotations

import math
from typing import Callable

from meddr_ray.config import TrainConfig


def lr_multiplier(t: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The schedule as a function of the optimizer steps already taken (0 for the first step) -> factor of the
    peak learning rate: linear warm-up over ``warmup_ratio`` of the steps (the first step already moves), then
    cosine or linear decay towards 0, or constant."""
    warmup = math.ceil(t.warmup_ratio * total_steps) if t.warmup_ratio > 0 else 0
    kind = t.lr_scheduler

    def factor(done: int) -> float:
        if done < warmup:
            return (done + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (done - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return factor
