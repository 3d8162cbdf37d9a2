"""The index job on the shared local Ray cluster, with the tiny student over BreastMNIST (shipped).

One full build (train + val = 624 images) is shared by the module; the sharding, resume, bad-row and incremental
tests run on small limits.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from meddr_ray.retrieval import build
from meddr_ray.retrieval import format as fmt
from meddr_ray.retrieval import store
from meddr_ray.stages.index import build_tasks, stage as index_stage
from meddr_ray.config import with_added_index_source, PACKAGE_DIR, load_config
from meddr_ray.data import sample_id
from meddr_ray.stages.index import run_index
from meddr_ray.model import load_model
from meddr_ray.retrieval.rag import Retriever, vote

pytestmark = pytest.mark.integration

NPZ = PACKAGE_DIR / "assets" / "breastmnist.npz"


def tiny(run_dir: Path, *overrides: str):
    return load_config("tiny", [f"run_dir={run_dir}", *overrides])


def images(split: str, rows) -> list:
    arrays = np.load(NPZ)[f"{split}_images"]
    return [Image.fromarray(arrays[i]).convert("RGB") for i in rows]


def rows_of(loaded, ids):
    """``(split, row)`` of the images of the given case ids (a case is named by its image's content)."""
    values = loaded.values.select(["id", "split", "source_index"]).to_pylist()
    where = {v["id"]: (v["split"], v["source_index"]) for v in values}
    return [where[i] for i in ids]


def ids_of(loaded, rows):
    """The case ids of the given ``(split, row)`` images."""
    case = {(v["split"], v["source_index"]): v["id"] for v in loaded.values.to_pylist()}
    return [case[r] for r in rows]


@pytest.fixture(scope="module")
def model():
    return load_model(tiny(Path("/tmp")).student)


@pytest.fixture(scope="module")
def built(ray_cluster, tmp_path_factory):
    """The preset's index: BreastMNIST train + val, two shards, flat."""
    cfg = tiny(tmp_path_factory.mktemp("index-full"))
    path = run_index(cfg).path
    return cfg, path


def test_build_publishes_a_checked_version(built, model, capsys):
    cfg, path = built
    index_dir = cfg.layout.index_dir
    assert path == str(Path(index_dir) / "v0001")
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert (manifest["count"], manifest["dim"], manifest["faiss_type"]) == (624, model.embed_dim, "IndexFlatIP")
    assert manifest["encoder_fingerprint"] == model.encoder_fingerprint()
    assert manifest["model_name"] == "tiny-llava" and manifest["parent_version"] is None
    assert manifest["summary"]["shards"] == 2 and manifest["summary"]["failed"] == 0
    loaded = store.load_index(index_dir, expect_dim=model.embed_dim, expect_fingerprint=model.encoder_fingerprint())
    values = loaded.values.to_pydict()
    assert len(set(values["id"])) == 624  # one vector per image: no case twice
    assert Counter(values["dataset"]) == {"breastmnist": 624} and manifest["summary"]["datasets"] == {"breastmnist": 624}
    assert Counter(values["split"]) == {"train": 546, "val": 78}
    assert set(values["label"]) == {"malignant", "normal, benign"} and set(values["modality"]) == {"breast ultrasound"}
    assert set(values["report"]) == {None} and all(qa == [] for qa in values["qa"])
    assert not (Path(index_dir) / "_work").exists()  # the embeddings went into the index


def test_a_training_image_retrieves_itself_first(built, model):
    cfg, _ = built
    retriever = Retriever.from_config(cfg, model, version="v0001")
    rows = [0, 17, 200, 545]
    hits = retriever.search(model.embed(images("train", rows)), k=3)
    for row, neighbours in zip(rows, hits):
        top = neighbours[0]
        assert top.score == pytest.approx(1.0, abs=1e-4)
        # the query's own image is the case whose value points at its row of the train split
        located = {v["id"]: (v["split"], v["source_index"]) for v in retriever.loaded.values.to_pylist()}
        assert located[top.id] == ("train", row)


def test_voting_on_the_test_split_uses_the_retrieved_labels(built, model):
    cfg, _ = built
    loaded = store.load_index(cfg.layout.index_dir, version="v0001")
    retriever = Retriever(loaded)
    data = np.load(NPZ)
    names = ["malignant", "normal, benign"]
    truth = [names[int(y)] for y in data["test_labels"].reshape(-1)]
    queries = model.embed(images("test", range(len(truth))))
    k = cfg.rag.top_k_diagnosis
    predicted = [vote(n) for n in retriever.search(queries, k)]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth)]))
    print(f"\nvoting baseline, BreastMNIST test, tiny encoder, k={k}: accuracy {accuracy:.3f} on {len(truth)} images")
    assert 0.0 <= accuracy <= 1.0 and len(predicted) == 156
    # the same vote from a brute-force numpy kNN over the stored vectors
    keys = loaded.index.reconstruct_n(0, loaded.count)
    labels = np.array(loaded.values.column("label").to_pylist())
    sims = queries @ keys.T
    order = np.argsort(-sims, axis=1, kind="stable")
    checked = 0
    for q in range(len(truth)):
        s = sims[q, order[q]]
        if s[k - 1] - s[k] < 1e-5:
            continue  # a tie at the k-th place: either neighbour is right
        top = order[q, :k]
        counts = Counter(labels[top])
        best = max(counts, key=lambda lab: (counts[lab], sims[q, top][labels[top] == lab].sum()))
        assert predicted[q] == best, q
        checked += 1
    assert checked > 100


def _bad_folder(root: Path) -> Path:
    """Six ultrasound-like PNGs and one truncated file, listed in a labels CSV."""
    root.mkdir(parents=True)
    arrays = np.load(NPZ)["test_images"]
    lines = ["image,label"]
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(arrays[i]).save(buf, format="PNG")
        (root / f"img{i}.png").write_bytes(buf.getvalue())
        lines.append(f"img{i}.png,{'malignant' if i % 2 else 'benign'}")
    (root / "broken.png").write_bytes(buf.getvalue()[:40])
    lines.append("broken.png,benign")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_resume_bad_rows_and_sharded_equals_single_build(ray_cluster, tmp_path, monkeypatch, model):
    """A run interrupted after embedding resumes without re-embedding; a bad image is set aside and listed; the
    resumed single-shard build and a three-shard build give the same neighbours."""
    csv = _bad_folder(tmp_path / "folder")
    sources = (
        f"index.sources=[{{name: breastmnist, format: medmnist, path: {NPZ}, splits: [train], limit: 40}}, "
        f"{{name: folder, format: image_folder, path: {csv}, modality: ultrasound}}]"
    )
    cfg = tiny(tmp_path / "one", "data.on_error=skip", sources, "index.num_shards=1")
    real_plan, real_embed = build_tasks.plan_shards, index_stage.embed

    def interrupted(*a, **kw):
        raise KeyboardInterrupt("driver killed after embedding")

    monkeypatch.setattr(build_tasks, "plan_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_index(cfg)
    work = Path(cfg.layout.index_dir) / "_work"
    assert any(work.rglob("*.parquet")) and store.current_version(cfg.layout.index_dir) is None

    skipped = []

    def spy(cfg_, ds, out_dir, adapter, known_ids):
        skipped.append(len(known_ids))
        return real_embed(cfg_, ds, out_dir, adapter, known_ids)

    monkeypatch.setattr(build_tasks, "plan_shards", real_plan)
    monkeypatch.setattr(index_stage, "embed", spy)
    one = run_index(cfg).path
    assert skipped == [47]  # every row embedded by the interrupted run, the bad one included, is not redone
    manifest = json.loads((Path(one) / "manifest.json").read_text())
    assert manifest["count"] == 46 and manifest["summary"]["failed"] == 1 and manifest["summary"]["shards"] == 1
    import pyarrow.parquet as pq

    failed = pq.read_table(Path(cfg.layout.index_dir) / "failed" / "v0001.parquet").to_pylist()
    assert len(failed) == 1 and failed[0]["dataset"] == "folder"
    assert "labels.csv row 6" in failed[0]["error"] and "not a readable image" in failed[0]["error"]

    three = run_index(tiny(tmp_path / "three", "data.on_error=skip", sources, "index.num_shards=3")).path
    assert json.loads((Path(three) / "manifest.json").read_text())["summary"]["shards"] == 3
    a = Retriever.open(str(Path(one).parent))
    b = Retriever.open(str(Path(three).parent))
    assert a.count == b.count == 46
    queries = model.embed(images("train", range(0, 40, 3)) + images("test", range(6)))
    for x, y in zip(a.search(queries, 5), b.search(queries, 5)):
        assert [n.id for n in x] == [n.id for n in y]
        np.testing.assert_allclose([n.score for n in x], [n.score for n in y], atol=1e-6)


def test_incremental_add_appends_a_new_version(built, model, tmp_path):
    cfg, first = built
    index_dir = cfg.layout.index_dir
    before = {p.name: p.read_bytes() for p in Path(first).iterdir()}
    source = tmp_path / "new_cases.yaml"
    source.write_text(f"name: breastmnist\nformat: medmnist\npath: {NPZ}\nsplits: [test]\nlimit: 30\n")
    path = run_index(with_added_index_source(cfg, str(source))).path
    assert Path(path).name == "v0002" and store.current_version(index_dir) == "v0002"
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["parent_version"] == "v0001" and manifest["count"] == 654 and manifest["summary"]["added"] == 30
    assert manifest["encoder_fingerprint"] == model.encoder_fingerprint()
    assert {p.name: p.read_bytes() for p in Path(first).iterdir()} == before  # the old version is untouched
    retriever = Retriever.from_config(cfg, model)
    assert retriever.version == "v0002"
    hits = retriever.search(model.embed(images("test", [0, 29])), k=1)
    assert rows_of(retriever.loaded, [h[0].id for h in hits]) == [("test", 0), ("test", 29)]
    assert store.load_index(index_dir, version="v0001").count == 624
    # adding the same cases again embeds nothing and publishes nothing
    assert run_index(with_added_index_source(cfg, str(source))).path == path
    assert store.list_versions(index_dir) == ["v0001", "v0002"]


def test_build_from_the_instruction_parquet(ray_cluster, tmp_path):
    """With no index.sources the cases come from the training rows of the run's instruction mix: one per image,
    whatever number of instructions (copies, tasks) it has; the validation rows are not part of the database."""
    import pyarrow.parquet as pq

    from meddr_ray.stages.instruct import MIX_SCHEMA

    arrays = np.load(NPZ)["train_images"]
    rows = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(arrays[i]).save(buf, format="PNG")
        sid = sample_id("breastmnist", "train", i)
        label = "malignant" if i % 2 else "normal, benign"
        base = dict(source_id=sid, dataset="breastmnist", modality="breast ultrasound", label=label,
                    image=buf.getvalue(), prompt="p", source_file=str(NPZ), source_index=i,
                    split="val" if i == 7 else "train")  # fmt: skip
        for copy in range(2 if i < 3 else 1):  # weight 2 on three samples: copies share the case
            rows.append(dict(base, id=f"d{i}-{copy}", task="diagnosis", answer=label))
        if i < 4:
            report = f"Findings: case {i}. Impression: {label}."
            rows.append(dict(base, id=f"g{i}", task="guided_report", answer=report))
    folder = tmp_path / "run" / "instruct"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MIX_SCHEMA), folder / "part-0.parquet")
    (folder / "failed").mkdir()  # set-aside rows of the instruct stage are not cases
    pq.write_table(pa.table({"source_id": ["x"], "error": ["bad"]}), folder / "failed" / "part-0.parquet")
    path = run_index(tiny(tmp_path / "run", "index.sources=[]")).path
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["count"] == 7 and manifest["summary"]["duplicates"] == 0  # sample 7 is a validation row
    values = sorted(pq.read_table(Path(path) / "values.parquet").to_pylist(), key=lambda v: v["source_index"])
    assert [v["source_index"] for v in values] == list(range(7)) and len({v["id"] for v in values}) == 7
    assert [v["label"] for v in values] == ["malignant" if i % 2 else "normal, benign" for i in range(7)]
    assert [v["report"] for v in values[:4]] == [f"Findings: case {i}. Impression: {v['label']}."
                                                 for i, v in enumerate(values[:4])]  # fmt: skip
    assert {v["report"] for v in values[4:]} == {None}


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_through_the_job_and_incremental_add(ray_cluster, tmp_path, model, kind):
    """IVF: a template trained in one task, cloned into 3 shards, merged; searched with every cell probed it must
    find what exact search finds. HNSW: built from the gathered vectors. Both grow by an incremental add, IVF with
    its trained quantizer untouched."""
    import faiss

    cfg = tiny(
        tmp_path, "index.sources.0.limit=200", f"index.type={kind}", "index.num_shards=3", "index.nlist=4",
        "index.nprobe=4", "index.ef_search=200",
    )  # fmt: skip
    first = run_index(cfg).path
    manifest = json.loads((Path(first) / "manifest.json").read_text())
    assert manifest["index_type"] == kind and manifest["count"] == 200
    assert manifest["summary"]["shards"] == (3 if kind == "ivf" else 1)
    if kind == "ivf":
        assert manifest["params"] == {"kind": "ivf", "nlist": 4, "nprobe": 4}
        # merged on disk from shard files: the lists live in index.ivfdata; every task reported its own peak
        assert set(manifest["files"]) == {"index.faiss", "index.ivfdata", "values.parquet"}
        peaks = manifest["summary"]["task_peak_rss_mb"]
        assert set(peaks) == {"train", "shards", "merge"} and len(peaks["shards"]) == 3
        assert all(0 < mb < 4096 for mb in [peaks["train"], peaks["merge"], *peaks["shards"]])
        assert manifest["build_id"] and not (Path(cfg.layout.index_dir) / "_work").exists()
    retriever = Retriever.from_config(cfg, model)
    queries = model.embed(images("train", range(0, 200, 7)))
    # exact neighbours over the same 200 images, embedded here
    exact = build.build_shard(model.embed(images("train", range(200))), build.IndexParams("flat"))
    ids = np.array(ids_of(retriever.loaded, [("train", i) for i in range(200)]))
    _, expected = exact.search(queries, 5)
    for row, want in zip(retriever.search(queries, 5), expected):
        assert set(n.id for n in row[:1]) == set(ids[want[:1]])  # rank 1 is exact
        assert len(set(n.id for n in row) & set(ids[want])) >= 4

    source = tmp_path / "more.yaml"
    source.write_text(f"name: breastmnist\nformat: medmnist\npath: {NPZ}\nsplits: [test]\nlimit: 10\n")
    second = run_index(with_added_index_source(cfg, str(source))).path
    grown = store.load_index(cfg.layout.index_dir)
    assert (grown.version, grown.count, grown.manifest["index_type"]) == ("v0002", 210, kind)
    hits = Retriever(grown).search(model.embed(images("test", range(10))), k=1)
    assert rows_of(grown, [h[0].id for h in hits]) == [("test", i) for i in range(10)]
    if kind == "ivf":
        parent = store.load_index(cfg.layout.index_dir, version="v0001")  # keep it alive: faiss views borrow it
        before, after = faiss.extract_index_ivf(parent.index), faiss.extract_index_ivf(grown.index)
        np.testing.assert_array_equal(before.quantizer.reconstruct_n(0, 4), after.quantizer.reconstruct_n(0, 4))
        assert "index.ivfdata" in grown.manifest["files"] and parent.count == 200  # the parent is untouched
    assert Path(second).name == "v0002"


def _run(cmd, tmp_path, timeout=600):
    """A CLI / job-script process with its own Ray cluster, killed with its whole process group afterwards."""
    import os
    import signal
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        cmd, cwd=str(Path(__file__).resolve().parents[2]), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's helper processes of that session
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_builds_the_demo_index_and_the_job_adds_to_it(tmp_path):
    import sys

    run_dir = tmp_path / "demo"
    out = _run([sys.executable, "-m", "meddr_ray.cli", "index", "--config", "demo", f"run_dir={run_dir}"], tmp_path)
    # the demo student's EfficientNet-Lite0 tower: 1280-wide keys
    assert "index: 624 vectors, dimension 1280, IndexFlatIP (flat), version v0001" in out
    assert f"index: wrote {run_dir / 'index' / 'v0001'}" in out
    source = tmp_path / "new.yaml"
    source.write_text(f"name: breastmnist\nformat: medmnist\npath: {NPZ}\nsplits: [test]\nlimit: 5\n")
    out = _run(
        [sys.executable, "jobs/build_index.py", "--config", "demo", "--add", str(source), f"run_dir={run_dir}"],
        tmp_path,
    )
    assert "index: 629 vectors, dimension 1280, IndexFlatIP (flat), version v0002 (parent v0001, +5)" in out
    assert store.current_version(str(run_dir / "index")) == "v0002"


def test_the_build_half_on_embedding_files_is_idempotent_and_refuses_a_stale_parent(ray_cluster, tmp_path):
    """``build_from_embeddings`` (what ``run_index`` and benchmarks/index_scale.py run after embedding) on a folder
    of embedding files: IVF-PQ merged on disk; the same build id publishes one version however often it is run;
    a build that began on v0001 after v0002 was published is refused and CURRENT stays v0002."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_retrieval_merge_on_disk import embedding_file, unit

    x = unit(3000, 32)
    for f in range(2):
        embedding_file(tmp_path / f"e{f}.parquet", x[f * 1500 : (f + 1) * 1500], start=f * 1500, row_group=400)
    files = [str(tmp_path / f"e{f}.parquet") for f in range(2)]
    cfg = tiny(tmp_path / "run", "index.type=ivfpq", "index.nlist=8", "index.pq_m=8", "index.pq_nbits=6",
               "index.num_shards=3")  # fmt: skip
    index_dir = cfg.layout.index_dir
    run = build_tasks.IndexRun(index_dir, "build", [{"name": "toy", "format": "parquet", "path": str(tmp_path)}])

    first, plan = build_tasks.build_from_embeddings(cfg, files, run, str(tmp_path / "s1"), "build-a", None)
    assert (first["version"], first["count"], first["index_type"], plan.count) == ("v0001", 3000, "ivfpq", 3000)
    again, _ = build_tasks.build_from_embeddings(cfg, files, run, str(tmp_path / "s2"), "build-a", None)
    assert again["version"] == "v0001" and store.list_versions(index_dir) == ["v0001"]
    second, _ = build_tasks.build_from_embeddings(cfg, files, run, str(tmp_path / "s3"), "build-b", "v0001")
    assert second["version"] == "v0002" and second["replaces"] == "v0001"
    with pytest.raises(fmt.PublishConflict, match="CURRENT names v0002, but this build was made on v0001"):
        build_tasks.build_from_embeddings(cfg, files, run, str(tmp_path / "s4"), "build-c", "v0001")
    assert store.current_version(index_dir) == "v0002" and store.list_versions(index_dir) == ["v0001", "v0002"]
    loaded = store.load_index(index_dir, expect_dim=32, expect_fingerprint="fp")
    assert loaded.count == 3000 and loaded.values.column("id")[1700].as_py() == "case1700"
