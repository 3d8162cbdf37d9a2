"""What a training worker keeps track of between optimizer steps: where it is in the data of the current epoch
(:class:`DataPosition`), the metrics since the last report (:class:`MetricsWindow`), and the sums over all
workers both need (:class:`Reducer`)."""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional

from meddr_ray.progress import report


class Reducer:
    """Sums small vectors over the workers (loss, token counts); one all-reduce per call."""

    def __init__(self):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.device = "cpu"

    def sum(self, values: List[float]) -> List[float]:
        t = self.torch.tensor(values, dtype=self.torch.float64, device=self.device)
        if self.dist.is_initialized():
            self.dist.all_reduce(t)
        return t.tolist()


class DataPosition:
    """Fingerprint of the rows a rank has consumed in the current epoch: a hash of their ids, in order.

    Saved with every checkpoint; a resumed run passes over the same number of micro-batches (their ids only, no
    image decoded: :func:`meddr_ray.stages.train.batches.epoch_batches`) and compares the fingerprint of what it
    passed over, so it knows (and records in the run's events) that it continues exactly where the checkpoint
    left off rather than trusting that the data order repeated. (The driver has already refused a resume on
    other data: this checks the order.)
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.epoch = 0
        self._hash = hashlib.sha1()
        self.consumed = 0

    def new_epoch(self, epoch: int) -> None:
        self.epoch, self._hash, self.consumed = epoch, hashlib.sha1(), 0

    def add(self, ids) -> None:
        """One micro-batch consumed: its row ids, in order."""
        self._hash.update("\x1f".join(str(i) for i in ids).encode() + b"\x1e")
        self.consumed += 1

    def snapshot(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "digest": self._hash.hexdigest()}

    def verify(self, saved: Optional[Dict[str, Any]], epoch: int, skipped: int, reducer: Reducer) -> str:
        """``verified`` when every rank skipped exactly the batches its checkpoint had consumed (collective)."""
        ok = (
            saved is not None
            and saved.get("epoch") == epoch
            and saved.get("consumed") == skipped
            and saved.get("digest") == self._hash.hexdigest()
        )
        bad = int(reducer.sum([0.0 if ok else 1.0])[0])
        if bad:
            report(
                "train",
                f"warning: rank {self.rank} skipped {skipped} batches of epoch {epoch} that differ from the ones its "
                "checkpoint consumed (the data order is not reproducible)"
                if not ok
                else f"warning: {bad} rank(s) resumed at a different data position",
            )
        return "verified" if not bad else f"mismatch on {bad} rank(s)"


class MetricsWindow:
    """Training metrics accumulated between two reports (every ``log_every`` steps)."""

    def __init__(self):
        self.loss = self.micro = self.tokens = self.samples = 0.0
        self.steps = 0
        self.seconds = 0.0

    def add(self, loss: float, tokens: float, samples: int) -> None:
        """One micro-batch trained."""
        self.loss += loss
        self.micro += 1
        self.tokens += tokens
        self.samples += samples

    def metrics(self, reducer: Reducer) -> Dict[str, float]:
        """Means over the window and over all workers (one all-reduce)."""
        loss, micro, tokens, samples = reducer.sum([self.loss, self.micro, self.tokens, self.samples])
        seconds = max(self.seconds, 1e-9)
        return {
            "loss": loss / max(micro, 1),
            "tokens_per_s": tokens / seconds,
            "samples_per_s": samples / seconds,
            "step_time_s": seconds / max(self.steps, 1),
            "steps_in_window": self.steps,
        }
