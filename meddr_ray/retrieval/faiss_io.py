"""FAISS objects without Ray: the import, the device (CPU or GPU), index files and their bytes, search
parameters, and the checks every vector passes (cosine similarity is the inner product of unit rows)."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Dict, Optional

import numpy as np

from meddr_ray import storage
from meddr_ray.retrieval.format import INDEX_FILE, IVFDATA_FILE
from meddr_ray.storage import is_uri

log = logging.getLogger("meddr_ray.retrieval.faiss_io")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "FAISS is not installed: install meddr-ray with the extra of this machine's build, "
            "pip install -e '.[cpu]' (CPU) or -e '.[gpu]' (CUDA); `make install` installs the CPU one"
        ) from None
    return faiss


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


def describe(index) -> Dict[str, Any]:
    """The manifest fields an index gives: dimension, count, FAISS class, kind."""
    return {"dim": int(index.d), "count": int(index.ntotal), "faiss_type": type(index).__name__,
            "index_type": kind_of(index)}  # fmt: skip


def index_to_bytes(index) -> np.ndarray:
    """Serialised index (uint8 array): how shards travel through Ray's object store."""
    return _faiss().serialize_index(to_cpu(index))


def index_from_bytes(buf: np.ndarray):
    return _faiss().deserialize_index(np.asarray(buf, dtype=np.uint8))


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


def read_published_index(path: str, on_disk: bool = False):
    """A published ``index.faiss``; ``on_disk``: its inverted lists are ``index.ivfdata`` in the same folder,
    mapped into memory (a local path: :func:`meddr_ray.retrieval.store.load_index` fetches an object-store
    version first)."""
    if on_disk:
        return _faiss().read_index(path, _faiss().IO_FLAG_ONDISK_SAME_DIR)
    if is_uri(path):
        return index_from_bytes(np.frombuffer(storage.read_bytes(path), dtype=np.uint8))
    return _faiss().read_index(path)


def open_index_file(path: str):
    """A shard file, or a published ``index.faiss`` whose lists live beside it in ``index.ivfdata``."""
    sibling = os.path.join(os.path.dirname(path), IVFDATA_FILE)
    if not is_uri(path) and os.path.basename(path) == INDEX_FILE and os.path.exists(sibling):
        return read_published_index(path, on_disk=True)
    return read_index_file(path)
