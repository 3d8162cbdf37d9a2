"""The steps of a sharded index build, without Ray: each is the body of one Ray task of the index stage
(:mod:`meddr_ray.stages.index.build_tasks`), takes paths and plain values, writes files, and returns paths and
counts -- never index bytes, which do not travel through the object store. Every step runs in a worker process of
its own (``max_calls=1``), so :func:`peak_rss_mb` is the step's own peak."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import pyarrow as pa

from meddr_ray import storage
from meddr_ray.retrieval.build import (
    IVF_KINDS,
    IndexParams,
    build_hnsw,
    empty_like,
    ivf_list_sizes,
    merge_flat_files,
    merge_ivf_on_disk,
    new_flat,
    train_ivf,
)
from meddr_ray.retrieval.embedding_files import iter_entries, read_entries, read_value_files, write_values
from meddr_ray.retrieval.faiss_io import check_vectors, describe, open_index_file, read_index_file, save_index
from meddr_ray.retrieval.format import INDEX_FILE, VALUES_FILE, conform_values
from meddr_ray.retrieval.store import find_build, load_index, local_index_file, new_stage, publish, publish_staged


def set_threads(n: float) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, int(n)))


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB). Build tasks run one per worker process (``max_calls=1``), so it
    is the task's own peak; it includes pages of memory-mapped files the task touched."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def train_template(entries, dim: int, params: IndexParams, nlist: int, device: str, cpus: float, out: str):
    """Train the IVF template on the sampled rows only (read row group by row group) and write it to ``out``."""
    set_threads(cpus)
    sample, _ = read_entries(entries, dim, with_values=False)
    save_index(train_ivf(sample, params, nlist, device), out)
    return {"template": out, "peak_rss_mb": peak_rss_mb()}


def template_from_version(parent: Dict[str, Any], out: str):
    """The trained structure of an IVF parent version, without its vectors, as a template file."""
    index = open_index_file(local_index_file(parent))
    save_index(empty_like(index), out)
    return {"template": out, "peak_rss_mb": peak_rss_mb()}


def build_shard_files(entries, dim: int, params: IndexParams, template: Optional[str], cpus: float, out: str):
    """Build one shard's index row group by row group and write it and its values to ``out`` + ``.faiss`` /
    ``.values.parquet``; returns their paths (never the index itself: it does not travel through the object
    store), its count and, for IVF, its list sizes (what the merge pre-sizes the on-disk lists with)."""
    set_threads(cpus)
    if params.kind in IVF_KINDS:
        if template is None:
            raise ValueError("an IVF shard needs the trained template")
        index = read_index_file(template)
    else:
        index = new_flat(dim)

    def values():
        for x, v in iter_entries(entries, dim):
            index.add(check_vectors(x, dim))
            yield v

    rows = write_values(values(), out + ".values.parquet")
    save_index(index, out + ".faiss")
    return {
        "index": out + ".faiss",
        "values": out + ".values.parquet",
        "count": rows,
        "sizes": ivf_list_sizes(index) if params.kind in IVF_KINDS else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def merge_and_publish(
    index_dir: str, manifest: dict, extra: dict, cpus: float, kind: str, template: Optional[str],
    sources: List[Dict[str, Any]], parent: Optional[str], build_id: str,
):  # fmt: skip
    """Merge shard (and parent version) files into a new version and publish it. ``sources``: paths and list
    sizes, never index bytes. IVF: the lists are copied one shard at a time into an on-disk ``index.ivfdata``
    (the task holds one shard); flat: the shards are concatenated in memory (bounded by
    ``index.max_in_memory_gb``)."""
    set_threads(cpus)
    done = find_build(index_dir, build_id)  # a retry of a merge that already published
    if done is not None:
        return done
    for source in sources:  # the parent version of an add: its index file, fetched here if it is remote
        if "parent" in source:
            source["index"], source["sizes"] = local_index_file(source.pop("parent")), None
    stage = new_stage(index_dir)
    try:
        if kind in IVF_KINDS:
            info = merge_ivf_on_disk(
                read_index_file(template), [s["index"] for s in sources], stage, [s["sizes"] for s in sources]
            )
        else:
            index = merge_flat_files([s["index"] for s in sources])
            save_index(index, os.path.join(stage, INDEX_FILE))
            info = describe(index)
            del index
        write_values(read_value_files([s["values"] for s in sources]), os.path.join(stage, VALUES_FILE))
    except BaseException:
        storage.remove(stage)
        raise
    summary = dict(manifest.get("summary", {}))
    peaks = dict(summary.get("task_peak_rss_mb", {}), merge=peak_rss_mb())
    manifest = dict(manifest, summary=dict(summary, task_peak_rss_mb=peaks))
    return publish_staged(index_dir, stage, info, manifest, extra, parent=parent, build_id=build_id)


def build_hnsw_and_publish(index_dir: str, manifest: dict, extra: dict, entries, dim: int, params, cpus: float,
                       parent: Optional[str], build_id: str):  # fmt: skip
    set_threads(cpus)
    vectors, values = read_entries(entries, dim)
    index = build_hnsw(vectors, params)
    return publish(index_dir, index, values, manifest, extra, parent=parent, build_id=build_id)


def add_and_publish(index_dir: str, parent: str, manifest: dict, extra: dict, entries, dim: int, cpus: float,
                      build_id: str):  # fmt: skip
    """Flat / HNSW parents (in memory anyway): load the parent version, add the new vectors, publish."""
    set_threads(cpus)
    base = load_index(index_dir, expect_dim=dim, expect_fingerprint=manifest["encoder_fingerprint"], version=parent)
    vectors, values = read_entries(entries, dim)
    base.index.add(check_vectors(vectors, dim))
    merged = pa.concat_tables([conform_values(base.values), conform_values(values)])
    return publish(index_dir, base.index, merged, manifest, extra, parent=parent, build_id=build_id)
