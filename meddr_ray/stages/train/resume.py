"""Whether a training run may resume the checkpoints already under ``<checkpoints_root>/<train.name>``: checked on
the driver before any Ray work.

A run is described by the student, the training settings that shape what it computes and the instruction mix
(:func:`run_description`); checkpoints record that description, so a later run resumes only checkpoints of the
same run and otherwise names what changed. ``train.restart`` moves old checkpoints aside instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Dict, List, Optional

from meddr_ray import storage
from meddr_ray.config import Config, ConfigError
from meddr_ray.progress import report
from meddr_ray.stages.instruct import PublishedMix
from meddr_ray.stages.train.checkpoint import STATE_FILE
from meddr_ray.storage import is_uri

def latest_checkpoint_state(experiment: str) -> Optional[dict]:
    """``state.json`` of the newest checkpoint folder of a previous run, or None (checked before starting)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(experiment)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    folders = sorted(
        info.path
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=False))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_step")
    )
    for folder in reversed(folders):
        state_file = f"{folder}/{STATE_FILE}"
        if fs.get_file_info(state_file).type == pafs.FileType.File:
            with fs.open_input_stream(state_file) as f:
                return json.loads(f.read().decode("utf-8"))
    return None


# Train settings that do not change what a run computes (a run resumed with other values of these is the same
# run); max_steps and epochs too: a longer run continues the one it extends.
_OPERATIONAL = ("name", "storage_path", "adapter_dir", "max_failures", "keep_checkpoints", "log_every",
                "checkpoint_every", "merge_lora", "cache_data", "cpus_per_worker", "max_steps", "epochs",
                "num_workers", "restart")  # fmt: skip  (another worker count: check_worker_count)


class TrainResumeError(ConfigError):
    """Checkpoints under ``train.name`` were made from other data, another student or other settings."""


def run_description(cfg: Config, mix: PublishedMix) -> Dict[str, Any]:
    """What a training run computes from: the student, the training settings that shape it, and the instruction
    mix (its version, files with sizes, rows per split, fingerprint). Checkpoints carry it, so a later run can
    name what differs."""
    from dataclasses import asdict as plain

    root = mix.path.rstrip("/")
    return {
        "student": plain(cfg.student),
        "train": {k: v for k, v in plain(cfg.train).items() if k not in _OPERATIONAL},
        "data": {
            "version": mix.version,
            "files": [[f[len(root):].lstrip("/"), size] for f, size in zip(mix.files, mix.sizes)],
            "rows": mix.rows,
            "fingerprint": mix.fingerprint,
        },
    }


def run_identity(description: Dict[str, Any]) -> str:
    """A short hash of :func:`run_description` (the student, the shaping settings and the data's fingerprint)."""
    key = {"student": description["student"], "train": description["train"],
           "data": description["data"]["fingerprint"]}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _changed_keys(section: str, old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if json.dumps(old.get(k), sort_keys=True, default=str) != json.dumps(new.get(k), sort_keys=True,
                                                                                  default=str)]  # fmt: skip


def _data_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    out = []
    if old.get("version") != new.get("version"):
        out.append(f"instruction mix version {old.get('version')} -> {new.get('version')}")
    before, after = dict(map(tuple, old.get("files", []))), dict(map(tuple, new.get("files", [])))
    for what, names in (("files removed", sorted(set(before) - set(after))),
                        ("files added", sorted(set(after) - set(before))),
                        ("files changed in size", sorted(n for n in set(before) & set(after) if before[n] != after[n]))):
        if names:
            out.append(f"{what}: {', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''}")
    if old.get("rows") != new.get("rows"):
        out.append(f"rows per split {old.get('rows')} -> {new.get('rows')}")
    out.append(f"fingerprint {old.get('fingerprint')} -> {new.get('fingerprint')}")
    return out


def what_changed(previous: Dict[str, Any], description: Dict[str, Any]) -> List[str]:
    """What differs between the run that wrote ``previous`` (a checkpoint's state) and this one, one item each."""
    old = previous.get("description")
    if not old:
        return [f"the checkpoints record no description (run {previous.get('identity') or 'unrecorded'}, written "
                "by an earlier release); this run is " + run_identity(description)]  # fmt: skip
    out = _changed_keys("student", old["student"], description["student"])
    out += _changed_keys("train", old["train"], description["train"])
    if old["data"].get("fingerprint") != description["data"]["fingerprint"]:
        out += _data_changes(old["data"], description["data"])
    return out


def check_resume(experiment: str, previous: Optional[dict], description: Dict[str, Any], restart: bool) -> None:
    """Before any Ray work: resume checkpoints of this same run; with ``restart`` move them aside (kept, never
    deleted) so the run starts from step 0; otherwise refuse checkpoints of other data, student or settings,
    naming what changed."""
    if restart:
        # a file:// URI is a local or mounted filesystem, which moves folders; object stores cannot
        if storage.exists(experiment) and is_uri(experiment) and storage.resolve(experiment)[0].type_name != "local":
            raise TrainResumeError(
                f"key 'train.restart': {experiment} is on an object store, which cannot move a folder aside: delete "
                "it, or use another train.name, to start over"
            )
        if storage.exists(experiment):
            aside = f"{experiment}.replaced-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
            storage.move(experiment, aside)
            report("train", f"train.restart: the checkpoints in {experiment} moved to {aside}; training starts from "
                               "step 0")  # fmt: skip
        return
    if not previous or previous.get("identity") == run_identity(description):
        return
    changes = "\n  - ".join(what_changed(previous, description))
    raise TrainResumeError(
        f"key 'train.restart': the checkpoints in {experiment} (step {previous.get('step')}) were made from other "
        f"data, student or settings, so this run cannot resume them:\n  - {changes}\nSet train.restart=true to "
        "start over (they are moved aside, not deleted), use another train.name, or restore what changed"
    )


def check_worker_count(experiment: str, previous: Optional[dict], num_workers: int) -> None:
    """ZeRO partitions are per rank: checkpoints of ``previous`` resume only on as many workers as wrote them."""
    if previous and previous.get("world_size", num_workers) != num_workers:
        raise ConfigError(
            f"key 'train.num_workers': run {experiment} was checkpointed by {previous['world_size']} workers and "
            f"its ZeRO partitions cannot be resumed by {num_workers}; use train.num_workers="
            f"{previous['world_size']}, or a new train.name to start a new run"
        )
