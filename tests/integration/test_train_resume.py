"""A resumed epoch seeks its data position by row count: the micro-batches a checkpoint already trained on are
passed over by their ids, without decoding an image or collating a batch (``meddr_ray.stages.train.batches.epoch_batches``)."""

from __future__ import annotations

import pytest

from meddr_ray.config import TrainConfig
from meddr_ray.stages.train.batches import epoch_batches
from meddr_ray.stages.train.state import DataPosition

pytestmark = pytest.mark.integration


class _CountingCollate:
    """Stands in for the collator (which decodes every image of a batch): records the ids of each batch it gets."""

    def __init__(self):
        self.calls = []

    def __call__(self, batch):
        self.calls.append(list(batch["id"]))
        return {"n": len(batch["id"])}


def test_a_resumed_epoch_skips_rows_without_collating_them(ray_cluster):
    ds = ray_cluster.data.from_items([{"id": f"row-{i:03d}", "image": bytes([i]) * 64} for i in range(40)])
    t = TrainConfig(micro_batch_size=4, shuffle_buffer_size=8, seed=3)

    whole, collate = DataPosition(0), _CountingCollate()
    uninterrupted = [ids.tolist() for ids, _ in epoch_batches(ds.iterator(), t, 1, 0, 0, collate, whole)]
    assert len(uninterrupted) == 10 and len(collate.calls) == 10
    trained_before = DataPosition(0)
    for ids in uninterrupted[:3]:
        trained_before.add(ids)

    resumed, collate = DataPosition(0), _CountingCollate()
    rest = [ids.tolist() for ids, _ in epoch_batches(ds.iterator(), t, 1, 0, 3, collate, resumed)]
    assert rest == uninterrupted[3:]  # the same order: the position is a count of micro-batches
    assert collate.calls == uninterrupted[3:]  # the 3 trained batches were never collated (no image decoded)
    # what it passed over hashes like what the checkpoint consumed: the position is verified
    assert resumed.snapshot() == trained_before.snapshot()
