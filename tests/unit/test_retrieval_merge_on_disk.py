"""Building at a size that does not fit one process: the sample reads only its rows, shard tasks hand
over files, the IVF merge holds one shard at a time and writes on-disk inverted lists, and the published version
loads with its lists mapped and its checksums verified. No Ray: the task functions are called directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddr_ray.retrieval import build
from meddr_ray.retrieval import faiss_io
from meddr_ray.retrieval import format as fmt
from meddr_ray.retrieval import store
from meddr_ray.retrieval.build import IndexParams
from meddr_ray.retrieval.format import IndexArtifactError

ROOT = Path(__file__).resolve().parents[2]


def unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, dim))
    x = (centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embedding_file(path: Path, x: np.ndarray, start: int = 0, row_group: int = 1000) -> None:
    """An embedding file as the encoder pool writes it (value columns + fingerprint + embedding)."""
    n, dim = x.shape
    t = pa.table(
        {
            "id": [f"case{i}" for i in range(start, start + n)],
            "dataset": ["toy"] * n,
            "split": ["train"] * n,
            "source_file": ["toy.npz"] * n,
            "source_index": pa.array(np.arange(start, start + n)),
            "modality": ["x"] * n,
            "label": [f"l{i % 3}" for i in range(start, start + n)],
            "report": pa.nulls(n, pa.string()),
            "qa": pa.array([[]] * n, fmt.QA_TYPE),
            "error": pa.nulls(n, pa.string()),
            "fingerprint": ["fp"] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
        }
    )
    pq.write_table(t, path, row_group_size=row_group)


def run_script(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (clean peak-memory counters); it prints one JSON line last."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the sample


def test_the_training_sample_reads_only_the_row_groups_of_its_rows(tmp_path):
    """The IVF training task reads the sampled rows, not every embedding column: its Arrow memory peaks at one
    row group (~0.5 MB here), not the file's 25 MB of vectors."""
    x = unit(50_000, 128)
    embedding_file(tmp_path / "e.parquet", x, row_group=1000)
    got = run_script(
        f"""
        import json, numpy as np, pyarrow as pa
        from meddr_ray.retrieval.embedding_files import read_entries
        rows = np.sort(np.random.default_rng(0).choice(50_000, 500, replace=False))
        pool = pa.default_memory_pool()
        x, _ = read_entries([({str(tmp_path / "e.parquet")!r}, rows)], 128, with_values=False)
        np.save({str(tmp_path / "got.npy")!r}, x)
        print(json.dumps({{"arrow_peak": pool.max_memory(), "rows": x.shape[0]}}))
        """
    )
    rows = np.sort(np.random.default_rng(0).choice(50_000, 500, replace=False))
    assert got["rows"] == 500
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), x[rows])
    assert got["arrow_peak"] < 5 * 2**20, got  # the whole column is 25.6 MB


def test_rows_beyond_a_file_are_refused_by_name(tmp_path):
    from meddr_ray.retrieval.embedding_files import read_entries

    embedding_file(tmp_path / "e.parquet", unit(10, 8))
    with pytest.raises(IndexArtifactError, match=r"e.parquet: row 12 asked for, the file has 10 rows"):
        read_entries([(str(tmp_path / "e.parquet"), np.array([3, 12]))], 8)


# ------------------------------------------------------------------------------------------ shard tasks


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_shard_tasks_hand_over_files_and_the_merge_equals_one_index(tmp_path, kind):
    """Shard tasks return paths (never index bytes through the object store); the on-disk merge of their files
    finds exactly what one index of all the vectors finds."""
    from meddr_ray.retrieval.build_steps import build_shard_files

    dim, n = 32, 6000
    x = unit(n, dim)
    for f in range(3):
        embedding_file(tmp_path / f"e{f}.parquet", x[f * 2000 : (f + 1) * 2000], start=f * 2000, row_group=300)
    params = IndexParams(kind, nlist=16, nprobe=16, pq_m=8)
    template = build.train_ivf(x[:3000], params, 16)
    faiss_io.save_index(template, str(tmp_path / "template.faiss"))
    shards = [
        [(str(tmp_path / "e0.parquet"), np.arange(2000)), (str(tmp_path / "e1.parquet"), np.arange(500))],
        [(str(tmp_path / "e1.parquet"), np.arange(500, 2000)), (str(tmp_path / "e2.parquet"), np.arange(2000))],
    ]
    built = [
        build_shard_files(e, dim, params, str(tmp_path / "template.faiss"), 1, str(tmp_path / f"shard-{i}"))
        for i, e in enumerate(shards)
    ]
    for b in built:
        assert isinstance(b["index"], str) and isinstance(b["values"], str) and os.path.exists(b["index"])
        assert b["peak_rss_mb"] > 0
    assert [b["count"] for b in built] == [2500, 3500]
    assert sum(b["sizes"].sum() for b in built) == n

    out = tmp_path / "merged"
    info = build.merge_ivf_on_disk(template, [b["index"] for b in built], str(out), [b["sizes"] for b in built])
    assert info == {"dim": dim, "count": n, "faiss_type": type(template).__name__, "index_type": kind}
    assert sorted(os.listdir(out)) == [fmt.INDEX_FILE, fmt.IVFDATA_FILE]
    merged = faiss_io.open_index_file(str(out / fmt.INDEX_FILE))
    whole = build.build_shard(x, params, template)
    merged.nprobe = whole.nprobe = 16
    d1, i1 = merged.search(x[:200], 5)
    d2, i2 = whole.search(x[:200], 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5)


def test_the_ivf_merge_holds_one_shard_at_a_time(tmp_path):
    """Peak anonymous memory of the merge (RssAnon polled every millisecond in a fresh process) stays near one
    shard: the old merge deserialised every shard at once (8 x 10 MB here)."""
    dim, per_shard, shards = 256, 10_000, 8
    params = IndexParams("ivf", nlist=64)
    x = unit(per_shard, dim)
    template = build.train_ivf(x, params, 64)
    faiss_io.save_index(template, str(tmp_path / "template.faiss"))
    for s in range(shards):
        shard = build.build_shard(unit(per_shard, dim, seed=s + 1), params, template)
        faiss_io.save_index(shard, str(tmp_path / f"s{s}.faiss"))
    shard_mb = os.path.getsize(tmp_path / "s0.faiss") / 2**20
    got = run_script(
        f"""
        import json, threading, time
        from meddr_ray.retrieval import build
        from meddr_ray.retrieval import faiss_io

        def anon_mb():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024

        template = faiss_io.read_index_file({str(tmp_path / "template.faiss")!r})
        paths = [{str(tmp_path)!r} + f"/s{{s}}.faiss" for s in range({shards})]
        base, peak, stop = anon_mb(), [0.0], threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], anon_mb())
                time.sleep(0.001)

        t = threading.Thread(target=poll)
        t.start()
        info = build.merge_ivf_on_disk(template, paths, {str(tmp_path / "out")!r})
        stop.set()
        t.join()
        print(json.dumps({{"extra_mb": peak[0] - base, "count": info["count"]}}))
        """
    )
    assert got["count"] == per_shard * shards
    assert got["extra_mb"] < 3 * shard_mb, (got, shard_mb)  # all shards at once: 8 x shard_mb


# ------------------------------------------------------------------------------------------ versions


def ivf_version(root: Path, n: int = 3000, dim: int = 16, parent=None, build_id=None):
    """Publish an IVF-PQ version the way the merge task does: shard files -> on-disk merge -> publish_staged."""
    x = unit(n, dim)
    params = IndexParams("ivfpq", nlist=8, nprobe=8, pq_m=4)
    template = build.train_ivf(x, params, 8)
    paths = []
    for s, part in enumerate(np.array_split(x, 2)):
        paths.append(str(root.parent / f"{root.name}-shard{s}.faiss"))
        faiss_io.save_index(build.build_shard(part, params, template), paths[-1])
    stage = store.new_stage(str(root))
    info = build.merge_ivf_on_disk(template, paths, stage)
    ids = [f"case{i}" for i in range(n)]
    values = pa.table({"id": ids, "dataset": ["toy"] * n, "modality": ["x"] * n, "label": ["a"] * n,
                       "report": pa.nulls(n, pa.string()), "qa": pa.array([[]] * n, fmt.QA_TYPE)})  # fmt: skip
    pq.write_table(fmt.conform_values(values), os.path.join(stage, fmt.VALUES_FILE))
    manifest = {"encoder_fingerprint": "fp", "model_name": "toy", "params": params.as_dict()}
    return store.publish_staged(str(root), stage, info, manifest, parent=parent, build_id=build_id), x, template


def test_an_on_disk_ivf_version_loads_after_its_folder_was_renamed(tmp_path):
    root = tmp_path / "index"
    m, x, template = ivf_version(root)
    assert m["version"] == "v0001" and m["index_type"] == "ivfpq"
    assert set(m["files"]) == {fmt.INDEX_FILE, fmt.IVFDATA_FILE, fmt.VALUES_FILE}
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    loaded = store.load_index(str(root), expect_dim=16, expect_fingerprint="fp")
    assert loaded.count == 3000 and loaded.values.num_rows == 3000
    whole = build.build_shard(x, IndexParams("ivfpq"), template)
    whole.nprobe = 8
    np.testing.assert_array_equal(loaded.index.search(x[:50], 5)[1], whole.search(x[:50], 5)[1])


def test_a_damaged_ivfdata_file_is_refused(tmp_path):
    root = tmp_path / "index"
    ivf_version(root)
    data = root / "v0001" / fmt.IVFDATA_FILE
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(IndexArtifactError, match="index.ivfdata is corrupt: its sha256 does not match"):
        store.load_index(str(root))
    data.write_bytes(bytes(raw[:-10]))
    with pytest.raises(IndexArtifactError, match="index.ivfdata is truncated or corrupt"):
        store.load_index(str(root))


def test_an_on_disk_version_through_a_filesystem_uri(tmp_path):
    """Object stores: the files are uploaded into the claimed version; the loader fetches index + lists to a local
    cache (FAISS maps a local file) after checking them."""
    root = tmp_path / "index"
    ivf_version(root)  # built locally, then copied as a second index folder reached by URI
    remote = tmp_path / "remote"
    remote.mkdir()
    uri = f"file://{remote}"
    x = unit(100, 16)
    loaded = store.load_index(str(root))
    stage = store.new_stage(uri)
    for name in (fmt.INDEX_FILE, fmt.IVFDATA_FILE, fmt.VALUES_FILE):
        (Path(stage) / name).write_bytes((root / "v0001" / name).read_bytes())
    got = store.publish_staged(uri, stage, faiss_io.describe(loaded.index), {"encoder_fingerprint": "fp"}, parent=None)
    assert got["version"] == "v0001" and not os.path.exists(stage)
    again = store.load_index(uri, expect_dim=16)
    np.testing.assert_array_equal(again.index.search(x, 3)[1], loaded.index.search(x, 3)[1])


def test_flat_and_hnsw_are_refused_above_the_in_memory_limit():
    build.check_in_memory("ivfpq", 2_000_000, 3200, 4.0)  # merged on disk: no limit
    with pytest.raises(ValueError, match=r"'hnsw' holds every vector in one process: 2000000 x 3200 float32 = 23.8 GB"):
        build.check_in_memory("hnsw", 2_000_000, 3200, 4.0)
    with pytest.raises(ValueError, match="use index.type=ivf or ivfpq"):
        build.check_in_memory("flat", 400_000, 3200, 4.0)


def test_the_training_sample_is_drawn_from_a_bounded_share_of_row_groups(tmp_path):
    """A uniform sample of 1 % touches every row group (the training task would read the whole collection); the
    plan draws it from random whole row groups holding SAMPLE_READ_FACTOR x its size, spread over the files."""
    from meddr_ray.retrieval.embedding_files import row_groups
    from meddr_ray.stages.index.shard_plan import SAMPLE_READ_FACTOR, plan_shards

    for f in range(4):
        embedding_file(tmp_path / f"e{f}.parquet", unit(10_000, 8, seed=f), start=f * 10_000, row_group=500)
    plan = plan_shards([str(tmp_path / f"e{f}.parquet") for f in range(4)], pa.array([], pa.string()))
    assert [len(g) for g in plan.group_starts] == [20] * 4
    entries = plan.sample(400, seed=3)
    assert sum(len(r) for _, r in entries) == 400
    touched = sum(len(list(row_groups(path, rows, ["id"]))) for path, rows in entries)
    assert touched <= SAMPLE_READ_FACTOR * 400 // 500 + 1, touched  # 80 row groups hold the 40 000 rows
    assert touched >= 3 and len({path for path, _ in entries}) >= 2  # still spread out, not one block
    assert sum(len(r) for _, r in plan.sample(400, seed=4)) == 400 and plan.sample(10**6, 0)[0][1][0] == 0
