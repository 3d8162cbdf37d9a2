"""The whole MedDr recipe as one job: bootstrap -> instruct -> train -> index -> evaluate.

With ``train.rag_context_fraction`` > 0 the index is built before training (bootstrap -> instruct -> index ->
train -> evaluate): training reads retrieved labels from it, and the student's vision tower stays frozen, so the
index's keys are the trained student's too (:func:`steps_for`).

Each step is the same library function the per-stage CLI commands call, and each reads only what earlier steps
wrote. ``<run_dir>/pipeline.json`` records every finished step with a fingerprint of what it was built from (its
config sections and the fingerprint of the step before it) and a signature of its output (every file's relative
path and size), written after each step; a step's record (and every later one's) is dropped from it before the
step starts, so a run killed during a step never leaves a record claiming that step, or one built on its old
output, finished. A finished step is reused only while its output is as it left it: a stage command run on its
own in the same folder since (``meddr-ray evaluate`` with other settings, killed or not) makes it run again.
Running the pipeline again reuses a finished step whose fingerprint still matches and whose output is unchanged; a
step that runs again makes every later step run again too. An interrupted pipeline is resumed by running it
again: finished steps are reused, and the interrupted step resumes itself (bootstrap skips the ids it wrote,
training continues from its last checkpoint, evaluation skips the rows it answered). ``fresh=True``
(``--fresh``) deletes the run first.

One pipeline (or demo) at a time per local run folder: :func:`~meddr_ray.storage.run_lock` holds an exclusive ``flock`` on
``<run_dir>/.lock`` for the whole run (the kernel releases it when the process dies, even by SIGKILL, so it is
never stale); a second one stops with :class:`RunBusyError`. The evaluate stage holds the same lock on its output
folder. Runs on ``s3://`` / ``gs://`` are not locked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from meddr_ray import storage
from meddr_ray.storage import LOCK_FILE, run_lock
from meddr_ray.config import Config, save_config
from meddr_ray.layout import RunLayout
from meddr_ray.progress import report
from meddr_ray.stages.registry import PIPELINE_STEPS, STAGES, StageNotBuilt, StageResult
from meddr_ray.stages.runtime import init_ray

log = logging.getLogger("meddr_ray.stages.pipeline")

Step = Tuple[str, Tuple[str, ...]]
"""A pipeline step: the stage's name and the config sections its output depends on."""
STEPS = list(PIPELINE_STEPS)


def steps_for(cfg: Config) -> List[Step]:
    """The steps in the order this config runs them, each with the sections its output depends on: the index
    moves before training when training reads retrieved labels from it (and training then depends on ``rag``)."""
    default = [(name, STAGES[name].depends_on) for name in PIPELINE_STEPS]
    if not cfg.train.rag_context_fraction:
        return default
    by_name = dict(default)
    return [
        ("bootstrap", by_name["bootstrap"]),
        ("instruct", by_name["instruct"]),
        ("index", ("student",) + by_name["index"]),  # the encoder no longer comes via train
        ("train", by_name["train"] + ("rag",)),
        ("evaluate", by_name["evaluate"]),
    ]


def _resolve(step: str) -> Optional[Callable[[Config], StageResult]]:
    try:
        return STAGES[step].load()
    except StageNotBuilt:
        return None


def step_fingerprints(cfg: Config) -> Dict[str, str]:
    """Each step's fingerprint: its config sections chained to the step before it, so a change to the teacher
    invalidates everything after bootstrap, and a change to ``evaluate`` only the evaluation. Files shipped in the
    package (``${pkg:...}``) count by their place in it, not by where the package lives: each ``ray job submit``
    unpacks the working dir into a folder named by its contents, so an edit anywhere in the checkout would
    otherwise make a resubmitted pipeline redo every step."""
    from meddr_ray import config as config_module

    package_dir = str(config_module.PACKAGE_DIR)
    out: Dict[str, str] = {}
    previous = ""
    for step, sections in steps_for(cfg):
        values = {s: getattr(cfg, s) for s in sections}
        blob = json.dumps(
            {s: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for s, v in values.items()},
            sort_keys=True,
            default=str,
        ).replace(package_dir, "<meddr_ray package>")
        previous = hashlib.sha256(f"{previous}\x1f{blob}".encode()).hexdigest()[:16]
        out[step] = previous
    return out


def output_signature(path: str) -> Optional[str]:
    """What a step's output holds: a hash of every file's path (relative to it) and size; None when it is gone.
    Sizes, not times: a copied run folder is still the same run."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return None
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    entries = sorted(
        (os.path.relpath(i.path, root), i.size)
        for i in infos
        if i.type == pafs.FileType.File and i.base_name != LOCK_FILE and ".tmp-" not in i.base_name
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def load_summary(run_dir: str) -> Dict[str, Any]:
    """``pipeline.json`` of a run ({} when there is none or it is unreadable or not of this shape: then nothing is
    reused, and every step resumes from what it finds on disk)."""
    path = RunLayout(run_dir, {}).pipeline_summary
    if not storage.exists(path):
        return {}
    try:
        summary = json.loads(storage.read_text(path))
    except (ValueError, OSError) as exc:
        summary, why = None, str(exc)
    else:
        why = "not a pipeline summary"
    steps = summary.get("steps") if isinstance(summary, dict) else None
    if not isinstance(steps, dict) or not all(isinstance(r, dict) for r in steps.values()):
        report("pipeline", f"ignoring unreadable {path} ({why}): no step is reused")
        return {}
    return summary


def remove_run(run_dir: str) -> None:
    """Delete the run folder's contents (not the lock this process holds on it)."""
    if not storage.exists(run_dir):
        return
    report("pipeline", f"--fresh: removing {run_dir}")
    if "://" in run_dir:
        storage.remove(run_dir)
        return
    for name in os.listdir(run_dir):
        if name != LOCK_FILE:
            storage.remove(os.path.join(run_dir, name))


def run_pipeline(cfg: Config, steps: Optional[List[str]] = None, fresh: bool = False) -> StageResult:
    """Run the steps in order (all, or those named in ``steps``), reusing finished ones; returns the run folder
    and the summary written to ``pipeline.json``."""
    unknown = sorted(set(steps or []) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown pipeline step(s) {unknown}: choose from {STEPS}")
    with run_lock(cfg.run_dir):
        return _run_steps(cfg, steps, fresh)


def _run_steps(cfg: Config, steps: Optional[List[str]], fresh: bool) -> StageResult:
    if fresh:
        remove_run(cfg.run_dir)
    init_ray(cfg)
    save_config(cfg, cfg.run_dir)
    previous = load_summary(cfg.run_dir).get("steps", {})
    fingerprints = step_fingerprints(cfg)
    records: Dict[str, Dict[str, Any]] = {}
    missing: List[str] = []
    rerun_downstream = False
    total = len([s for s in STEPS if not steps or s in steps])
    position = 0
    for step, _ in steps_for(cfg):
        if steps and step not in steps:
            if step in previous and not rerun_downstream:  # a step that ran before it made its output stale
                records[step] = previous[step]
            continue
        position += 1
        where = f"{position}/{total} {step}"
        func = _resolve(step)
        if func is None:
            missing.append(step)
            report("pipeline", f"{where}: not built yet, skipped")
            continue
        done = previous.get(step)
        if not rerun_downstream and _reusable(done, fingerprints[step]):
            records[step] = {**done, "reused": True}
            report("pipeline", f"{where}: reused (finished {done.get('finished')}) -> {done['output']}")
            continue
        # From here until it returns, this step (and every later one) is not finished: a kill now must not leave
        # the old record behind, or a later run with that old config would reuse a half-rewritten output.
        _write_summary(cfg, records, missing)
        # training whose input or settings changed since its checkpoints were made starts over (they are moved
        # aside) instead of being refused (train.restart)
        restart = step == "train" and (rerun_downstream or bool(done and done.get("fingerprint") != fingerprints[step]))
        records[step] = _run_step(cfg, step, func, where, fingerprints[step], restart)
        rerun_downstream = True  # later steps read this output: they must not reuse what they built before
        _write_summary(cfg, records, missing)
    summary = _write_summary(cfg, records, missing)
    report("pipeline", f"finished: {json.dumps({k: summary[k] for k in ('run_dir', 'outputs', 'seconds')})}")
    return StageResult(cfg.run_dir, summary)


def _reusable(done: Optional[Dict[str, Any]], fingerprint: str) -> bool:
    """A finished step's record still describes its output: same inputs, and the output as the step left it."""
    return bool(
        done
        and done.get("fingerprint") == fingerprint
        and done.get("output")
        and done.get("signature") is not None
        and done.get("signature") == output_signature(done["output"])
    )


def _run_step(cfg: Config, step: str, func: Callable[[Config], StageResult], where: str, fingerprint: str,
              restart: bool) -> Dict[str, Any]:  # fmt: skip
    """Run one step; its record for ``pipeline.json``."""
    report("pipeline", f"{where}: starting")
    start = time.time()
    if restart:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, restart=True))
    result = func(cfg)
    record = {
        "output": result.path,
        "seconds": round(time.time() - start, 1),
        "fingerprint": fingerprint,
        "signature": output_signature(result.path) if result.path else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reused": False,
    }
    for line in result.headline.splitlines():
        report("pipeline", line)
    report("pipeline", f"{where}: done in {record['seconds']} s -> {result.path}")
    return record


def _write_summary(cfg: Config, records: Dict[str, Dict[str, Any]], missing: List[str]) -> Dict[str, Any]:
    summary = {
        "run_dir": cfg.run_dir,
        "steps": records,
        "outputs": {s: r["output"] for s, r in records.items()},
        "seconds": {s: r["seconds"] for s, r in records.items() if not r.get("reused")},
        "not_built": missing,
    }
    storage.write_text(cfg.layout.pipeline_summary, json.dumps(summary, indent=2))
    return summary
