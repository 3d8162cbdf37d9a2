"""How many batches and optimizer steps a training run takes: computed by the driver from the row counts, before
any Ray work, and handed to every worker."""

from __future__ import annotations

from dataclasses import dataclass

from meddr_ray.config import TrainConfig


@dataclass
class TrainPlan:
    """The batch arithmetic of one run (every rank takes the same number of optimizer steps)."""

    world_size: int
    micro_batch_size: int
    accumulation: int
    rows_per_worker: int
    steps_per_epoch: int
    total_steps: int

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation


def make_plan(t: TrainConfig, train_rows: int) -> TrainPlan:
    """Gradient accumulation that reaches ``global_batch_size`` and the step counts it implies.

    Ray Data splits the training rows equally over the workers (the remainder is dropped); each epoch trains on
    whole accumulation cycles only, so every rank takes the same number of optimizer steps.
    """
    world = t.num_workers
    per_pass = t.micro_batch_size * world
    if t.global_batch_size % per_pass:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x num_workers "
            f"= {per_pass}"
        )
    accumulation = t.global_batch_size // per_pass
    rows_per_worker = train_rows // world
    steps_per_epoch = rows_per_worker // t.micro_batch_size // accumulation
    if steps_per_epoch == 0:
        raise ValueError(
            f"{train_rows} training rows are fewer than one global batch of {t.global_batch_size} "
            f"({world} workers x {t.micro_batch_size} x {accumulation} accumulation): lower train.global_batch_size "
            "or add data"
        )
    total = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
    return TrainPlan(world, t.micro_batch_size, accumulation, rows_per_worker, steps_per_epoch, int(total))
