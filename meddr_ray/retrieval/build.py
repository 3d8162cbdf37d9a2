"""Building FAISS indexes without Ray: the index kinds and their parameters, IVF training, one shard's index,
and merging shards -- in memory (flat) or on disk (IVF).

Three kinds, all searched by inner product on unit rows (cosine similarity):

- ``flat``: exact search. Shards are ``IndexFlatIP`` and are concatenated with ``merge_from``.
- ``ivf``: ``IndexIVFFlat``. One template is trained on a sample (the coarse quantizer), every shard is a
  ``faiss.clone_index`` of it, and the shards' inverted lists are merged -- so every shard shares the same cells
  and the merge is exact. Adding later uses the trained quantizer: no retraining.
- ``ivfpq``: ``IndexIVFPQ``, the compressed IVF (``pq_m`` sub-quantizers of ``pq_nbits`` bits per vector instead
  of ``4 * dim`` bytes): trained, sharded and merged like ``ivf``.
- ``hnsw``: ``IndexHNSWFlat``. A graph cannot be merged (HNSW has no ``merge_from``), so it is built from the
  gathered vectors in one place; adding later inserts into the graph. Flat and HNSW hold every vector in one
  process, so they are refused above ``index.max_in_memory_gb`` (:func:`check_in_memory`).

IVF merges never hold the collection: every shard is an index file, and :func:`merge_ivf_on_disk` copies the
shards' inverted lists, one shard at a time, into one ``index.ivfdata`` file (FAISS ``OnDiskInvertedLists``);
``index.faiss`` keeps only the trained quantizers and names that file, which readers map into memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np

from meddr_ray.config import FaissParams, IndexConfig
from meddr_ray.retrieval.faiss_io import (
    _faiss,
    check_vectors,
    describe,
    index_from_bytes,
    index_to_bytes,
    open_index_file,
    read_index_file,
    to_cpu,
    to_gpu,
    use_gpu,
)
from meddr_ray.retrieval.format import INDEX_FILE, IVFDATA_FILE, IndexArtifactError

log = logging.getLogger("meddr_ray.retrieval.build")

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")


@dataclass
class IndexParams(FaissParams):
    """How an index is built and searched: the kind, then the FAISS knobs of
    :class:`~meddr_ray.config.FaissParams` (declared once there, keyword-only)."""

    kind: str = "flat"

    @classmethod
    def from_config(cls, cfg: IndexConfig, kind: str) -> "IndexParams":
        """``kind`` and, by name, every FAISS knob of ``cfg``."""
        return cls(kind, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FaissParams)})

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind}
        if self.kind in IVF_KINDS:
            out.update(nlist=self.nlist, nprobe=self.nprobe)
        if self.kind == "ivfpq":
            out.update(pq_m=self.pq_m, pq_nbits=self.pq_nbits)
        elif self.kind == "hnsw":
            out.update(hnsw_m=self.hnsw_m, ef_construction=self.ef_construction, ef_search=self.ef_search)
        return out


def resolve_kind(requested: str, count: int, auto_ivf_threshold: int) -> str:
    """``auto`` -> ``flat`` below the threshold (exact search is fast enough there), ``ivf`` from it on."""
    if requested == "auto":
        return "ivf" if count >= auto_ivf_threshold else "flat"
    if requested not in KINDS:
        raise ValueError(f"index type {requested!r} is not one of {['auto', *KINDS]}")
    return requested


def check_in_memory(kind: str, count: int, dim: int, limit_gb: float) -> None:
    """Flat and HNSW indexes hold every vector in one process (to build, merge and search); refuse a collection
    whose vectors alone exceed ``limit_gb`` rather than run a task out of memory."""
    if kind not in ("flat", "hnsw"):
        return
    need = count * dim * 4 / 2**30
    if need > limit_gb:
        raise ValueError(
            f"index type {kind!r} holds every vector in one process: {count} x {dim} float32 = {need:.1f} GB, above "
            f"index.max_in_memory_gb={limit_gb:g}; use index.type=ivf or ivfpq (merged on disk, shard by shard), or "
            f"raise index.max_in_memory_gb"
        )


def effective_nlist(requested: int, count: int) -> int:
    """k-means needs about 39 training points per cell; fewer cells than asked for a small collection."""
    nlist = max(1, min(requested, count // 39))
    if nlist < requested:
        log.info("IVF: %d vectors are too few for %d cells; using nlist=%d", count, requested, nlist)
    return nlist


def ivf_train_size(nlist: int, count: int, requested: Optional[int] = None) -> int:
    """Vectors sampled to train the coarse quantizer: ``requested`` or 64 per cell, at most all of them."""
    return min(count, requested or 64 * nlist)


def new_flat(dim: int):
    return _faiss().IndexFlatIP(dim)


def new_hnsw(dim: int, params: IndexParams):
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    index.hnsw.efSearch = params.ef_search
    return index


def new_ivf(dim: int, params: IndexParams, nlist: int):
    """An untrained ``IndexIVFFlat`` (``ivf``) or ``IndexIVFPQ`` (``ivfpq``: ``pq_m`` codes of ``pq_nbits`` bits)."""
    faiss = _faiss()
    if params.kind == "ivfpq":
        if dim % params.pq_m:
            raise ValueError(f"index.pq_m={params.pq_m} must divide the embedding dimension {dim}")
        quantizer = faiss.IndexFlatIP(dim)
        return faiss.IndexIVFPQ(quantizer, dim, nlist, params.pq_m, params.pq_nbits, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)


def train_ivf(sample: np.ndarray, params: IndexParams, nlist: int, device: str = "cpu"):
    """The IVF template: an empty ``IndexIVFFlat`` / ``IndexIVFPQ`` trained on ``sample`` (coarse quantizer, and
    for IVF-PQ the product quantizer of the residuals)."""
    sample = check_vectors(sample, where="IVF training sample")
    dim = sample.shape[1]
    template = new_ivf(dim, params, nlist)
    if use_gpu(device):
        # k-means is the expensive part; train on the GPU, keep the template on the CPU for cloning
        gpu = to_gpu(template)
        gpu.train(sample)
        template = to_cpu(gpu)
    else:
        template.train(sample)
    template.nprobe = min(params.nprobe, nlist)
    return template


def build_shard(vectors: np.ndarray, params: IndexParams, template=None):
    """One shard's index: flat, or a clone of the trained IVF template with the shard's vectors added."""
    faiss = _faiss()
    vectors = check_vectors(vectors)
    if params.kind == "flat":
        index = new_flat(vectors.shape[1])
    elif params.kind in IVF_KINDS:
        if template is None:
            raise ValueError("an IVF shard needs the trained template")
        index = faiss.clone_index(template)
    else:
        raise ValueError(f"{params.kind} indexes are not built per shard (HNSW cannot be merged)")
    index.add(vectors)
    return index


def merge_shards(shards: Sequence):
    """Concatenate shard indexes in order: FAISS id of shard s row r = (rows of shards before s) + r."""
    faiss = _faiss()
    if not shards:
        raise ValueError("no shards to merge")
    merged = shards[0]
    for other in shards[1:]:
        if isinstance(merged, faiss.IndexIVF):
            merged.merge_from(other, merged.ntotal)  # shift the other shard's ids past ours
        else:
            merged.merge_from(other)  # flat codes are appended in order
    return merged


def build_hnsw(vectors: np.ndarray, params: IndexParams):
    vectors = check_vectors(vectors)
    index = new_hnsw(vectors.shape[1], params)
    index.add(vectors)
    return index


def ivf_list_sizes(index) -> np.ndarray:
    """Entries per inverted list of an IVF index (``nlist`` int64): what the merge pre-sizes its lists with."""
    ivf = _faiss().extract_index_ivf(index)
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)


def empty_like(index):
    """The trained structure of an IVF index without its vectors (in-memory, empty inverted lists)."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    clone = _clone_skipping_lists(index)  # never copies the vectors, in memory or on disk
    cl = faiss.extract_index_ivf(clone)
    cl.replace_invlists(empty, True)
    empty.this.disown()
    cl.ntotal = 0
    clone.ntotal = 0
    return clone


def _clone_skipping_lists(index):
    """Serialise ``index`` without touching its (on-disk) list contents: swap in empty lists for the copy."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    own, saved, ntotal = ivf.own_invlists, ivf.invlists, ivf.ntotal
    placeholder = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False
    ivf.invlists = placeholder
    try:
        return index_from_bytes(index_to_bytes(index))
    finally:
        ivf.invlists, ivf.own_invlists, ivf.ntotal = saved, own, ntotal


def merge_ivf_on_disk(template, sources: Sequence[str], out_dir: str, sizes: Optional[Sequence] = None) -> Dict[str, Any]:
    """Merge IVF shard files into ``out_dir/index.faiss`` + ``out_dir/index.ivfdata`` (a local folder), holding
    one shard at a time: the inverted lists are first sized from ``sizes`` (each source's :func:`ivf_list_sizes`;
    read in a first pass where not given), then each shard is read, its entries copied to their offsets in the
    on-disk lists with ids shifted past the shards before it, and dropped. ``template``: the trained, empty IVF
    index every shard was cloned from (the same coarse cells, so the merge is exact). ``sources``: index files
    (:func:`save_index`), or published version folders' ``index.faiss`` (their lists are mapped, not loaded).
    Returns :func:`describe` of the result."""
    faiss = _faiss()
    if not sources:
        raise ValueError("no shards to merge")
    tivf = faiss.extract_index_ivf(template)
    nlist, code_size = tivf.nlist, tivf.code_size
    sizes = [
        np.asarray(ivf_list_sizes(open_index_file(path)) if known is None else known, dtype=np.int64)
        for path, known in zip(sources, sizes or [None] * len(sources))
    ]  # a first pass, one source at a time, for sources whose sizes were not given
    total = np.sum(sizes, axis=0)
    os.makedirs(out_dir, exist_ok=True)
    ivfdata = os.path.join(out_dir, IVFDATA_FILE)
    lists = faiss.OnDiskInvertedLists(nlist, code_size, ivfdata)
    for i in np.flatnonzero(total):
        lists.resize(int(i), int(total[i]))  # every list once, to its final size: laid out without gaps
    filled = np.zeros(nlist, dtype=np.int64)
    offset = 0
    for path, expected in zip(sources, sizes):
        shard = open_index_file(path)
        sivf = faiss.extract_index_ivf(shard)
        if sivf.nlist != nlist or sivf.code_size != code_size:
            raise IndexArtifactError(f"{path}: nlist {sivf.nlist} / code size {sivf.code_size}, the template has "
                                     f"{nlist} / {code_size}; it was not cloned from this template")
        if not np.array_equal(ivf_list_sizes(shard), expected):
            raise IndexArtifactError(f"{path}: its list sizes differ from the ones it was planned with")
        inv = sivf.invlists
        for i in np.flatnonzero(expected):
            n = int(expected[i])
            ids = faiss.rev_swig_ptr(inv.get_ids(int(i)), n).astype(np.int64) + offset
            codes = np.array(faiss.rev_swig_ptr(inv.get_codes(int(i)), n * code_size), dtype=np.uint8)
            lists.update_entries(int(i), int(filled[i]), n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            filled[i] += n
        offset += int(shard.ntotal)
        del shard, sivf, inv  # one shard at a time
    merged = empty_like(template)
    mivf = faiss.extract_index_ivf(merged)
    mivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns the lists now (else Python frees them twice)
    mivf.ntotal = offset
    merged.ntotal = offset
    faiss.write_index(merged, os.path.join(out_dir, INDEX_FILE))
    info = describe(merged)
    del merged
    return info


def merge_flat_files(paths: Sequence[str]):
    """Flat shard files concatenated in order (the result is the whole flat index: bounded by
    ``index.max_in_memory_gb`` through :func:`check_in_memory`); one shard file read at a time."""
    merged = None
    for path in paths:
        shard = read_index_file(path)
        if merged is None:
            merged = shard
        else:
            merged.merge_from(shard)
    if merged is None:
        raise ValueError("no shards to merge")
    return merged
