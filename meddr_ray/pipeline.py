"""The whole MedDr recipe as one job: bootstrap -> instruct -> train -> index -> evaluate.

Each step is the same library function the per-stage CLI commands call, and each reads only what earlier steps
wrote, so a failed or interrupted pipeline is resumed by running it again: bootstrap skips the ids it already
wrote, training resumes from its last checkpoint, and the other steps are cheap to redo.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

from meddr_ray import storage
from meddr_ray.config import Config, join_path, save_config
from meddr_ray.runtime import init_ray

log = logging.getLogger("meddr_ray.pipeline")

# step -> (module, function). Evaluation is optional until its module exists.
PIPELINE: List[Tuple[str, str, str]] = [
    ("bootstrap", "meddr_ray.bootstrap", "run_bootstrap"),
    ("instruct", "meddr_ray.instruct", "run_instruct"),
    ("train", "meddr_ray.train", "run_train"),
    ("index", "meddr_ray.index", "run_index"),
    ("evaluate", "meddr_ray.evaluate", "run_evaluate"),
]


def _resolve(module_name: str, func_name: str) -> Optional[Callable]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    return getattr(module, func_name, None)


def run_pipeline(cfg: Config, steps: Optional[List[str]] = None) -> str:
    """Run every built step in order; returns the run folder. Steps not built yet are reported and skipped."""
    init_ray(cfg)
    save_config(cfg, cfg.run_dir)
    timings: Dict[str, float] = {}
    outputs: Dict[str, str] = {}
    missing: List[str] = []
    for step, module_name, func_name in PIPELINE:
        if steps and step not in steps:
            continue
        func = _resolve(module_name, func_name)
        if func is None:
            missing.append(step)
            print(f"[pipeline] {step}: not built yet, skipped", flush=True)
            continue
        print(f"[pipeline] {step}: starting", flush=True)
        start = time.time()
        outputs[step] = func(cfg)
        timings[step] = round(time.time() - start, 1)
        print(f"[pipeline] {step}: done in {timings[step]} s -> {outputs[step]}", flush=True)
    summary = {"run_dir": cfg.run_dir, "outputs": outputs, "seconds": timings, "not_built": missing}
    storage.write_text(join_path(cfg.run_dir, "pipeline.json"), json.dumps(summary, indent=2))
    print(f"[pipeline] finished: {json.dumps(summary)}", flush=True)
    return cfg.run_dir


def run_demo(cfg: Config) -> str:
    """The README's main job: the pipeline on the demo preset (SmolLM2 teacher, tiny student, BreastMNIST)."""
    return run_pipeline(cfg)
