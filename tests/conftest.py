"""Shared fixtures: real data paths, the tiny model (built once per session) and one local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

# Keep the offline-built models of the test session out of the user's cache, but share them between tests.
os.environ.setdefault("MEDDR_RAY_CACHE", str(ROOT / ".cache" / "test"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (expected ../shared/data next to the project)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (starting one costs ~10 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,  # logical CPUs: lets a 2-actor pool and the driver's tasks coexist on 2 cores
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"MEDDR_RAY_CACHE": os.environ["MEDDR_RAY_CACHE"], "DS_ACCELERATOR": "cpu"}},
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    # left running until the interpreter exits: other session fixtures may still use it


@pytest.fixture(scope="session")
def tiny_index_run(ray_cluster, tmp_path_factory):
    """A tiny-preset run with a published index (BreastMNIST train + val, base student, no adapter), built once
    per session for the tests that query a run: evaluation and the Serve application. Tests must not change it;
    those that add versions or adapters copy the run first (``shutil.copytree(cfg.run_dir, ...)``)."""
    from meddr_ray.config import load_config
    from meddr_ray.stages.index import run_index

    cfg = load_config("tiny", [f"run_dir={tmp_path_factory.mktemp('tiny-index-run') / 'run'}"])
    run_index(cfg)
    return cfg
