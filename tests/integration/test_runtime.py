"""The one actor-pool helper every model stage uses (bootstrap, index, evaluate): work reaches every actor."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from meddr_ray.config import ActorPoolConfig
from meddr_ray.stages.runtime import map_with_actor_pool

pytestmark = pytest.mark.integration


def test_an_input_read_as_one_block_feeds_every_actor_of_the_pool(ray_cluster):
    import ray.data

    class WhoAnswers:  # defined here: Ray ships it by value (workers cannot import a test module)
        """Stands for a model actor: takes a while per batch and says which actor answered it."""

        def __init__(self):
            import ray

            self.actor = ray.get_runtime_context().get_actor_id()

        def __call__(self, batch: pa.Table) -> pa.Table:
            time.sleep(0.2)
            return pa.table({"id": batch.column("id"), "actor": [self.actor] * batch.num_rows})

    ds = ray.data.from_items([{"id": i} for i in range(64)], override_num_blocks=1)
    pool = ActorPoolConfig(min_actors=2, max_actors=2, batch_size=8, num_cpus=0.5)
    rows = map_with_actor_pool(ds, WhoAnswers, pool).take_all()
    assert sorted(r["id"] for r in rows) == list(range(64))  # every row once
    assert len({r["actor"] for r in rows}) == 2  # both actors worked
