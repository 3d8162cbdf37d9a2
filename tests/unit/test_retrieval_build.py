"""FAISS building blocks (no Ray): sharded builds merge into the same index as a single build."""

from __future__ import annotations

import numpy as np
import pytest

from meddr_ray.retrieval import build
from meddr_ray.retrieval import faiss_io


def clustered(n: int, dim: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: what embeddings of a real collection look like."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_picks_flat_below_the_threshold_and_ivf_from_it():
    assert build.resolve_kind("auto", 99_999, 100_000) == "flat"
    assert build.resolve_kind("auto", 100_000, 100_000) == "ivf"
    assert build.resolve_kind("hnsw", 10, 100_000) == "hnsw"
    with pytest.raises(ValueError, match="not one of"):
        build.resolve_kind("pq", 10, 100)


def test_nlist_shrinks_for_small_collections():
    assert build.effective_nlist(1024, 624) == 16  # 624 // 39
    assert build.effective_nlist(8, 10_000) == 8
    assert build.effective_nlist(1024, 5) == 1
    assert build.ivf_train_size(16, 624) == 624
    assert build.ivf_train_size(16, 100_000) == 1024
    assert build.ivf_train_size(16, 100_000, 5000) == 5000


def test_vectors_must_be_unit_rows_of_the_index_dimension():
    x = clustered(10)
    faiss_io.check_vectors(x, 32)
    with pytest.raises(ValueError, match="row 3 has norm 2.0000"):
        y = x.copy()
        y[3] *= 2
        faiss_io.check_vectors(y)
    with pytest.raises(ValueError, match="dimension 32, the index has 16"):
        faiss_io.check_vectors(x, 16)


def test_sharded_flat_build_equals_single_build():
    x = clustered(3000)
    queries = x[::97]
    single = build.build_shard(x, build.IndexParams("flat"))
    parts = np.array_split(np.arange(len(x)), 4)
    shards = [build.build_shard(x[p], build.IndexParams("flat")) for p in parts]
    merged = build.merge_shards([faiss_io.index_from_bytes(faiss_io.index_to_bytes(s)) for s in shards])  # via the object store
    assert merged.ntotal == len(x)
    d1, i1 = single.search(queries, 10)
    d2, i2 = merged.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-6)
    assert (i1[:, 0] == np.arange(0, len(x), 97)).all()  # every query finds itself first
    np.testing.assert_allclose(d1[:, 0], 1.0, atol=1e-5)


def test_sharded_ivf_build_from_one_template_equals_single_build():
    x = clustered(4000)
    params = build.IndexParams("ivf", nlist=32, nprobe=4)
    template = build.train_ivf(x[::2], params, nlist=32)
    assert template.ntotal == 0 and template.is_trained
    single = build.build_shard(x, params, template)
    parts = np.array_split(np.arange(len(x)), 3)
    shards = [build.build_shard(x[p], params, faiss_io.index_from_bytes(faiss_io.index_to_bytes(template))) for p in parts]
    merged = build.merge_shards(shards)
    assert merged.ntotal == len(x) and merged.nprobe == 4
    d1, i1 = single.search(x[::50], 5)
    d2, i2 = merged.search(x[::50], 5)
    np.testing.assert_array_equal(i1, i2)  # same cells, same ids: the merge is exact
    np.testing.assert_allclose(d1, d2, atol=1e-6)
    # adding later uses the trained quantizer: no retraining, ids continue
    more = clustered(100, seed=1)
    merged.add(more)
    _, i3 = merged.search(more[:5], 1)
    assert (i3[:, 0] == np.arange(4000, 4005)).all()


def test_hnsw_finds_the_exact_neighbours_on_a_small_collection():
    x = clustered(2000)
    params = build.IndexParams("hnsw", hnsw_m=32, ef_construction=80, ef_search=128)
    hnsw = build.build_hnsw(x, params)
    assert faiss_io.kind_of(hnsw) == "hnsw" and hnsw.hnsw.efSearch == 128
    exact = build.build_shard(x, build.IndexParams("flat"))
    q = clustered(50, seed=3)
    _, ie = exact.search(q, 5)
    _, ih = hnsw.search(q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ie, ih)])
    assert recall >= 0.95
    with pytest.raises(ValueError, match="HNSW cannot be merged"):
        build.build_shard(x, params)


def test_search_params_apply_to_ivf_and_hnsw():
    x = clustered(2000)
    ivf = build.build_shard(x, build.IndexParams("ivf"), build.train_ivf(x, build.IndexParams("ivf", nprobe=2), nlist=16))
    faiss_io.apply_search_params(ivf, nprobe=8)
    assert ivf.nprobe == 8
    faiss_io.apply_search_params(ivf, nprobe=1000)
    assert ivf.nprobe == 16  # never more than the cells there are
    flat = build.build_shard(x, build.IndexParams("flat"))
    faiss_io.apply_search_params(flat, nprobe=8, ef_search=8)  # nothing to set, no error


def test_gpu_is_used_only_when_asked_and_available(caplog):
    assert faiss_io.use_gpu("cpu") is False
    with caplog.at_level("WARNING", logger="meddr_ray.retrieval.faiss_io"):
        used = faiss_io.use_gpu("gpu")
    assert used == faiss_io.gpu_available()
    if not used:
        assert "using the CPU" in caplog.text


def test_index_params_come_from_the_config_by_name_and_cannot_be_filled_by_position():
    """nlist and nprobe are both ints: filled by position, a reordering of the fields would swap them silently."""
    import dataclasses

    from meddr_ray.config import IndexConfig

    cfg = IndexConfig(nlist=7, nprobe=3, hnsw_m=5, ef_construction=11, ef_search=13, pq_m=2, pq_nbits=4)
    params = build.IndexParams.from_config(cfg, "ivfpq")
    assert params.kind == "ivfpq"
    for f in dataclasses.fields(build.IndexParams):
        if f.name != "kind":
            assert getattr(params, f.name) == getattr(cfg, f.name), f.name
    with pytest.raises(TypeError):
        build.IndexParams("ivf", 16, 4)  # every field after the kind is keyword-only
