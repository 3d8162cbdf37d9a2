"""``run_index(cfg)``: inputs, encoder, shard plan, build tasks, publish (see :mod:`meddr_ray.stages.index`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict
from typing import Any, Dict, Optional, Tuple

import pyarrow as pa

from meddr_ray import storage
from meddr_ray.config import Config
from meddr_ray.retrieval.embedding_files import read_columns
from meddr_ray.retrieval.format import VALUES_FILE, PublishConflict
from meddr_ray.retrieval.store import current_version, load_manifest
from meddr_ray.stages.index.build_tasks import IndexRun, build_from_embeddings
from meddr_ray.stages.index.encoder import embed, valid_embedding_files, weights_signature
from meddr_ray.stages.index.inputs import ROW_COLUMNS, input_dataset, read_sources
from meddr_ray.stages.index.shard_plan import ShardPlan
from meddr_ray.stages.registry import StageResult
from meddr_ray.storage import is_uri, join_path

log = logging.getLogger("meddr_ray.stages.index")

WORK_DIR = "_work"  # <index_dir>/_work/<key>/: the embeddings of a run until its version is published
BUILD_FILE = "build.json"


def run_index(cfg: Config) -> StageResult:
    """Build (or, with ``index.add_sources``, extend) the retrieval index; the result's path is the published
    version, its headline gives count, dimension, type and version."""
    from meddr_ray.model import default_adapter, ensure_model
    from meddr_ray.stages.runtime import init_ray

    init_ray(cfg)
    adapter = default_adapter(cfg.layout.adapter_dir)
    log.info("index: encoder %s (%s)%s", cfg.student.name, cfg.student.path, f" + adapter {adapter}" if adapter else "")
    if cfg.student.build:
        ensure_model(cfg.student)  # build the offline model once here, not in every actor
    run, ds = _open_run(cfg)
    work = join_path(run.index_dir, WORK_DIR, _work_key(cfg, run, adapter))
    emb_dir = join_path(work, "embeddings")
    embed_s = _embed_new_cases(cfg, run, ds, emb_dir, adapter)
    build_id, expected = _build_identity(work, run)
    try:
        published, plan = build_from_embeddings(
            cfg, valid_embedding_files(emb_dir), run, join_path(work, "shards"), build_id, expected,
            adapter=adapter, embed_s=embed_s,
        )  # fmt: skip
    except PublishConflict:
        storage.remove(join_path(work, BUILD_FILE))  # the next run builds on the version CURRENT names then
        raise
    if published is None:  # an add with nothing new
        _remove_work(work)
        return _nothing_added(run, plan)
    failed_path = _write_failed(cfg, plan, published["version"])
    _remove_work(work)
    return StageResult(published["path"], published.get("summary", {}),
                       _headline(run, plan, published, embed_s, failed_path))  # fmt: skip


def _open_run(cfg: Config) -> Tuple[IndexRun, Any]:
    """What this run builds on and the annotations it reads: a new index from ``index.sources`` (or the
    instruction mix), or -- ``index.add_sources`` -- a new version of the current one, its cases known."""
    index_dir = cfg.layout.index_dir
    add_sources = list(cfg.index.add_sources)  # checked and made absolute by load_config / load_source_file
    if not add_sources:
        ds, sources = input_dataset(cfg)
        return IndexRun(index_dir, "build", sources), ds
    parent = load_manifest(index_dir)
    known = read_columns(join_path(parent["path"], VALUES_FILE), ["id"]).column("id").combine_chunks()
    run = IndexRun(index_dir, "add", [asdict(s) for s in add_sources], parent, known)
    log.info("index: adding %s to version %s (%d cases)", [s.name for s in add_sources], parent["version"],
             parent["count"])  # fmt: skip
    return run, read_sources(add_sources, cfg.data)


def _embed_new_cases(cfg: Config, run: IndexRun, ds, emb_dir: str, adapter: Optional[str]) -> float:
    """Embed the cases neither in the parent version nor embedded by an earlier attempt; returns the seconds."""
    t0 = time.time()
    done = valid_embedding_files(emb_dir)
    done_ids = (
        pa.concat_arrays([read_columns(p, ["id"]).column("id").combine_chunks() for p in done])
        if done
        else pa.array([], pa.string())
    )
    if len(done_ids):
        log.info("index: resuming, %d rows already embedded in %s", len(done_ids), emb_dir)
    skip = pa.concat_arrays([run.known_ids.cast(pa.string()), done_ids.cast(pa.string())])
    embed(cfg, ds, emb_dir, adapter, skip)
    return time.time() - t0


def _work_key(cfg: Config, run: IndexRun, adapter: Optional[str]) -> str:
    """Names the work folder: the sources, the model and adapter files, the data settings, the parent version."""
    blob = json.dumps(
        {
            "mode": run.mode,
            "sources": run.sources,
            "parent": run.parent["version"] if run.parent else None,
            "model": [cfg.student.name, cfg.student.path, adapter],
            "weights": weights_signature([cfg.student.path, adapter]),
            "data": asdict(cfg.data),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build_identity(work: str, run: IndexRun) -> Tuple[str, Optional[str]]:
    """``(build id, the version CURRENT named when this build began)``, kept in the work folder so that a re-run
    after a crash between publishing and cleaning up returns the version already published (same build id) and
    a build never publishes over a version it did not see (compare-and-swap on that parent)."""
    path = join_path(work, BUILD_FILE)
    if storage.exists(path):
        saved = json.loads(storage.read_text(path))
        return saved["build_id"], saved["parent"]
    parent = run.parent["version"] if run.parent else current_version(run.index_dir)
    build_id = uuid.uuid4().hex
    storage.write_text(path, json.dumps({"build_id": build_id, "parent": parent}) + "\n")
    return build_id, parent


def _write_failed(cfg: Config, plan: ShardPlan, version: str) -> Optional[str]:
    """Rows set aside (unreadable images, ...) with their errors: ``<index_dir>/failed/<version>.parquet``."""
    import pyarrow.parquet as pq

    if not plan.failed_count:
        return None
    parts = [read_columns(p, ROW_COLUMNS).take(pa.array(rows)) for p, rows in zip(plan.files, plan.failed) if len(rows)]
    path = cfg.layout.index_failed_file(version)
    storage.makedirs(cfg.layout.failed_dir("index"))
    fs, p = storage.resolve(path)
    pq.write_table(pa.concat_tables(parts), p, filesystem=fs)
    return path


def _remove_work(work: str) -> None:
    """The embeddings are in the published index now; drop them (and ``_work/`` once empty)."""
    storage.remove(work)
    parent = os.path.dirname(work)
    if not is_uri(work) and os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)


def _nothing_added(run: IndexRun, plan: ShardPlan) -> StageResult:
    version = run.parent["version"]
    return StageResult(run.parent["path"], {"added": 0, "failed": plan.failed_count}, (
        f"index: nothing new to add (every case is already in version {version}"
        + (f"; {plan.failed_count} failed" if plan.failed_count else "")
        + f"); version {version} stays current"
    ))  # fmt: skip


def _headline(run: IndexRun, plan: ShardPlan, published: Dict[str, Any], embed_s: float,
              failed_path: Optional[str]) -> str:  # fmt: skip
    build_s = published.get("summary", {}).get("build_seconds", 0.0)
    return (
        f"index: {published['count']} vectors, dimension {published['dim']}, {published['faiss_type']} "
        f"({published['index_type']}), version {published['version']}"
        + (f" (parent {run.parent['version']}, +{plan.count})" if run.parent else "")
        + f" -> {published['path']}  [embed {embed_s:.1f} s, build {build_s:.1f} s"
        + (f", {plan.failed_count} failed -> {failed_path}" if failed_path else "")
        + "]"
    )
