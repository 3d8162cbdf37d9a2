"""The build half of the index stage, on a folder of embedding files: plan, train (IVF), build shards, merge,
publish -- each step a Ray task running a function of :mod:`meddr_ray.retrieval.build_steps`. Also run by
``benchmarks/index_scale.py`` (:func:`build_from_embeddings`)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pyarrow as pa

from meddr_ray import storage
from meddr_ray.config import Config
from meddr_ray.retrieval import build_steps as steps
from meddr_ray.retrieval.build import (
    IVF_KINDS,
    IndexParams,
    check_in_memory,
    effective_nlist,
    ivf_train_size,
    resolve_kind,
)
from meddr_ray.retrieval.format import VALUES_FILE, IndexArtifactError
from meddr_ray.retrieval.store import find_build
from meddr_ray.stages.index.shard_plan import ShardPlan, plan_shards
from meddr_ray.storage import join_path

log = logging.getLogger("meddr_ray.stages.index")


@dataclass
class IndexRun:
    """What one run of the index stage builds on: a new index (``build``) or a new version of ``parent`` (``add``)."""

    index_dir: str
    mode: str  # build | add
    sources: List[Dict[str, Any]]
    parent: Optional[Dict[str, Any]] = None  # manifest of the version added to
    known_ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))


@dataclass
class _BuildJob:
    """What every build task of one build shares."""

    run: IndexRun
    plan: ShardPlan
    kind: str
    params: IndexParams
    cpus: float
    gpus: float
    scratch: str
    build_id: str
    expected_parent: Optional[str]
    manifest: Dict[str, Any]  # the caller's fields of the published manifest
    summary: Dict[str, Any]
    extra: Dict[str, str]  # extra files of the version (name -> text)

    def task(self, fn, gpus: float = 0):
        """``fn`` as a Ray task: one per worker process (``max_calls=1``), so its memory is returned when it ends
        and its peak is its own."""
        import ray

        return ray.remote(num_cpus=self.cpus, num_gpus=gpus, max_retries=2, max_calls=1)(fn)

    def manifest_with(self, **summary) -> Dict[str, Any]:
        return dict(self.manifest, params=self.params.as_dict(), summary=dict(self.summary, **summary))


def build_from_embeddings(
    cfg: Config,
    files: List[str],
    run: IndexRun,
    scratch: str,
    build_id: str,
    expected_parent: Optional[str],
    adapter: Optional[str] = None,
    embed_s: float = 0.0,
) -> Tuple[Optional[Dict[str, Any]], ShardPlan]:
    """The build half of the index job, on a folder of embedding files (``(values..., fingerprint, embedding)``
    Parquet, as the encoder pool writes them): plan, train (IVF), build shards, merge, publish. Returns the
    published manifest (None: an add with nothing new) and the plan. Every shard task writes its index and
    values under ``scratch``; the merge reads those files one shard at a time. ``expected_parent``: the version
    ``CURRENT`` must still name when publishing (compare-and-swap); ``build_id``: a retried publish returns the
    version the first attempt made."""
    import ray

    already = find_build(run.index_dir, build_id)
    plan = plan_shards(files, run.known_ids)
    if already is not None:  # published before a crash; nothing to build again
        return already, plan
    failed_dir = cfg.layout.failed_dir("index")
    _warn_set_aside(plan, failed_dir)
    if run.mode == "add" and plan.count == 0:
        return None, plan
    _check_buildable(run, plan, failed_dir)
    job = _build_job(cfg, run, plan, scratch, build_id, expected_parent, adapter, embed_s)
    storage.makedirs(scratch)
    t1 = time.time()
    if run.parent and job.kind not in IVF_KINDS:
        ref = _add_in_memory(job)
    elif job.kind == "hnsw":
        ref = _build_hnsw(job)
    else:
        ref = _build_sharded(job, cfg)
    published = ray.get(ref)
    published.setdefault("summary", {})["build_seconds"] = round(time.time() - t1, 2)
    storage.remove(scratch)
    return published, plan


def _warn_set_aside(plan: ShardPlan, failed_dir: str) -> None:
    if plan.failed_count:
        log.warning(
            "index: %d rows could not be embedded; they are listed in %s/",
            plan.failed_count, failed_dir,
        )  # fmt: skip
    if plan.duplicates:
        log.warning("index: %d images repeat a case already indexed; each image is indexed once", plan.duplicates)


def _check_buildable(run: IndexRun, plan: ShardPlan, failed_dir: str) -> None:
    """Something to index, and (an add) embedded by the encoder that built the parent version."""
    if plan.count == 0:
        raise ValueError(
            f"index: no rows to index ({plan.failed_count} failed, listed under {failed_dir})"
        )
    if run.parent and plan.fingerprint != run.parent["encoder_fingerprint"]:
        raise IndexArtifactError(
            f"cannot add to version {run.parent['version']}: it was built with encoder "
            f"{run.parent['encoder_fingerprint']} but the current encoder is {plan.fingerprint}; rebuild the index "
            f"with `meddr-ray index`"
        )


def _build_job(cfg: Config, run: IndexRun, plan: ShardPlan, scratch: str, build_id: str,
               expected_parent: Optional[str], adapter: Optional[str], embed_s: float) -> _BuildJob:  # fmt: skip
    """The kind and parameters of the index (an add keeps the parent's), its manifest fields and summary."""
    total = plan.count + (run.parent["count"] if run.parent else 0)
    if run.parent:
        kind = run.parent["index_type"]  # an add keeps the parent's structure; a rebuild changes it
    else:
        kind = resolve_kind(cfg.index.type, total, cfg.index.auto_ivf_threshold)
    check_in_memory(kind, total, plan.dim, cfg.index.max_in_memory_gb)
    params = IndexParams.from_config(cfg.index, kind)
    if run.parent:
        params = IndexParams(**{**asdict(params), **run.parent.get("params", {})})
    manifest = {
        "encoder_fingerprint": plan.fingerprint,
        "model_name": cfg.student.name,
        "model_path": cfg.student.path,
        "adapter_dir": adapter,
        "parent_version": run.parent["version"] if run.parent else None,
        "replaces": expected_parent if not run.parent else None,
        "sources": [{k: s.get(k) for k in ("name", "format", "path", "splits")} for s in run.sources],
        "config_fingerprint": cfg.fingerprint(),
    }
    gpus = _gpu_for_tasks(cfg)
    summary = _summary(run, plan, faiss_device="gpu" if gpus and kind in IVF_KINDS and not run.parent else "cpu",
                       embed_s=embed_s)  # fmt: skip  (the GPU serves IVF training only)
    return _BuildJob(run, plan, kind, params, cfg.index.build_cpus, gpus, scratch, build_id, expected_parent,
                     manifest, summary, {"config.yaml": cfg.to_yaml()})  # fmt: skip


def _summary(run: IndexRun, plan: ShardPlan, faiss_device: str, embed_s: float) -> Dict[str, Any]:
    datasets = dict(run.parent.get("summary", {}).get("datasets", {})) if run.parent else {}
    for name, n in plan.datasets.items():
        datasets[name] = datasets.get(name, 0) + n
    return {
        "datasets": datasets,  # cases (images) per dataset: what retrieval can be scoped to
        "added": plan.count,
        "failed": plan.failed_count,
        "duplicates": plan.duplicates,
        "faiss_device": faiss_device,
        "embed_seconds": round(embed_s, 2),
    }


def _gpu_for_tasks(cfg: Config) -> float:
    """One GPU for the IVF training task when asked for and the cluster has one (else it would never run)."""
    import ray

    if cfg.index.device != "gpu":
        return 0
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return 1
    log.warning("index.device=gpu but the Ray cluster has no GPU: FAISS runs on the CPU")
    return 0


def _add_in_memory(job: _BuildJob):
    """Flat / HNSW parents (in memory anyway): one task loads the parent, adds the new vectors, publishes."""
    return job.task(steps.add_and_publish).remote(
        job.run.index_dir, job.run.parent["version"], job.manifest_with(shards=1), job.extra, job.plan.everything(),
        job.plan.dim, job.cpus, job.build_id,
    )  # fmt: skip


def _build_hnsw(job: _BuildJob):
    """HNSW cannot be merged: one task builds it from the gathered vectors and publishes."""
    return job.task(steps.build_hnsw_and_publish).remote(
        job.run.index_dir, job.manifest_with(shards=1), job.extra, job.plan.everything(), job.plan.dim, job.params,
        job.cpus, job.expected_parent, job.build_id,
    )  # fmt: skip


def _build_sharded(job: _BuildJob, cfg: Config):
    """Flat / IVF: the template (IVF), one task per shard in parallel, then one task merges and publishes."""
    import ray

    run, plan = job.run, job.plan
    shards = plan.shards(cfg.index.num_shards)
    template, peaks = _ivf_template(job, cfg)
    log.info("index: building %d %s shards of %d vectors in parallel", len(shards), job.kind, plan.count)
    built = ray.get([
        job.task(steps.build_shard_files).remote(
            entries, plan.dim, job.params, template, job.cpus, join_path(job.scratch, f"shard-{i:05d}"))
        for i, entries in enumerate(shards)
    ])  # fmt: skip
    sources = list(built)
    if run.parent:  # the parent version's lists come first: its FAISS ids stay what they were
        sources.insert(0, {"parent": run.parent, "values": join_path(run.parent["path"], VALUES_FILE)})
    peaks["shards"] = [b["peak_rss_mb"] for b in built]
    return job.task(steps.merge_and_publish).remote(
        run.index_dir, job.manifest_with(shards=len(shards), task_peak_rss_mb=peaks), job.extra, job.cpus,
        job.kind, template, sources, run.parent["version"] if run.parent else job.expected_parent, job.build_id,
    )  # fmt: skip


def _ivf_template(job: _BuildJob, cfg: Config) -> Tuple[Optional[str], Dict[str, Any]]:
    """The trained, empty IVF index every shard is cloned from (a file path; None for flat) and the peak memory
    of the task that made it: trained on a sample, or (an add) the parent version's structure."""
    import ray

    run, plan, out = job.run, job.plan, join_path(job.scratch, "template.faiss")
    if job.kind not in IVF_KINDS:
        return None, {}
    if run.parent:
        log.info("index: adding to the trained %s structure of version %s", job.kind, run.parent["version"])
        made = ray.get(job.task(steps.template_from_version).remote(run.parent, out))
        return made["template"], {"template": made["peak_rss_mb"]}
    job.params.nlist = effective_nlist(cfg.index.nlist, plan.count)
    size = ivf_train_size(job.params.nlist, plan.count, cfg.index.train_size)
    log.info("index: training the %s template (nlist=%d) on %d sampled vectors", job.kind, job.params.nlist, size)
    made = ray.get(job.task(steps.train_template, gpus=job.gpus).remote(
        plan.sample(size, cfg.seed), plan.dim, job.params, job.params.nlist, cfg.index.device, job.cpus, out,
    ))  # fmt: skip
    return made["template"], {"train": made["peak_rss_mb"]}
