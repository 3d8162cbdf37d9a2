"""Medical instruction tuning (paper section 3.2) on Ray Train: LoRA on the student with DeepSpeed ZeRO-3.

``run_train(cfg)`` reads the instruction Parquet written by ``meddr-ray instruct`` (``<run_dir>/instruct``: rows
``id, image, prompt, answer, split, ...``), starts a ``TorchTrainer`` (Ray Train V2) with
``cfg.train.num_workers`` workers, each running :func:`meddr_ray.stages.train.loop.train_loop_per_worker` (the
recipe of :mod:`meddr_ray.stages.train.recipe`), and writes the LoRA adapter to ``<run_dir>/adapter/`` (PEFT
format + ``meddr.json``).

Resume: checkpoints live under ``<storage_path>/<name>/`` (``train.storage_path``, default ``<run_dir>/train``;
``cfg.layout.checkpoints_root``). Ray Train V2 keeps a snapshot of the run's checkpoints there; a new
``TorchTrainer`` with the same storage path and name loads it, so ``ray.train.get_checkpoint()`` in the workers
returns the latest checkpoint and training continues from its step (V2 has no ``resume_from_checkpoint``
argument: the run name is the handle). A worker that dies mid-run makes Ray Train restart the worker group
(``train.max_failures`` times), which resumes the same way. A later run resumes only checkpoints of the same
student, data and settings (:mod:`meddr_ray.stages.train.resume`); ``train.restart`` moves them aside.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from meddr_ray import storage
from meddr_ray.config import Config, save_config
from meddr_ray.layout import ADAPTER_META_FILE
from meddr_ray.progress import report
from meddr_ray.stages.instruct import PublishedMix
from meddr_ray.stages.registry import StageResult
from meddr_ray.stages.train.checkpoint import ADAPTER_SUBDIR, read_state
from meddr_ray.stages.train.inputs import (TrainDataError, check_columns, instruction_mix, retrieval_context,
                                           split_counts, training_datasets)  # fmt: skip
from meddr_ray.stages.train.loop import train_loop_per_worker
from meddr_ray.stages.train.plan import TrainPlan, make_plan
from meddr_ray.stages.train.resume import (check_resume, check_worker_count, latest_checkpoint_state,
                                           run_description, run_identity)  # fmt: skip
from meddr_ray.storage import is_uri, join_path



@dataclass
class _RunInputs:
    """What the driver has checked before any Ray work."""

    mix: PublishedMix
    counts: Dict[str, int]
    plan: TrainPlan
    model_path: str
    context: Optional[Dict[str, Any]]
    description: Dict[str, Any]


def run_train(cfg: Config) -> StageResult:
    """Fine-tune the student with LoRA on the instruction data; returns the adapter folder."""
    from meddr_ray.stages.runtime import init_ray

    inputs = _check_inputs(cfg)
    init_ray(cfg)
    t, plan, counts = cfg.train, inputs.plan, inputs.counts
    report(
        "train",
        f"{counts['train']} train / {counts.get('val', 0)} val rows from {len(inputs.mix.files)} file(s); "
        f"{t.num_workers} workers, ZeRO-{t.zero_stage}, {t.precision}; {plan.total_steps} steps "
        f"({plan.steps_per_epoch} per epoch); checkpoints in {_experiment(cfg)}",
    )
    trainer = _trainer(cfg, inputs)
    started = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {_experiment(cfg)}")
    return _finish(cfg, inputs, result.checkpoint, started)


def _experiment(cfg: Config) -> str:
    """The run's checkpoints: ``<checkpoints_root>/<train.name>`` (Ray Train's storage path and run name)."""
    return join_path(cfg.layout.checkpoints_root, cfg.train.name)


def _check_inputs(cfg: Config) -> _RunInputs:
    """The instruction mix, the plan, the student and the index it needs; and whether the checkpoints already
    there may be resumed (or are moved aside on ``train.restart``)."""
    from meddr_ray.model import ensure_model

    t = cfg.train
    mix = instruction_mix(cfg)
    check_columns(mix.files)
    counts = split_counts(mix)
    if not counts.get("train"):
        raise TrainDataError(f"{cfg.layout.instruct_dir}: no rows with split == 'train' (splits: {counts})")
    plan = make_plan(t, counts["train"])
    model_path = str(ensure_model(cfg.student))  # an offline build happens once, here, not in every worker
    context = retrieval_context(cfg)  # the index it needs checked before any Ray work
    description = run_description(cfg, mix)
    experiment = _experiment(cfg)
    check_resume(experiment, latest_checkpoint_state(experiment), description, t.restart)
    check_worker_count(experiment, latest_checkpoint_state(experiment), t.num_workers)
    return _RunInputs(mix, counts, plan, model_path, context, description)


def _trainer(cfg: Config, inputs: _RunInputs):
    """The ``TorchTrainer``: one :func:`train_loop_per_worker` per worker, resuming the run named ``train.name``."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    root = cfg.layout.checkpoints_root
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same order every time: a resumed epoch can skip what it already trained on
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    loop_config = {
        "cfg": cfg,
        "plan": asdict(inputs.plan),
        "model_path": inputs.model_path,
        "identity": run_identity(inputs.description),
        "description": inputs.description,
        "status_dir": None if is_uri(root) else os.path.join(root, t.name, "workers"),
        "has_val": bool(inputs.counts.get("val")),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            storage_path=root,
            name=t.name,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
        datasets=training_datasets(inputs.mix.files, inputs.counts, t.cache_data, inputs.context),
        dataset_config=DataConfig(execution_options=ingest),
    )


def _finish(cfg: Config, inputs: _RunInputs, checkpoint, started: float) -> StageResult:
    """The final checkpoint's adapter published to ``cfg.layout.adapter_dir`` with its ``meddr.json`` and the
    config; merged into the student too with ``train.merge_lora``."""
    import ray

    out = cfg.layout.adapter_dir
    with checkpoint.as_directory() as folder:
        state = read_state(folder)
        _copy_tree(os.path.join(folder, ADAPTER_SUBDIR), out)
    meta = _adapter_meta(cfg, inputs, checkpoint.path, state)
    storage.write_text(join_path(out, ADAPTER_META_FILE), json.dumps(meta, indent=2))
    save_config(cfg, out, "config.yaml")
    if cfg.train.merge_lora:
        merged = cfg.layout.merged_dir
        ray.get(ray.remote(_merge_task).options(num_cpus=1).remote(cfg, out, merged))
        report("train", f"merged model: {merged}")
    summary = _summary_text(state, inputs.plan, meta["final_metrics"], out, time.time() - started)
    return StageResult(out, meta, summary)


def _adapter_meta(cfg: Config, inputs: _RunInputs, checkpoint_path: str, state: Dict[str, Any]) -> Dict[str, Any]:
    """``meddr.json``: the base model, the data, the config, the plan, and the run's history and events."""
    mix = inputs.mix
    return {
        "base_model": {"name": cfg.student.name, "path": inputs.model_path},
        "data": {"path": cfg.layout.instruct_dir, "version": mix.version, "fingerprint": mix.fingerprint,
                 "files": mix.files, "rows": inputs.counts},  # fmt: skip
        "config_fingerprint": cfg.fingerprint(),
        "preset": cfg.preset,
        "plan": asdict(inputs.plan),
        "checkpoint": checkpoint_path,
        "final_metrics": _final_metrics(state["history"]),
        "history": state["history"],
        "events": state["events"],
        "workers": state.get("workers", []),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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


def _final_metrics(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The last step's loss and learning rate, the mean throughput, the first and last validation loss."""
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


def _summary_text(state: Dict[str, Any], plan: TrainPlan, final: Dict[str, Any], out: str, seconds: float) -> str:
    """The stage's headline: steps, losses, resumes, the adapter and each rank's memory."""
    resumes = [e for e in state["events"] if e.get("resumed")]
    val = (f", val_loss {final['val_loss_first']:.4f} -> {final['val_loss']:.4f}" if "val_loss" in final
           else ", no validation split")  # fmt: skip
    where = "; ".join(f"from step {e['start_step']}, data position {e.get('data_position', 'epoch start')}"
                      for e in resumes)  # fmt: skip
    lines = [
        f"train: done: step {state['step']}/{plan.total_steps}, epoch {state['epoch']}, {seconds:.0f} s",
        f"  loss {final.get('loss', float('nan')):.4f}{val}",
        f"  resumed {len(resumes)} time(s)" + (f" ({where})" if resumes else ""),
        f"  adapter: {out}",
    ]
    for w in state.get("workers", []):
        lines.append(
            f"  rank {w['rank']}: peak RSS {w['peak_rss_mb']:.0f} MB, parameters {w['param_mb']:.2f} MB, "
            f"optimizer state {w['optimizer_mb']:.2f} MB"
        )
    return "\n".join(lines)

