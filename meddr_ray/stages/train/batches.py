"""A training worker's micro-batches of one epoch, in a deterministic order, from a saved position on."""

from __future__ import annotations

from meddr_ray.config import TrainConfig
from meddr_ray.stages.train.state import DataPosition


def epoch_batches(shard, t: TrainConfig, epoch: int, rank: int, skip: int, collate, position: DataPosition):
    """This rank's micro-batches of ``epoch`` as ``(ids, collated batch)``, from micro-batch ``skip`` on.

    The rows come from Ray Data as plain arrays (image bytes undecoded); the first ``skip`` micro-batches, which
    a checkpoint already trained on, are passed over by their ids alone (hashed into ``position``): no image is
    decoded and nothing collated to seek the position. The order is deterministic (``preserve_order`` ingest, a
    local shuffle seeded by seed, epoch and rank), so the position is a count of micro-batches. The others are
    collated one batch ahead in a background thread, while the current one trains.
    """
    rows = iter(
        shard.iter_batches(
            batch_size=t.micro_batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=t.shuffle_buffer_size or None,
            local_shuffle_seed=(t.seed * 1_000_003 + epoch * 7919 + rank) if t.shuffle_buffer_size else None,
        )
    )
    for _ in range(skip):  # now, not on the first next(): the caller checks the position before training
        batch = next(rows, None)
        if batch is None:
            return iter(())
        position.add(batch["id"])
    return _collated_ahead(rows, collate)


def _collated_ahead(rows, collate):
    """``(ids, collate(batch))`` for each batch of ``rows``, the next one collated in a thread meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate") as pool:
        batch = next(rows, None)
        pending = pool.submit(collate, batch) if batch is not None else None
        while pending is not None:
            ids = batch["id"]
            batch = next(rows, None)
            ready = pending.result()
            pending = pool.submit(collate, batch) if batch is not None else None
            yield ids, ready
