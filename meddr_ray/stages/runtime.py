"""Connecting to Ray the same way from the CLI, the job scripts and the tests."""

from __future__ import annotations

import json
import logging
import os

from meddr_ray.config import Config

log = logging.getLogger("meddr_ray")

# Environment every Ray worker of this project gets: where offline-built models live, and DeepSpeed's CPU backend
# when there is no GPU (DeepSpeed otherwise probes for CUDA and fails on CPU-only nodes).
_FORWARDED_ENV = ("MEDDR_RAY_CACHE", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def worker_env() -> dict:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    return env


def _job_env_vars() -> set:
    """Environment variables the submitted job's own runtime env sets (``ray job submit --runtime-env``): Ray
    refuses a driver that sets any of them again, even to the same value, so those are left to the job."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not injected:
        return set()
    return set(((json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}))


def init_ray(cfg: Config):
    """Join ``ray.address`` / ``RAY_ADDRESS`` if given (a cluster, or inside ``ray job submit``), else start a
    local cluster with ``ray.num_cpus`` logical CPUs. Idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    taken = _job_env_vars()
    env = {k: v for k, v in worker_env().items() if k not in taken}
    kwargs = dict(runtime_env={"env_vars": env}, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
    return ray


def map_with_actor_pool(ds, actor_class, pool, **constructor_kwargs):
    """``ds.map_batches`` through a pool of ``actor_class`` actors, each constructed once with
    ``constructor_kwargs`` (a model loaded per actor, not per batch), sized and resourced by ``pool`` (an
    :class:`~meddr_ray.config.ActorPoolConfig`): the one way the teacher, the encoder and the student run on Ray
    Data. Batches arrive as pyarrow tables."""
    import warnings

    import ray.data

    # One block per model batch (streaming, no shuffle): the pool hands out blocks, so an input read as one block
    # would feed one actor and leave the others idle however many the pool holds.
    ds = ds.repartition(target_num_rows_per_block=pool.batch_size)
    with warnings.catch_warnings():
        # Ray 2.60 marks extra **ray_remote_args deprecated but has no named parameter yet for the actors'
        # max_restarts / max_task_retries (its own ActorPoolMapOperator documents passing them this way).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            actor_class,
            fn_constructor_kwargs=constructor_kwargs,
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=max(pool.min_actors, pool.max_actors)),
            batch_size=pool.batch_size,
            batch_format="pyarrow",
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            max_restarts=pool.max_restarts,
            max_task_retries=pool.max_task_retries,
        )
