"""The training run's dashboard metrics (Prometheus ``ray_meddr_train_*``), set by rank 0."""

from __future__ import annotations

import time
from typing import Any, Dict


class TrainGauges:
    """The run's dashboard metrics, set by rank 0 (the window's figures are already means over every worker):
    Prometheus ``ray_meddr_train_*``, tagged with ``train.name`` (docs/operations.md, "Metrics"). Gauges, not
    counters: a resumed run starts its process afresh, and a gauge still shows the last value."""

    def __init__(self, run_name: str):
        from ray.util.metrics import Gauge

        tags = ("run",)
        self.tags = {"run": run_name}
        self.loss = Gauge("meddr_train_loss", "Mean training loss of the last reporting window", tag_keys=tags)
        self.samples_per_s = Gauge(
            "meddr_train_samples_per_s", "Training samples per second, all workers, last window", tag_keys=tags
        )
        self.tokens_per_s = Gauge(
            "meddr_train_tokens_per_s", "Training tokens per second, all workers, last window", tag_keys=tags
        )
        self.step = Gauge("meddr_train_step", "Optimizer steps done", tag_keys=tags)
        self.checkpoint_step = Gauge("meddr_train_last_checkpoint_step", "Step of the last checkpoint", tag_keys=tags)
        self.checkpoint_time = Gauge(
            "meddr_train_last_checkpoint_timestamp_s",
            "Unix time the last checkpoint was persisted (its age: time() - this)",
            tag_keys=tags,
        )

    def window(self, metrics: Dict[str, Any]) -> None:
        self.step.set(metrics["step"], tags=self.tags)
        for gauge, key in ((self.loss, "loss"), (self.samples_per_s, "samples_per_s"),
                           (self.tokens_per_s, "tokens_per_s")):
            if metrics.get(key) is not None:
                gauge.set(float(metrics[key]), tags=self.tags)

    def checkpoint(self, step: int) -> None:
        self.checkpoint_step.set(step, tags=self.tags)
        self.checkpoint_time.set(time.time(), tags=self.tags)
