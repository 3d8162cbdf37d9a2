"""Medical instruction tuning (paper section 3.2) on Ray Train: LoRA on the student with DeepSpeed ZeRO-3.

``run_train(cfg)`` reads the instruction Parquet written by ``meddr-ray instruct`` (``<run_dir>/instruct``: rows
``id, image, prompt, answer, split, ...``), starts a ``TorchTrainer`` (Ray Train V2) with
``cfg.train.num_workers`` workers, each running :func:`meddr_ray.stages.train.loop.train_loop_per_worker`, and writes
the LoRA adapter to ``<run_dir>/adapter/`` (PEFT format + ``meddr.json``).

Resume: checkpoints live under ``<storage_path>/<name>/`` (``train.storage_path``, default ``<run_dir>/train``).
Ray Train V2 keeps a snapshot of the run's checkpoints there; a new ``TorchTrainer`` with the same storage path
and name loads it, so ``ray.train.get_checkpoint()`` in the workers returns the latest checkpoint and training
continues from its step (V2 has no ``resume_from_checkpoint`` argument: the run name is the handle). A worker
that dies mid-run makes Ray Train restart the worker group (``train.max_failures`` times), which resumes the
same way. Use a new ``train.name`` (or delete the folder) to start over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional

from meddr_ray import storage
from meddr_ray.progress import report
from meddr_ray.stages.registry import StageResult
from meddr_ray.config import Config, ConfigError, save_config
from meddr_ray.storage import is_uri, join_path
from meddr_ray.stages.instruct import MixNotFoundError, PublishedMix, published_mix
from meddr_ray.stages.train.loop import ADAPTER_SUBDIR, STATE_FILE, Plan, make_plan, train_loop_per_worker

log = logging.getLogger("meddr_ray.stages.train.stage")

INSTRUCT_COLUMNS = ["id", "image", "prompt", "answer", "split"]


class TrainDataError(FileNotFoundError):
    """The instruction data is missing or unusable; the message names the folder."""


def storage_root(cfg: Config) -> str:
    """Where Ray Train keeps this run's checkpoints: ``train.storage_path`` or ``<run_dir>/train``."""
    return cfg.layout.checkpoints_root


def adapter_dir(cfg: Config) -> str:
    return cfg.layout.adapter_dir


def instruction_mix(cfg: Config) -> PublishedMix:
    """The published instruction mix the run trains on (:func:`meddr_ray.stages.instruct.published_mix`)."""
    try:
        return published_mix(cfg.layout.instruct_dir)
    except MixNotFoundError as exc:
        raise TrainDataError(
            f"no instruction data: {exc}. Run `meddr-ray instruct --config {cfg.preset}` first (or point "
            "instruct.output_dir at the folder)"
        ) from None


def instruction_files(cfg: Config) -> List[str]:
    return instruction_mix(cfg).files


def _split_counts(mix: PublishedMix) -> Dict[str, int]:
    """Rows per split: from the mix's manifest, or (a plain folder of Parquet files) from the ``split`` column
    alone, one file at a time (the driver never reads the images)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if mix.rows:
        return dict(mix.rows)
    counts: Dict[str, int] = {}
    for path in mix.files:
        fs, p = storage.resolve(path)
        table = pq.read_table(p, columns=["split"], filesystem=fs)
        for item in pc.value_counts(table.column("split")).to_pylist():
            key = item["values"] if item["values"] is not None else "null"
            counts[key] = counts.get(key, 0) + int(item["counts"])
    return counts


def _check_columns(files: List[str]) -> None:
    import pyarrow.parquet as pq

    for path in files:
        fs, p = storage.resolve(path)
        names = set(pq.read_schema(fs.open_input_file(p)).names)
        missing = [c for c in INSTRUCT_COLUMNS if c not in names]
        if missing:
            raise TrainDataError(f"{path}: instruction Parquet lacks column(s) {missing} (has {sorted(names)})")


CONTEXT_COLUMNS = ["task", "dataset", "source_id"]  # what train.rag_context_fraction needs besides


def _retrieval_context(cfg: Config) -> Optional[Dict[str, Any]]:
    """Arguments of :class:`meddr_ray.retrieval.rag.TrainingContext` for ``train.rag_context_fraction`` (None when 0): the
    run's index, its version pinned, checked to be the student's."""
    from meddr_ray.retrieval.store import published_manifest

    if not cfg.train.rag_context_fraction:
        return None
    index_dir = cfg.layout.index_dir
    manifest = published_manifest(index_dir, f"train (train.rag_context_fraction={cfg.train.rag_context_fraction})",
                                  " (the pipeline builds it before training then)")  # fmt: skip
    if manifest.get("model_path") != cfg.student.path:
        raise ConfigError(
            f"key 'train.rag_context_fraction': index version {manifest['version']} at {index_dir} was built with "
            f"the vision encoder of {manifest.get('model_path')}, not of the student {cfg.student.path}: rebuild "
            "it with `meddr-ray index`"
        )
    return {"index_dir": index_dir, "version": manifest["version"], "rag": cfg.rag,
            "fraction": cfg.train.rag_context_fraction}  # fmt: skip


def _datasets(files: List[str], counts: Dict[str, int], cache_data: bool, context: Optional[Dict[str, Any]] = None):
    import ray.data
    from ray.data.expressions import col

    from meddr_ray.config import ActorPoolConfig
    from meddr_ray.retrieval.rag import TrainingContext
    from meddr_ray.stages.runtime import map_with_actor_pool

    ds = ray.data.read_parquet(files, columns=INSTRUCT_COLUMNS + (CONTEXT_COLUMNS if context else []))
    train = ds.filter(expr=col("split") == "train")
    if context:  # one actor holds the index; the prompts of the picked diagnosis rows get retrieved labels
        pool = ActorPoolConfig(min_actors=1, max_actors=1, batch_size=256, num_cpus=0.5)
        train = map_with_actor_pool(train, TrainingContext, pool, **context).drop_columns(CONTEXT_COLUMNS)
        ds = ds.drop_columns(CONTEXT_COLUMNS)
    out = {"train": train.drop_columns(["split"])}
    if counts.get("val", 0):
        out["val"] = ds.filter(expr=col("split") == "val").drop_columns(["split"])
    for name, split in out.items():
        if cache_data:  # read once; every epoch and validation pass then iterates blocks already in memory
            split = out[name] = split.materialize()
        split.context.enable_progress_bars = False  # one bar per epoch and per evaluation would flood the log
    return out


def _latest_checkpoint_state(experiment: str) -> Optional[dict]:
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


def _copy_tree(src: str, dst: str) -> None:
    """Copy a local folder to a local path or a URI, replacing what is there."""
    if is_uri(dst):
        import pyarrow.fs as pafs

        fs, p = storage.resolve(dst)
        if storage.exists(dst):
            fs.delete_dir(p)
        fs.create_dir(p, recursive=True)  # copy_files makes sub-folders only: a flat folder needs its root
        pafs.copy_files(src, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _merge_task(cfg: Config, adapter: str, target: str) -> str:
    """Base model + LoRA merged into one full checkpoint (runs as a Ray task: it loads the whole model)."""
    from meddr_ray.model import load_model
    from meddr_ray.model.internvl import load_processor

    vlm = load_model(cfg.student, adapter_dir=adapter)  # loads the adapter and merges it into the weights
    with tempfile.TemporaryDirectory() as tmp:
        vlm.model.save_pretrained(tmp)
        load_processor(vlm.path, cfg.student.trust_remote_code).save_pretrained(tmp)
        _copy_tree(tmp, target)
    return target


# Train settings that do not change what a run computes (a run resumed with other values of these is the same
# run); max_steps and epochs too: a longer run continues the one it extends.
_OPERATIONAL = ("name", "storage_path", "adapter_dir", "max_failures", "keep_checkpoints", "log_every",
                "checkpoint_every", "merge_lora", "cache_data", "cpus_per_worker", "max_steps", "epochs",
                "num_workers", "restart")  # fmt: skip  (another worker count is refused by name below)


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


def run_train(cfg: Config) -> StageResult:
    """Fine-tune the student with LoRA on the instruction data; returns the adapter folder."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from meddr_ray.model import ensure_model
    from meddr_ray.stages.runtime import init_ray

    t = cfg.train
    mix = instruction_mix(cfg)
    files = mix.files
    _check_columns(files)
    counts = _split_counts(mix)
    if not counts.get("train"):
        raise TrainDataError(f"{cfg.layout.instruct_dir}: no rows with split == 'train' (splits: {counts})")
    plan = make_plan(t, counts["train"])
    model_path = str(ensure_model(cfg.student))  # an offline build happens once, here, not in every worker

    context = _retrieval_context(cfg)  # the index it needs checked before any Ray work
    root = storage_root(cfg)
    description = run_description(cfg, mix)
    identity = run_identity(description)
    check_resume(join_path(root, t.name), _latest_checkpoint_state(join_path(root, t.name)), description, t.restart)
    previous = _latest_checkpoint_state(join_path(root, t.name))
    if previous and previous.get("world_size", t.num_workers) != t.num_workers:
        raise ConfigError(
            f"key 'train.num_workers': run {join_path(root, t.name)} was checkpointed by {previous['world_size']} "
            f"workers and its ZeRO partitions cannot be resumed by {t.num_workers}; use train.num_workers="
            f"{previous['world_size']}, or a new train.name to start a new run"
        )
    init_ray(cfg)
    status_dir = None if is_uri(root) else os.path.join(root, t.name, "workers")
    report(
        "train",
        f"{counts['train']} train / {counts.get('val', 0)} val rows from {len(files)} file(s); "
        f"{t.num_workers} workers, ZeRO-{t.zero_stage}, {t.precision}; {plan.total_steps} steps "
        f"({plan.steps_per_epoch} per epoch); checkpoints in {join_path(root, t.name)}",
    )
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same order every time: a resumed epoch can skip what it already trained on
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "plan": asdict(plan),
            "model_path": model_path,
            "identity": identity,
            "description": description,
            "status_dir": status_dir,
            "has_val": bool(counts.get("val")),
        },
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            storage_path=root,
            name=t.name,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
        datasets=_datasets(files, counts, t.cache_data, context),
        dataset_config=DataConfig(execution_options=ingest),
    )
    started = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {join_path(root, t.name)}")

    out = adapter_dir(cfg)
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        _copy_tree(os.path.join(folder, ADAPTER_SUBDIR), out)
    final = _final_metrics(state["history"])
    meta = {
        "base_model": {"name": cfg.student.name, "path": model_path},
        "data": {"path": cfg.layout.instruct_dir, "version": mix.version, "fingerprint": mix.fingerprint,
                 "files": files, "rows": counts},
        "config_fingerprint": cfg.fingerprint(),
        "preset": cfg.preset,
        "plan": asdict(plan),
        "checkpoint": result.checkpoint.path,
        "final_metrics": final,
        "history": state["history"],
        "events": state["events"],
        "workers": state.get("workers", []),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_text(join_path(out, "meddr.json"), json.dumps(meta, indent=2))
    save_config(cfg, out, "config.yaml")
    if t.merge_lora:
        merged = cfg.layout.merged_dir
        ray.get(ray.remote(_merge_task).options(num_cpus=1).remote(cfg, out, merged))
        report("train", f"merged model: {merged}")
    return StageResult(out, meta, _summary_text(state, plan, final, out, time.time() - started))


def _final_metrics(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    steps = [h for h in history if "loss" in h]
    vals = [h for h in history if h.get("val_loss") is not None]
    final: Dict[str, Any] = {}
    if steps:
        final.update({k: steps[-1][k] for k in ("step", "epoch", "loss", "lr")})
        final["tokens_per_s_mean"] = sum(h["tokens_per_s"] for h in steps) / len(steps)
    if vals:
        final["val_loss"] = vals[-1]["val_loss"]
        final["val_loss_first"] = vals[0]["val_loss"]
    return final


def _summary_text(state: Dict[str, Any], plan: Plan, final: Dict[str, Any], out: str, seconds: float) -> str:
    resumes = [e for e in state["events"] if e.get("resumed")]
    lines = [
        f"[train] done: step {state['step']}/{plan.total_steps}, epoch {state['epoch']}, {seconds:.0f} s",
        f"[train]   loss {final.get('loss', float('nan')):.4f}"
        + (
            f", val_loss {final['val_loss_first']:.4f} -> {final['val_loss']:.4f}"
            if "val_loss" in final
            else ", no validation split"
        ),
        f"[train]   resumed {len(resumes)} time(s)"
        + (
            " (" + "; ".join(f"from step {e['start_step']}, data position {e.get('data_position', 'epoch start')}"
                             for e in resumes) + ")"
            if resumes
            else ""
        ),
        f"[train]   adapter: {out}",
    ]
    for w in state.get("workers", []):
        lines.append(
            f"[train]   rank {w['rank']}: peak RSS {w['peak_rss_mb']:.0f} MB, parameters {w['param_mb']:.2f} MB, "
            f"optimizer state {w['optimizer_mb']:.2f} MB"
        )
    return "\n".join(line.replace("[train] ", "", 1) for line in lines)


def read_adapter_meta(folder: str) -> Optional[dict]:
    """``meddr.json`` of an adapter folder, or None."""
    path = join_path(folder, "meddr.json")
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


__all__ = ["TrainDataError", "TrainResumeError", "adapter_dir", "instruction_files", "instruction_mix", "read_adapter_meta",
           "run_train", "storage_root"]
