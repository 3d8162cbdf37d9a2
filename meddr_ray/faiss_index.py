"""FAISS indexes for the retrieval database, without Ray: build, shard and merge, publish, load with checks.

Cosine similarity is the inner product of L2-normalised vectors (``METRIC_INNER_PRODUCT``); the encoder already
returns unit rows. Three kinds:

- ``flat``: exact search. Shards are ``IndexFlatIP`` and are concatenated with ``merge_from``.
- ``ivf``: ``IndexIVFFlat``. One template is trained on a sample (the coarse quantizer), every shard is a
  ``faiss.clone_index`` of it, and the shards' inverted lists are merged with ``merge_from`` -- so every shard
  shares the same cells and the merge is exact. Adding later uses the trained quantizer: no retraining.
- ``hnsw``: ``IndexHNSWFlat``. A graph cannot be merged (HNSW has no ``merge_from``), so it is built from the
  gathered vectors in one place; adding later inserts into the graph.

A published version is a folder ``<index_dir>/<version>/`` with ``manifest.json``, ``index.faiss`` and
``values.parquet`` (row i = FAISS id i). It is written under a temporary name, renamed into place, and only then
named by ``<index_dir>/CURRENT`` (itself replaced atomically), so a reader never sees a half-written version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from meddr_ray import storage
from meddr_ray.config import IndexConfig, is_uri, join_path

log = logging.getLogger("meddr_ray.index")

KINDS = ("flat", "ivf", "hnsw")
METRIC = "inner_product"
INDEX_FILE = "index.faiss"
VALUES_FILE = "values.parquet"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
FORMAT_VERSION = 2  # 2: one case per image (label, report, qa); 1 had one row per task (task, text)

# The value of every FAISS id: one case per image (paper section 3.3: "the visual embedding as the key while the
# text is the value"), with every annotation the training data give that image.
QA_TYPE = pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))
VALUES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),  # the case: one image of one dataset (meddr_ray.index.case_key)
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


def case_key(dataset: Optional[str], image: Optional[bytes], sample_id: str) -> str:
    """The case an annotation belongs to: one image of one dataset, named by its content, so the key is the same
    on every machine and run, and every question, label and report of an image lands in one case. A row without
    an image (set aside by its reader) stays a case of its own, named by its sample id."""
    if not image:
        return f"noimage:{sample_id}"
    return hashlib.sha1(f"{dataset}\x1f".encode() + image).hexdigest()[:24]


def _faiss():
    import faiss

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

    @classmethod
    def from_config(cls, cfg: IndexConfig, kind: str) -> "IndexParams":
        return cls(kind, cfg.nlist, cfg.nprobe, cfg.hnsw_m, cfg.ef_construction, cfg.ef_search)

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind}
        if self.kind == "ivf":
            out.update(nlist=self.nlist, nprobe=self.nprobe)
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


def train_ivf(sample: np.ndarray, params: IndexParams, nlist: int, device: str = "cpu"):
    """The IVF template: an empty ``IndexIVFFlat`` whose coarse quantizer is trained on ``sample``."""
    faiss = _faiss()
    sample = check_vectors(sample, where="IVF training sample")
    dim = sample.shape[1]
    template = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
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
    elif params.kind == "ivf":
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


def _write_index(index, path: str) -> None:
    if is_uri(path):
        storage.write_bytes(path, index_to_bytes(index).tobytes())
    else:
        _faiss().write_index(to_cpu(index), path)


def _read_index(path: str):
    if is_uri(path):
        return index_from_bytes(np.frombuffer(storage.read_bytes(path), dtype=np.uint8))
    return _faiss().read_index(path)


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


def _claim_uri(index_dir: str) -> str:
    """Object stores cannot rename a folder: claim the next free version name and write into it directly.
    Readers still never see it before ``CURRENT`` names it (the manifest is written last)."""
    for _ in range(1000):
        final = join_path(index_dir, _next_version(index_dir))
        if not storage.exists(final):
            storage.makedirs(final)
            return final
    raise IndexArtifactError(f"{index_dir}: could not claim a version name")


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


def publish(
    index_dir: str,
    index,
    values: pa.Table,
    manifest: Dict[str, Any],
    extra_files: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Write a new version and make it current. Returns the manifest as written (with ``version``, ``path``).

    ``manifest`` carries the caller's fields (encoder fingerprint, model, parent, summary...); this adds the
    version, dimension, count, FAISS type, file sizes and sha256 checksums. ``extra_files``: name -> text.
    """
    index = to_cpu(index)
    values = conform_values(values)
    if values.num_rows != index.ntotal:
        raise IndexArtifactError(f"refusing to publish: {values.num_rows} value rows for {index.ntotal} vectors")
    storage.makedirs(index_dir)
    _remove_stale_tmp(index_dir)
    uri = is_uri(index_dir)
    folder = _claim_uri(index_dir) if uri else join_path(index_dir, f".tmp-{uuid.uuid4().hex[:12]}")
    storage.makedirs(folder)
    _write_index(index, join_path(folder, INDEX_FILE))
    _write_parquet(values, join_path(folder, VALUES_FILE))
    for name, text in (extra_files or {}).items():
        storage.write_text(join_path(folder, name), text)
    files = {
        name: {"bytes": _size(join_path(folder, name)), "sha256": _sha256_file(join_path(folder, name))}
        for name in (INDEX_FILE, VALUES_FILE)
    }
    full = dict(manifest)
    full.update(
        format=FORMAT_VERSION,
        dim=int(index.d),
        metric=METRIC,
        count=int(index.ntotal),
        faiss_type=type(index).__name__,
        index_type=kind_of(index),
        files=files,
    )
    full.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def write_manifest(version: str, where: str) -> None:
        full["version"] = version
        storage.write_text(join_path(where, MANIFEST_FILE), json.dumps(full, indent=2, sort_keys=True) + "\n")

    if uri:
        final = folder
        version = final.rstrip("/").rsplit("/", 1)[-1]
        write_manifest(version, final)
    else:
        for _ in range(1000):  # another publisher may take the same number between our scan and our claim
            version = _next_version(index_dir)
            write_manifest(version, folder)
            final = join_path(index_dir, version)
            try:
                _claim_and_rename(folder, final)
                break
            except FileExistsError:
                continue
        else:
            raise IndexArtifactError(f"{index_dir}: could not claim a version name")
    _switch_current(index_dir, version)
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


def load_index(
    index_dir: str,
    expect_dim: Optional[int] = None,
    expect_fingerprint: Optional[str] = None,
    version: Optional[str] = None,
    verify: bool = True,
) -> LoadedIndex:
    """Load a published version (default: ``CURRENT``) after checking it end to end.

    Raises :class:`IndexArtifactError` with the reason when: nothing is published or the version is missing; the
    manifest's dimension or encoder fingerprint differs from ``expect_*``; ``index.faiss`` or ``values.parquet``
    is truncated or fails its checksum (``verify``) or cannot be read; the values do not line up with the index.
    """
    manifest = load_manifest(index_dir, version)
    version, vdir = manifest["version"], manifest["path"]
    check_compatible(manifest, expect_dim, expect_fingerprint)
    files = manifest["files"]
    ipath = _check_file(vdir, INDEX_FILE, files[INDEX_FILE], verify)
    vpath = _check_file(vdir, VALUES_FILE, files[VALUES_FILE], verify)
    try:
        index = _read_index(ipath)
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
