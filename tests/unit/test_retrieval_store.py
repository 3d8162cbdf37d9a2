"""Publishing and loading index versions (no Ray): atomic switch, and every broken artifact refused by name."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddr_ray.retrieval import build
from meddr_ray.retrieval import format as fmt
from meddr_ray.retrieval import store
from meddr_ray.retrieval.format import IndexArtifactError
from meddr_ray.retrieval.store import load_index, publish

FP = "0123456789abcdef"


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def values(n: int, start: int = 0) -> pa.Table:
    ids = [f"case{i}" for i in range(start, start + n)]
    return pa.table(
        {
            "id": ids,
            "dataset": ["toy"] * n,
            "modality": ["ultrasound"] * n,
            "label": [("malignant" if i % 2 else "benign") for i in range(start, start + n)],
            "report": pa.nulls(n, pa.string()),
            "qa": pa.array([[]] * n, fmt.QA_TYPE),
        }
    )


def make(index_dir, n: int = 50, start: int = 0, seed: int = 0, fp: str = FP):
    index = build.build_shard(unit(n, seed=seed), build.IndexParams("flat"))
    return publish(str(index_dir), index, values(n, start), {"encoder_fingerprint": fp, "model_name": "toy"})


def test_publish_writes_a_version_and_switches_current(tmp_path):
    m1 = make(tmp_path)
    assert m1["version"] == "v0001" and (tmp_path / "CURRENT").read_text().strip() == "v0001"
    assert {p.name for p in (tmp_path / "v0001").iterdir()} == {"manifest.json", "index.faiss", "values.parquet"}
    on_disk = json.loads((tmp_path / "v0001" / "manifest.json").read_text())
    for key in ("version", "dim", "metric", "count", "faiss_type", "encoder_fingerprint", "model_name", "created"):
        assert key in on_disk, key
    assert (on_disk["dim"], on_disk["count"], on_disk["faiss_type"], on_disk["metric"]) == (
        16, 50, "IndexFlatIP", "inner_product")  # fmt: skip
    assert len(on_disk["files"]["index.faiss"]["sha256"]) == 64
    m2 = make(tmp_path, n=60, seed=1)
    assert m2["version"] == "v0002"
    assert load_index(str(tmp_path)).count == 60
    assert load_index(str(tmp_path), version="v0001").count == 50  # the old version stays readable
    assert store.list_versions(str(tmp_path)) == ["v0001", "v0002"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_publish_refuses_values_that_do_not_line_up(tmp_path):
    index = build.build_shard(unit(10), build.IndexParams("flat"))
    with pytest.raises(IndexArtifactError, match="9 value rows for 10 vectors"):
        publish(str(tmp_path), index, values(9), {"encoder_fingerprint": FP})
    assert store.current_version(str(tmp_path)) is None


def test_an_interrupted_publish_leaves_the_old_version_current(tmp_path, monkeypatch):
    make(tmp_path)

    def crash(*_):
        raise KeyboardInterrupt("killed before the switch")

    # killed after the new folder is complete but before CURRENT moves
    monkeypatch.setattr(store, "_switch_current", crash)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, n=70, seed=2)
    loaded = load_index(str(tmp_path))
    assert (loaded.version, loaded.count) == ("v0001", 50)
    # killed while the files are still being written: only a hidden temporary folder exists
    monkeypatch.setattr(store, "_claim_and_rename", crash)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, n=80, seed=3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert load_index(str(tmp_path)).version == "v0001"
    monkeypatch.undo()
    # the next publish takes the next free number and becomes current
    assert make(tmp_path, n=90, seed=4)["version"] == "v0003"
    assert load_index(str(tmp_path)).count == 90


def test_a_concurrent_reader_never_sees_a_half_published_version(tmp_path):
    make(tmp_path, n=20)
    stop = threading.Event()
    seen, problems = set(), []

    def reader():
        while not stop.is_set():
            try:
                loaded = load_index(str(tmp_path))
                assert loaded.values.num_rows == loaded.index.ntotal == loaded.manifest["count"]
                assert loaded.values.column("id")[0].as_py() == "case0"
                seen.add(loaded.version)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                problems.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(15):
            make(tmp_path, n=20 + 10 * i, seed=i)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not problems, problems[:3]
    assert len(seen) >= 2  # the readers really ran while versions switched


# ------------------------------------------------------------------------------ refused artifacts


@pytest.fixture
def published(tmp_path):
    make(tmp_path, n=40)
    return tmp_path, tmp_path / "v0001"


def test_missing_current_is_refused(tmp_path):
    with pytest.raises(IndexArtifactError, match=r"no published index \(CURRENT is missing\)"):
        load_index(str(tmp_path))


def test_current_naming_a_missing_version_is_refused(published):
    root, _ = published
    (root / "CURRENT").write_text("v0042\n")
    with pytest.raises(IndexArtifactError, match="'v0042' does not exist; published versions: v0001"):
        load_index(str(root))
    with pytest.raises(IndexArtifactError, match="'v0007' does not exist"):
        load_index(str(root), version="v0007")


def test_dimension_mismatch_is_refused(published):
    root, _ = published
    with pytest.raises(IndexArtifactError, match="the index has dimension 16 but the encoder produces 64"):
        load_index(str(root), expect_dim=64)


def test_fingerprint_mismatch_is_refused(published):
    root, _ = published
    with pytest.raises(IndexArtifactError, match=f"built with encoder {FP} .* current encoder is feedfacefeedface"):
        load_index(str(root), expect_fingerprint="feedfacefeedface")
    assert load_index(str(root), expect_dim=16, expect_fingerprint=FP).count == 40


def test_truncated_index_is_refused(published):
    root, vdir = published
    data = (vdir / "index.faiss").read_bytes()
    (vdir / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexArtifactError, match=r"index.faiss is truncated or corrupt: \d+ bytes, the manifest says"):
        load_index(str(root))


def test_corrupt_index_fails_its_checksum_and_faiss_read(published):
    root, vdir = published
    data = bytearray((vdir / "index.faiss").read_bytes())
    data[:4] = b"XXXX"  # same size, broken header
    (vdir / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexArtifactError, match="index.faiss is corrupt: its sha256 does not match"):
        load_index(str(root))
    with pytest.raises(IndexArtifactError, match="index.faiss: not a readable FAISS index"):
        load_index(str(root), verify=False)


def test_values_that_do_not_line_up_with_the_index_are_refused(published):
    root, vdir = published
    pq.write_table(values(39), vdir / "values.parquet")
    manifest = json.loads((vdir / "manifest.json").read_text())  # a consistent manifest: only the count is off
    manifest["files"]["values.parquet"] = {
        "bytes": os.path.getsize(vdir / "values.parquet"),
        "sha256": store._sha256_file(str(vdir / "values.parquet")),
    }
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexArtifactError, match="values.parquet: 39 rows but the index holds 40 vectors"):
        load_index(str(root))


def test_missing_manifest_is_refused(published):
    root, vdir = published
    (vdir / "manifest.json").unlink()
    with pytest.raises(IndexArtifactError, match="has no manifest.json"):
        load_index(str(root))


def test_publish_and_load_through_a_filesystem_uri(tmp_path):
    """The object-store path (no folder rename: written into the claimed version, manifest last), via file://."""
    root = f"file://{tmp_path}"
    assert make(root, n=30)["version"] == "v0001"
    assert make(root, n=35, seed=1)["version"] == "v0002"
    assert store.list_versions(root) == ["v0001", "v0002"] and store.current_version(root) == "v0002"
    loaded = load_index(root, expect_dim=16, expect_fingerprint=FP)
    assert (loaded.version, loaded.count, loaded.values.num_rows) == ("v0002", 35, 35)
    assert load_index(root, version="v0001").count == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------------ compare-and-swap, idempotence


def make_on(index_dir, parent, n: int = 30, seed: int = 0, build_id=None):
    index = build.build_shard(unit(n, seed=seed), build.IndexParams("flat"))
    manifest = {"encoder_fingerprint": FP, "model_name": "toy"}
    return publish(str(index_dir), index, values(n), manifest, parent=parent, build_id=build_id)


def test_a_build_on_a_stale_parent_never_moves_current_backwards(tmp_path):
    """An --add made on v0001 after v0002 was published is refused; CURRENT stays v0002, nothing is written."""
    make_on(tmp_path, None)
    make_on(tmp_path, "v0001", n=40)
    with pytest.raises(fmt.PublishConflict, match=r"CURRENT names v0002, but this build was made on v0001"):
        make_on(tmp_path, "v0001", n=50)
    assert store.current_version(str(tmp_path)) == "v0002" and store.list_versions(str(tmp_path)) == ["v0001", "v0002"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(fmt.PublishConflict, match="this build was made on an empty index folder"):
        make_on(tmp_path, None)  # a first build that finds a version already published


def test_a_retried_publish_returns_the_same_version(tmp_path):
    first = make_on(tmp_path, None, build_id="build-1")
    again = make_on(tmp_path, None, build_id="build-1")  # the parent check is not what stops it: the build id is
    assert again["version"] == first["version"] == "v0001" and store.list_versions(str(tmp_path)) == ["v0001"]
    assert load_index(str(tmp_path)).manifest["build_id"] == "build-1"
    assert make_on(tmp_path, "v0001", build_id="build-2")["version"] == "v0002"


def test_concurrent_publishers_on_one_parent_exactly_one_wins(tmp_path):
    make_on(tmp_path, None)
    barrier = threading.Barrier(6)
    wins, conflicts, other = [], [], []

    def publisher(i):
        barrier.wait()
        try:
            wins.append(make_on(tmp_path, "v0001", n=31 + i, seed=i)["version"])
        except fmt.PublishConflict as exc:
            conflicts.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - reported below
            other.append(repr(exc))

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not other, other
    assert wins == ["v0002"] and len(conflicts) == 5
    assert store.list_versions(str(tmp_path)) == ["v0001", "v0002"] and store.current_version(str(tmp_path)) == "v0002"


def test_concurrent_publisher_processes_on_one_parent_exactly_one_wins(tmp_path):
    import subprocess
    import sys
    import textwrap

    make_on(tmp_path, None)
    go = tmp_path / "go"
    code = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_retrieval_store import make_on
        from meddr_ray.retrieval import format as fmt
        from meddr_ray.retrieval import store
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        try:
            print("won", make_on({str(tmp_path)!r}, "v0001", n=40, seed=int(sys.argv[1]))["version"])
        except fmt.PublishConflict:
            print("conflict")
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))  # fmt: skip
        for i in range(4)
    ]
    import time

    time.sleep(3)  # every process imported faiss and waits
    go.write_text("go")
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["conflict", "conflict", "conflict", "won v0002"], outs
    assert store.list_versions(str(tmp_path)) == ["v0001", "v0002"] and store.current_version(str(tmp_path)) == "v0002"


def test_the_object_store_path_checks_the_parent_and_the_build_id(tmp_path):
    root = f"file://{tmp_path}"
    make_on(root, None, build_id="a")
    assert make_on(root, None, build_id="a")["version"] == "v0001"  # retried: same version
    make_on(root, "v0001", build_id="b")
    with pytest.raises(fmt.PublishConflict, match="names v0002, but this build was made on v0001"):
        make_on(root, "v0001", build_id="c")
    assert store.list_versions(root) == ["v0001", "v0002"] and store.current_version(root) == "v0002"
