"""FAISS indexes for the retrieval database, without Ray: build, shard and merge, publish, load with checks.

Cosine similarity is the inner product of L2-normalised vectors (``METRIC_INNER_PRODUCT``); the encoder already
returns unit rows. Three kinds:

- ``flat``: exact search. Shards are ``IndexFlatIP`` and are concatenated with ``merge_from``.
- ``ivf``: ``IndexIVFFlat``. One template is trained on a sample (the coarse quantizer), every shard is a
  ``faiss.clone_index`` of it, and the shards' inverted lists are merged with ``merge_from`` -- so every shard
  shares the same cells and the merge is exact. Adding later uses the trained quantizer: no retraining.
- ``ivfpq``: ``IndexIVFPQ``, the compressed IVF (``pq_m`` sub-quantizers of ``pq_nbits`` bits per vector instead
  of ``4 * dim`` bytes): trained, sharded and merged like ``ivf``.
- ``hnsw``: ``IndexHNSWFlat``. A graph cannot be merged (HNSW has no ``merge_from``), so it is built from the
  gathered vectors in one place; adding later inserts into the graph. Flat and HNSW hold every vector in one
  process, so they are refused above ``index.max_in_memory_gb`` (:func:`check_in_memory`).

IVF merges never hold the collection: every shard is an index file, and :func:`merge_ivf_on_disk` copies the
shards' inverted lists, one shard at a time, into one ``index.ivfdata`` file (FAISS ``OnDiskInvertedLists``);
``index.faiss`` keeps only the trained quantizers and names that file, which readers map into memory.

A published version is a folder ``<index_dir>/<version>/`` with ``manifest.json``, ``index.faiss`` (+
``index.ivfdata`` for IVF) and ``values.parquet`` (row i = FAISS id i). It is written under a temporary name,
renamed into place, and only then named by ``<index_dir>/CURRENT`` (itself replaced atomically), so a reader
never sees a half-written version. Publishing is a compare-and-swap on the parent version (``parent=``) and
idempotent per ``build_id`` (:func:`publish_staged`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from meddr_ray import storage
from meddr_ray.config import IndexConfig
from meddr_ray.storage import is_uri, join_path

log = logging.getLogger("meddr_ray.stages.index")

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")
METRIC = "inner_product"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"  # the inverted lists of an IVF version, mapped into memory by readers
VALUES_FILE = "values.parquet"
MANIFEST_FILE = "manifest.json"
from meddr_ray.layout import CURRENT_FILE  # noqa: E402  (named once, in the run layout)
FORMAT_VERSION = 2  # 2: one case per image (label, report, qa); 1 had one row per task (task, text)

# The value of every FAISS id: one case per image (paper section 3.3: "the visual embedding as the key while the
# text is the value"), with every annotation the training data give that image.
QA_TYPE = pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))
VALUES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),  # the case: one image of one dataset (meddr_ray.stages.index.case_key)
        pa.field("dataset", pa.string()),  # source name: what retrieval can be scoped to
        pa.field("modality", pa.string()),  # imaging modality
        pa.field("split", pa.string()),  # the source split the image came from
        pa.field("label", pa.string()),  # the image's diagnosis label(s), ", "-joined; null when it has none
        pa.field("report", pa.string()),  # its report (a reference report, else the bootstrapped one); or null
        pa.field("qa", QA_TYPE),  # its VQA question-answer pairs (empty when none)
        # Where the case's image lives, so a report can show a neighbour's image (paper Figure 5) without the index
        # holding images: the source file (dictionary-encoded: a few distinct paths over millions of rows) and the
        # row inside it.
        pa.field("source_file", pa.dictionary(pa.int32(), pa.string())),
        pa.field("source_index", pa.int64()),
    ]
)
VALUE_COLUMNS: List[str] = VALUES_SCHEMA.names
REQUIRED_VALUE_COLUMNS: List[str] = ["id", "dataset", "modality", "label", "report", "qa"]

_VERSION_RE = re.compile(r"^v(\d+)$")
_STALE_TMP_S = 3600  # temporary folders older than this are from crashed publishers


class IndexArtifactError(ValueError):
    """A published index that cannot be used (missing, corrupt, or built with another encoder); says why."""


class PublishConflict(IndexArtifactError):
    """``CURRENT`` no longer names the version a build was made on: another publisher won; nothing was published."""


def case_key(dataset: Optional[str], image: Optional[bytes], sample_id: str) -> str:
    """The case an annotation belongs to: one image of one dataset, named by its content, so the key is the same
    on every machine and run, and every question, label and report of an image lands in one case. A row without
    an image (set aside by its reader) stays a case of its own, named by its sample id."""
    if not image:
        return f"noimage:{sample_id}"
    return hashlib.sha1(f"{dataset}\x1f".encode() + image).hexdigest()[:24]


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "FAISS is not installed: install meddr-ray with the extra of this machine's build, "
            "pip install -e '.[cpu]' (CPU) or -e '.[gpu]' (CUDA); `make install` installs the CPU one"
        ) from None
    return faiss


# ------------------------------------------------------------------------------------------------ building


@dataclass
class IndexParams:
    """How an index is built and searched (from :class:`~meddr_ray.config.IndexConfig`)."""

    kind: str = "flat"
    nlist: int = 1024
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    pq_m: int = 64
    pq_nbits: int = 8

    @classmethod
    def from_config(cls, cfg: IndexConfig, kind: str) -> "IndexParams":
        return cls(kind, cfg.nlist, cfg.nprobe, cfg.hnsw_m, cfg.ef_construction, cfg.ef_search, cfg.pq_m, cfg.pq_nbits)

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


def check_vectors(vectors: np.ndarray, dim: Optional[int] = None, where: str = "vectors") -> np.ndarray:
    """A C-contiguous float32 ``(n, dim)`` array of unit rows (cosine = inner product needs unit rows)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D array of embeddings, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{where}: embeddings have dimension {x.shape[1]}, the index has {dim}")
    if len(x):
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # cheaper than linalg.norm on the per-query path
        bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
        if len(bad):
            raise ValueError(
                f"{where}: row {int(bad[0])} has norm {norms[bad[0]]:.4f}; the index needs L2-normalised embeddings"
            )
    return x


def gpu_available() -> bool:
    return hasattr(_faiss(), "StandardGpuResources") and _faiss().get_num_gpus() > 0


def use_gpu(device: str) -> bool:
    """True when ``device == "gpu"`` and faiss-gpu with a visible GPU is there; logs which is used."""
    if device != "gpu":
        return False
    if gpu_available():
        log.info("FAISS: using the GPU (faiss-gpu, %d GPU(s))", _faiss().get_num_gpus())
        return True
    log.warning("FAISS: index.device=gpu but faiss has no GPU support or sees no GPU; using the CPU")
    return False


_GPU_RESOURCES = None


def to_gpu(index):
    """A GPU copy of a flat / IVF index (HNSW has no GPU version and stays on the CPU)."""
    global _GPU_RESOURCES
    faiss = _faiss()
    if isinstance(index, faiss.IndexHNSW):
        log.info("FAISS: HNSW has no GPU implementation; searching on the CPU")
        return index
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


def to_cpu(index):
    faiss = _faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


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


def apply_search_params(index, nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> None:
    """Set the query-time knobs of an IVF (nprobe) or HNSW (efSearch) index; flat has none."""
    faiss = _faiss()
    if nprobe is not None:
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            ivf = None
        if ivf is not None:
            ivf.nprobe = min(int(nprobe), ivf.nlist)
    if ef_search is not None and isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = int(ef_search)


def scoped_search(index, x: np.ndarray, k: int, selector):
    """``index.search`` limited to the ids ``selector`` accepts (a ``faiss.IDSelector``), keeping the index's own
    nprobe / efSearch: FAISS filters during the search, so a small dataset inside a large index still gets its
    full top-k. CPU indexes only (FAISS's GPU indexes take no selector)."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=index.hnsw.efSearch)
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=index.nprobe)
    else:
        params = faiss.SearchParameters(sel=selector)
    return index.search(x, int(k), params=params)


def kind_of(index) -> str:
    faiss = _faiss()
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return "flat"


def index_to_bytes(index) -> np.ndarray:
    """Serialised index (uint8 array): how shards travel through Ray's object store."""
    return _faiss().serialize_index(to_cpu(index))


def index_from_bytes(buf: np.ndarray):
    return _faiss().deserialize_index(np.asarray(buf, dtype=np.uint8))


def conform_values(values: pa.Table) -> pa.Table:
    """``values`` in :data:`VALUES_SCHEMA`, in its column order; optional columns it lacks (the image location, in
    indexes and callers older than it) become nulls."""
    missing = [c for c in REQUIRED_VALUE_COLUMNS if c not in values.column_names]
    if missing:
        raise ValueError(f"index values lack the columns {missing}")
    columns = [
        values.column(f.name).cast(f.type) if f.name in values.column_names else pa.nulls(values.num_rows, f.type)
        for f in VALUES_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=VALUES_SCHEMA)


# -------------------------------------------------------------------------------------------- publishing


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as f:
        while True:
            chunk = f.read(8 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _size(path: str) -> int:
    fs, p = storage.resolve(path)
    return int(fs.get_file_info(p).size)


def save_index(index, path: str) -> None:
    """Write an index file (a shard, a template) to a local path or URI; a reader never sees half of it."""
    if is_uri(path):
        storage.write_bytes(path, index_to_bytes(index).tobytes())
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    _faiss().write_index(to_cpu(index), tmp)
    os.replace(tmp, path)


def read_index_file(path: str):
    """An index file written by :func:`save_index` (a shard or template: in-memory inverted lists)."""
    if is_uri(path):
        return index_from_bytes(np.frombuffer(storage.read_bytes(path), dtype=np.uint8))
    return _faiss().read_index(path)


def _read_index(path: str, on_disk: bool = False):
    """A published ``index.faiss``; ``on_disk``: its inverted lists are ``index.ivfdata`` in the same folder,
    mapped into memory (a local path: :func:`load_index` fetches an object-store version first)."""
    if on_disk:
        return _faiss().read_index(path, _faiss().IO_FLAG_ONDISK_SAME_DIR)
    if is_uri(path):
        return index_from_bytes(np.frombuffer(storage.read_bytes(path), dtype=np.uint8))
    return _faiss().read_index(path)


# ----------------------------------------------------------------------------------- merging on disk


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


def open_index_file(path: str):
    """A shard file, or a published ``index.faiss`` whose lists live beside it in ``index.ivfdata``."""
    sibling = os.path.join(os.path.dirname(path), IVFDATA_FILE)
    if not is_uri(path) and os.path.basename(path) == INDEX_FILE and os.path.exists(sibling):
        return _read_index(path, on_disk=True)
    return read_index_file(path)


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


def describe(index) -> Dict[str, Any]:
    """The manifest fields an index gives: dimension, count, FAISS class, kind."""
    return {"dim": int(index.d), "count": int(index.ntotal), "faiss_type": type(index).__name__,
            "index_type": kind_of(index)}  # fmt: skip


def _write_parquet(table: pa.Table, path: str) -> None:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    pq.write_table(table, p, filesystem=fs)


def _read_parquet(path: str) -> pa.Table:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    return pq.read_table(p, filesystem=fs)


def list_versions(index_dir: str) -> List[str]:
    """Published version folders (``v0001``, ``v0002``, ...) in order."""
    fs, p = storage.resolve(index_dir)
    import pyarrow.fs as pafs

    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    names = [
        os.path.basename(i.path)
        for i in fs.get_file_info(pafs.FileSelector(p, recursive=False))
        if i.type == pafs.FileType.Directory
    ]
    return sorted((n for n in names if _VERSION_RE.match(n)), key=lambda n: int(n[1:]))


def current_version(index_dir: str) -> Optional[str]:
    """The version ``CURRENT`` names, or None when nothing has been published."""
    path = join_path(index_dir, CURRENT_FILE)
    if not storage.exists(path):
        return None
    return storage.read_text(path).strip() or None


def _next_version(index_dir: str) -> str:
    versions = list_versions(index_dir)
    return f"v{(int(versions[-1][1:]) + 1) if versions else 1:04d}"


def _claim_and_rename(tmp: str, final: str) -> None:
    """Move the finished temporary folder (local) to its version name; FileExistsError if that name is taken."""
    os.mkdir(final)  # atomic claim of the name: two publishers never get the same version
    os.rename(tmp, final)  # replaces the empty claimed folder in one step


def _switch_current(index_dir: str, version: str) -> None:
    storage.write_text(join_path(index_dir, CURRENT_FILE), version + "\n")  # temp file + rename


def _remove_stale_tmp(index_dir: str) -> None:
    if is_uri(index_dir) or not os.path.isdir(index_dir):
        return
    now = time.time()
    for name in os.listdir(index_dir):
        path = os.path.join(index_dir, name)
        if name.startswith(".tmp-") and now - os.path.getmtime(path) > _STALE_TMP_S:
            log.info("removing %s, left by an interrupted publish", path)
            storage.remove(path)


class _Unchecked:
    def __repr__(self) -> str:
        return "UNCHECKED"


UNCHECKED: Any = _Unchecked()  # publish(parent=UNCHECKED): no compare-and-swap on CURRENT (tools, tests)
LOCK_FILE = ".publish.lock"


@contextlib.contextmanager
def _publish_lock(index_dir: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``<index_dir>/.publish.lock``: the check of CURRENT, the claim of a version name
    and the switch happen as one step among publishers of this folder (threads or processes, on one machine or
    over a filesystem whose locks are shared, e.g. NFSv4). The kernel drops it if the holder dies."""
    import fcntl

    with open(os.path.join(index_dir, LOCK_FILE), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def find_build(index_dir: str, build_id: Optional[str]) -> Optional[Dict[str, Any]]:
    """The manifest of the version published by ``build_id`` (newest first), or None: what makes a retried
    publish return the version its first attempt made instead of a second one."""
    if not build_id:
        return None
    for version in reversed(list_versions(index_dir)):
        path = join_path(index_dir, version, MANIFEST_FILE)
        if not storage.exists(path):
            continue  # a claimed version still being written (object stores)
        try:
            manifest = json.loads(storage.read_text(path))
        except (ValueError, UnicodeDecodeError):
            continue
        if manifest.get("build_id") == build_id:
            manifest["path"] = join_path(index_dir, version)
            return manifest
    return None


def _conflict(index_dir: str, parent: Optional[str], current: Optional[str]) -> PublishConflict:
    return PublishConflict(
        f"{join_path(index_dir, CURRENT_FILE)} names {current or 'nothing'}, but this build was made on "
        f"{parent or 'an empty index folder'}: another publisher moved it in between; nothing was published. Run "
        f"the build (or the --add) again to make it on {current or 'an empty folder'}"
    )


def new_stage(index_dir: str) -> str:
    """A private local folder to write a version's files into before :func:`publish_staged`: a hidden sibling of
    the versions (local ``index_dir``: renamed into place), or a local temporary folder (object stores)."""
    if is_uri(index_dir):
        return tempfile.mkdtemp(prefix="meddr-index-stage-")
    storage.makedirs(index_dir)
    _remove_stale_tmp(index_dir)
    stage = join_path(index_dir, f".tmp-{uuid.uuid4().hex[:12]}")
    os.makedirs(stage)
    return stage


def stage_index(index, values: pa.Table, stage: str) -> Dict[str, Any]:
    """Write an in-memory index and its values into ``stage``; returns :func:`describe` of the index."""
    index = to_cpu(index)
    values = conform_values(values)
    if values.num_rows != index.ntotal:
        raise IndexArtifactError(f"refusing to publish: {values.num_rows} value rows for {index.ntotal} vectors")
    _faiss().write_index(index, os.path.join(stage, INDEX_FILE))
    _write_parquet(values, os.path.join(stage, VALUES_FILE))
    return describe(index)


def publish(
    index_dir: str,
    index,
    values: pa.Table,
    manifest: Dict[str, Any],
    extra_files: Optional[Dict[str, str]] = None,
    parent: Any = UNCHECKED,
    build_id: Optional[str] = None,
) -> Dict[str, Any]:
    """Write an in-memory index as a new version and make it current (see :func:`publish_staged`)."""
    index = to_cpu(index)
    values = conform_values(values)
    if values.num_rows != index.ntotal:
        raise IndexArtifactError(f"refusing to publish: {values.num_rows} value rows for {index.ntotal} vectors")
    if find_build(index_dir, build_id) is None:
        stage = new_stage(index_dir)
        info = stage_index(index, values, stage)
    else:
        stage, info = None, describe(index)
    return publish_staged(index_dir, stage, info, manifest, extra_files, parent=parent, build_id=build_id)


def publish_staged(
    index_dir: str,
    stage: Optional[str],
    info: Dict[str, Any],
    manifest: Dict[str, Any],
    extra_files: Optional[Dict[str, str]] = None,
    parent: Any = UNCHECKED,
    build_id: Optional[str] = None,
) -> Dict[str, Any]:
    """Publish the files in the local folder ``stage`` (``index.faiss``, optionally ``index.ivfdata``,
    ``values.parquet``) as a new version and make it current. Returns the manifest as written (with ``version``
    and ``path``); ``stage`` is consumed.

    ``manifest`` carries the caller's fields (encoder fingerprint, model, parent, summary...); this adds the
    version, ``info`` (:func:`describe`), file sizes and sha256 checksums. ``extra_files``: name -> text.

    - ``parent``: compare-and-swap. The version ``CURRENT`` must still name (None: nothing published yet), else
      :class:`PublishConflict` and nothing is published -- a build made on a stale parent never moves ``CURRENT``
      backwards or drops a version published in between. ``UNCHECKED``: no check.
    - ``build_id``: idempotence. If a version with this build id exists (an earlier attempt of the same build
      that got as far as publishing), it is returned and no new version is made.

    Local folders: the checks, the claim of the version name and the switch run under an exclusive lock
    (:func:`_publish_lock`). Object stores (pyarrow: no lock, no conditional write) get the best that is
    available: the checks, a version folder claimed with a ``CLAIM`` object naming this build and read back, the
    files, the manifest, the check of ``CURRENT`` again just before it is written, and a read-back after it; two
    publishers that pass the last check within the same moment can still both write ``CURRENT`` (the later one
    wins). Run one publisher per index folder there, or publish to a local/NFS folder.
    """
    if stage is not None:
        count = _values_rows(os.path.join(stage, VALUES_FILE))
        if count != info["count"]:
            shutil.rmtree(stage, ignore_errors=True)
            raise IndexArtifactError(f"refusing to publish: {count} value rows for {info['count']} vectors")
        for name, text in (extra_files or {}).items():
            with open(os.path.join(stage, name), "w", encoding="utf-8") as f:
                f.write(text)
    names = [n for n in (INDEX_FILE, IVFDATA_FILE, VALUES_FILE) if stage and os.path.exists(os.path.join(stage, n))]
    full = dict(manifest)
    full.update(format=FORMAT_VERSION, metric=METRIC, **info)
    if stage is not None:
        full["files"] = {n: {"bytes": _size(os.path.join(stage, n)), "sha256": _sha256_file(os.path.join(stage, n))}
                         for n in names}  # fmt: skip
    if build_id:
        full["build_id"] = build_id
    full.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.makedirs(index_dir)
    if is_uri(index_dir):
        return _publish_uri(index_dir, stage, full, parent, build_id)
    with _publish_lock(index_dir):
        done = find_build(index_dir, build_id)
        if done is not None:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            log.info("publish: build %s is already version %s", build_id, done["version"])
            return done
        if stage is None:
            raise IndexArtifactError(f"{index_dir}: build {build_id} was expected to be published but is not")
        current = current_version(index_dir)
        if parent is not UNCHECKED and current != parent:
            shutil.rmtree(stage, ignore_errors=True)
            raise _conflict(index_dir, parent, current)
        for _ in range(1000):  # a publisher without the lock (an older meddr-ray) may hold the next number
            version = _next_version(index_dir)
            _write_manifest(full, version, stage)
            final = join_path(index_dir, version)
            try:
                _claim_and_rename(stage, final)
                break
            except FileExistsError:
                continue
        else:
            raise IndexArtifactError(f"{index_dir}: could not claim a version name")
        _switch_current(index_dir, version)
    full["path"] = final
    return full


def _write_manifest(full: Dict[str, Any], version: str, where: str) -> None:
    full["version"] = version
    storage.write_text(join_path(where, MANIFEST_FILE), json.dumps(full, indent=2, sort_keys=True) + "\n")


def _values_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def _publish_uri(index_dir: str, stage: Optional[str], full: Dict[str, Any], parent: Any, build_id) -> Dict[str, Any]:
    """Object stores: no folder rename, no lock, no conditional write (see :func:`publish_staged`)."""
    import pyarrow.fs as pafs

    done = find_build(index_dir, build_id)
    if done is not None:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        return done
    if stage is None:
        raise IndexArtifactError(f"{index_dir}: build {build_id} was expected to be published but is not")
    try:
        current = current_version(index_dir)
        if parent is not UNCHECKED and current != parent:
            raise _conflict(index_dir, parent, current)
        token = build_id or uuid.uuid4().hex
        final = version = None
        for _ in range(1000):
            version = _next_version(index_dir)
            final = join_path(index_dir, version)
            if storage.exists(final):
                continue
            storage.write_text(join_path(final, "CLAIM"), token)
            if storage.read_text(join_path(final, "CLAIM")) == token:  # another claimer's write would show here
                break
        else:
            raise IndexArtifactError(f"{index_dir}: could not claim a version name")
        fs, remote = storage.resolve(final)
        for name in os.listdir(stage):
            pafs.copy_files(os.path.join(stage, name), f"{remote}/{name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)  # fmt: skip
        _write_manifest(full, version, final)  # written last: a version without it is incomplete
        current = current_version(index_dir)
        if parent is not UNCHECKED and current != parent:
            storage.remove(final)
            raise _conflict(index_dir, parent, current)
        _switch_current(index_dir, version)
        if current_version(index_dir) != version:
            raise PublishConflict(
                f"{join_path(index_dir, CURRENT_FILE)}: another publisher wrote it at the same moment (object "
                f"stores have no conditional write); {version} is complete but not current"
            )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    full["path"] = final
    return full


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedIndex:
    """A published version in memory: FAISS index, values (row i = FAISS id i) and manifest."""

    index: Any
    values: pa.Table
    manifest: Dict[str, Any]
    version: str
    path: str
    index_dir: str

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)


_REQUIRED = ("version", "dim", "count", "metric", "encoder_fingerprint", "files")


def load_manifest(index_dir: str, version: Optional[str] = None) -> Dict[str, Any]:
    """The manifest of ``version`` (default: the one ``CURRENT`` names), checked for the fields readers need."""
    if version is None:
        cur = join_path(index_dir, CURRENT_FILE)
        if not storage.exists(cur):
            raise IndexArtifactError(
                f"{index_dir}: no published index ({CURRENT_FILE} is missing); build one with `meddr-ray index`"
            )
        version = storage.read_text(cur).strip()
        if not version:
            raise IndexArtifactError(f"{cur} is empty; it should name the live version")
    vdir = join_path(index_dir, version)
    mpath = join_path(vdir, MANIFEST_FILE)
    if not storage.exists(mpath):
        known = ", ".join(list_versions(index_dir)) or "none"
        what = "does not exist" if not storage.exists(vdir) else f"has no {MANIFEST_FILE} (incomplete)"
        raise IndexArtifactError(f"{index_dir}: index version {version!r} {what}; published versions: {known}")
    try:
        manifest = json.loads(storage.read_text(mpath))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexArtifactError(f"{mpath}: not valid JSON ({exc})") from None
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise IndexArtifactError(f"{mpath}: missing fields {missing}")
    if manifest["version"] != version:
        raise IndexArtifactError(f"{mpath}: says version {manifest['version']!r} but lies in folder {version!r}")
    if manifest["metric"] != METRIC:
        raise IndexArtifactError(f"{mpath}: metric {manifest['metric']!r}, expected {METRIC!r}")
    manifest["path"] = vdir
    return manifest


def published_manifest(index_dir: str, needed_by: str, hint: str = "") -> Dict[str, Any]:
    """The manifest of the version ``CURRENT`` names, for a stage that cannot run without one: FileNotFoundError
    saying which stage (``needed_by``) needs it and how to get one when nothing is published."""
    if current_version(index_dir) is None:
        raise FileNotFoundError(
            f"{needed_by}: no retrieval index at {index_dir} (no published version: "
            f"{join_path(index_dir, CURRENT_FILE)} is missing); run `meddr-ray index` first{hint}"
        )
    return load_manifest(index_dir)


def check_compatible(
    manifest: Dict[str, Any], expect_dim: Optional[int] = None, expect_fingerprint: Optional[str] = None
) -> None:
    """Refuse an index built with another encoder: a different embedding dimension or weights fingerprint."""
    where = join_path(manifest["path"], MANIFEST_FILE)
    if expect_dim is not None and int(manifest["dim"]) != int(expect_dim):
        raise IndexArtifactError(
            f"{where}: the index has dimension {manifest['dim']} but the encoder produces {expect_dim}; "
            f"it was built with another model ({manifest.get('model_name')!r}): rebuild it with `meddr-ray index`"
        )
    if expect_fingerprint is not None and manifest["encoder_fingerprint"] != expect_fingerprint:
        raise IndexArtifactError(
            f"{where}: the index was built with encoder {manifest['encoder_fingerprint']} "
            f"({manifest.get('model_name')!r}) but the current encoder is {expect_fingerprint}; its vectors are not "
            f"comparable: rebuild it with `meddr-ray index`"
        )


def _check_file(vdir: str, name: str, expected: Dict[str, Any], verify: bool) -> str:
    path = join_path(vdir, name)
    if not storage.exists(path):
        raise IndexArtifactError(f"{path} is missing")
    size = _size(path)
    if size != int(expected["bytes"]):
        raise IndexArtifactError(
            f"{path} is truncated or corrupt: {size} bytes, the manifest says {expected['bytes']}"
        )
    if verify and _sha256_file(path) != expected["sha256"]:
        raise IndexArtifactError(f"{path} is corrupt: its sha256 does not match the manifest")
    return path


def _fetch_on_disk_version(vdir: str, files: Dict[str, Any]) -> str:
    """FAISS maps ``index.ivfdata`` from a local file: copy an object-store version's index files into a local
    cache folder named by their checksums (fetched once per machine), and return the local ``index.faiss``."""
    import pyarrow.fs as pafs

    key = hashlib.sha256("".join(files[n]["sha256"] for n in (INDEX_FILE, IVFDATA_FILE)).encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), f"meddr-index-{key}")
    if not os.path.exists(os.path.join(local, INDEX_FILE)):
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp)
        fs, remote = storage.resolve(vdir)
        for name in (IVFDATA_FILE, INDEX_FILE):
            pafs.copy_files(f"{remote}/{name}", os.path.join(tmp, name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
        try:
            os.rename(tmp, local)
        except OSError:  # another loader on this machine fetched it first
            shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(local, INDEX_FILE)


def load_index(
    index_dir: str,
    expect_dim: Optional[int] = None,
    expect_fingerprint: Optional[str] = None,
    version: Optional[str] = None,
    verify: bool = True,
) -> LoadedIndex:
    """Load a published version (default: ``CURRENT``) after checking it end to end. An IVF version's inverted
    lists (``index.ivfdata``) are mapped into memory, not read: pages come from disk as searches touch them.

    Raises :class:`IndexArtifactError` with the reason when: nothing is published or the version is missing; the
    manifest's dimension or encoder fingerprint differs from ``expect_*``; ``index.faiss`` or ``values.parquet``
    is truncated or fails its checksum (``verify``) or cannot be read; the values do not line up with the index.
    """
    manifest = load_manifest(index_dir, version)
    version, vdir = manifest["version"], manifest["path"]
    check_compatible(manifest, expect_dim, expect_fingerprint)
    files = manifest["files"]
    for name in (INDEX_FILE, VALUES_FILE):
        if name not in files:
            raise IndexArtifactError(f"{join_path(vdir, MANIFEST_FILE)}: lists no {name}")
    checked = {name: _check_file(vdir, name, expected, verify) for name, expected in files.items()}
    ipath, vpath = checked[INDEX_FILE], checked[VALUES_FILE]
    on_disk = IVFDATA_FILE in files
    if on_disk and is_uri(ipath):
        ipath = _fetch_on_disk_version(vdir, files)
    try:
        index = _read_index(ipath, on_disk=on_disk)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IndexArtifactError(f"{ipath}: not a readable FAISS index ({reason})") from None
    if int(index.d) != int(manifest["dim"]) or int(index.ntotal) != int(manifest["count"]):
        raise IndexArtifactError(
            f"{ipath}: holds {index.ntotal} vectors of dimension {index.d}, the manifest says "
            f"{manifest['count']} of dimension {manifest['dim']}"
        )
    try:
        values = _read_parquet(vpath)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise IndexArtifactError(f"{vpath}: not a readable Parquet file ({exc})") from None
    missing = [c for c in REQUIRED_VALUE_COLUMNS if c not in values.column_names]
    if missing:
        older = "task" in values.column_names and "text" in values.column_names
        raise IndexArtifactError(
            f"{vpath}: missing columns {missing}"
            + ("; it was published by an older meddr-ray (one vector per task row, not per image): rebuild it "
               "with `meddr-ray index`" if older else "")
        )
    values = conform_values(values)
    if values.num_rows != index.ntotal:
        raise IndexArtifactError(
            f"{vpath}: {values.num_rows} rows but the index holds {index.ntotal} vectors; the values do not line "
            f"up with the index"
        )
    params = manifest.get("params", {})
    apply_search_params(index, params.get("nprobe"), params.get("ef_search"))
    return LoadedIndex(index=index, values=values, manifest=manifest, version=version, path=vdir, index_dir=index_dir)
