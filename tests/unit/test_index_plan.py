"""The index job's driver-side pieces (no Ray): the shard plan, one case per image (keys, merging every
annotation of an image), input rows, the --add source file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddr_ray.config import PACKAGE_DIR, ConfigError
from meddr_ray.retrieval.format import IndexArtifactError
from meddr_ray.config import load_source_file as load_source_yaml
from meddr_ray.retrieval.embedding_files import read_entries
from meddr_ray.retrieval.format import case_key
from meddr_ray.stages.index.inputs import ANNOTATION_SCHEMA, ROW_SCHEMA, _instruct_rows, _sample_rows, merge_case
from meddr_ray.stages.index.shard_plan import ShardPlan, plan_shards
from meddr_ray.data.schema import rows_to_table

NPZ = PACKAGE_DIR / "assets" / "breastmnist.npz"
ANNOTATION_BOOT = ANNOTATION_SCHEMA.get_field_index("bootstrap_report")
ANNOTATION_REPORT = ANNOTATION_SCHEMA.get_field_index("report")


def embedding_file(path, keys, errors=None, fingerprint="fp", dim=4, seed=0):
    n = len(keys)
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    errors = errors or [None] * n
    table = pa.table(
        {
            "id": keys,
            "dataset": ["toy"] * n,
            "split": ["train"] * n,
            "modality": ["CT"] * n,
            "label": ["a"] * n,
            "report": pa.nulls(n, pa.string()),
            "qa": pa.array([[]] * n, ROW_SCHEMA.field("qa").type),
            "error": pa.array(errors, pa.string()),
            "fingerprint": [fingerprint] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
        }
    )
    pq.write_table(table, path)
    return x


def test_shards_are_contiguous_slices_of_the_faiss_order():
    plan = ShardPlan(files=["a", "b", "c"], keep=[np.array([0, 2, 3]), np.array([], np.int64), np.array([1, 5])], failed=[])
    assert plan.count == 5
    flat = lambda shards: [(f, int(r)) for shard in shards for f, rows in shard for r in rows]  # noqa: E731
    order = [("a", 0), ("a", 2), ("a", 3), ("c", 1), ("c", 5)]
    for n in (1, 2, 3, 5, 10):
        shards = plan.shards(n)
        assert len(shards) == min(n, 5) and flat(shards) == order
        sizes = [sum(len(r) for _, r in s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
    assert flat([plan.everything()]) == order
    sample = flat([plan.sample(3, seed=0)])
    assert len(sample) == 3 and set(sample) <= set(order) and sample == sorted(sample, key=order.index)


def test_plan_shards_orders_rows_sets_failed_aside_and_skips_repeated_cases(tmp_path):
    x1 = embedding_file(tmp_path / "1.parquet", ["a", "b", "c"], errors=[None, "bad.png row 1: not a readable image", None])
    x2 = embedding_file(tmp_path / "2.parquet", ["d", "a"], seed=1)
    plan = plan_shards([str(tmp_path / "1.parquet"), str(tmp_path / "2.parquet")], pa.array([], pa.string()))
    assert (plan.count, plan.failed_count, plan.duplicates, plan.dim, plan.fingerprint) == (3, 1, 1, 4, "fp")
    assert plan.keys.to_pylist() == ["a", "c", "d"]
    assert plan.datasets == {"toy": 3}
    vectors, values = read_entries(plan.everything(), plan.dim)
    np.testing.assert_array_equal(vectors, np.stack([x1[0], x1[2], x2[0]]))
    assert values.column("id").to_pylist() == ["a", "c", "d"]
    embedding_file(tmp_path / "3.parquet", ["e"], fingerprint="other")
    with pytest.raises(IndexArtifactError, match="different encoders"):
        plan_shards([str(tmp_path / "1.parquet"), str(tmp_path / "3.parquet")], pa.array([], pa.string()))


def test_the_plan_never_reads_the_vectors(tmp_path, monkeypatch):
    """The driver reads ids, datasets and errors; the dimension comes from the schema (a vector column of millions
    of rows never goes through it)."""
    from meddr_ray.stages.index import shard_plan

    embedding_file(tmp_path / "1.parquet", ["a", "b"], dim=7)
    read = []
    original = shard_plan.read_columns
    monkeypatch.setattr(shard_plan, "read_columns", lambda path, columns: read.append(columns) or original(path, columns))
    plan = plan_shards([str(tmp_path / "1.parquet")], pa.array([], pa.string()))
    assert plan.dim == 7 and plan.count == 2
    assert read and all("embedding" not in columns for columns in read)


def test_case_key_is_one_image_of_one_dataset():
    assert case_key("slake", b"png-1", "q1") == case_key("slake", b"png-1", "q2")  # two questions, one image
    assert case_key("slake", b"png-1", "q1") != case_key("slake", b"png-2", "q1")
    assert case_key("slake", b"png-1", "q1") != case_key("vqa_rad", b"png-1", "q1")  # scoped by dataset
    assert case_key("slake", None, "q1") != case_key("slake", None, "q2")  # no image: a case of its own


def _instruct_batch():
    return pa.table(
        {
            "id": ["i1", "i2", "i3", "i4", "i5", "i6"],
            "source_id": ["s1", "s1", "s2", "s3", "s4", "s5"],
            "dataset": ["d"] * 6,
            "task": ["diagnosis", "guided_report", "vqa", "vqa", "diagnosis", "description"],
            "split": ["train", "train", "train", "train", "val", "train"],
            "modality": ["CT"] * 6,
            "label": [None, "benign", None, None, "malignant", None],
            "image": [b"x", b"x", b"y", b"y", b"z", b"y"],
            "prompt": ["p"] * 6,
            "answer": ["benign", "Findings: ok.", "yes", "left", "malignant", "a description"],
            "question": [None, None, "Is it normal?", "Which side?", None, None],
            "source_file": ["f"] * 6,
            "source_index": [0, 0, 1, 2, 3, 1],
        }
    )


def test_instruction_rows_become_annotations_of_their_image_and_validation_rows_stay_out():
    rows = _instruct_rows(_instruct_batch()).to_pylist()
    assert len(rows) == 5  # the validation row (s4) is not part of the database
    assert [r["key"] for r in rows] == [case_key("d", b"x", "")] * 2 + [case_key("d", b"y", "")] * 3
    assert [r["label"] for r in rows] == ["benign", "benign", None, None, None]  # a diagnosis answer is its label
    assert rows[1]["bootstrap_report"] == "Findings: ok." and rows[0]["bootstrap_report"] is None
    assert [(r["question"], r["answer"]) for r in rows[2:4]] == [("Is it normal?", "yes"), ("Which side?", "left")]
    assert (rows[4]["question"], rows[4]["answer"], rows[4]["report"]) == (None, None, None)  # a description


def _merged(annotations: pa.Table) -> list:
    keys = annotations.column("key").to_pylist()
    return [merge_case(annotations.filter(pa.array([k == key for k in keys]))).to_pylist()[0]
            for key in dict.fromkeys(keys)]  # fmt: skip


def test_every_annotation_of_an_image_is_one_case():
    cases = _merged(_instruct_rows(_instruct_batch()))
    assert len(cases) == 2
    x, y = cases
    assert (x["id"], x["label"], x["report"], x["qa"]) == (case_key("d", b"x", ""), "benign", "Findings: ok.", [])
    assert x["image"] == b"x"
    assert y["label"] is None and y["report"] is None
    assert y["qa"] == [{"question": "Is it normal?", "answer": "yes"}, {"question": "Which side?", "answer": "left"}]


def test_a_reference_report_is_kept_before_a_bootstrapped_one_and_repeated_qa_once():
    rows = [
        dict(id="r1", dataset="iu", split="train", task="report", image=b"img", report="Reference."),
        dict(id="q1", dataset="iu", split="train", task="vqa", image=b"img", question="Q?", answer="A"),
        dict(id="q2", dataset="iu", split="train", task="vqa", image=b"img", question="Q?", answer="A"),
    ]
    annotations = _sample_rows(rows_to_table(rows))
    boot = annotations.slice(0, 1).set_column(
        ANNOTATION_BOOT, "bootstrap_report", pa.array(["Bootstrapped."], pa.string())
    ).set_column(ANNOTATION_REPORT, "report", pa.nulls(1, pa.string()))
    (case,) = _merged(pa.concat_tables([boot, annotations]))
    assert case["report"] == "Reference."
    assert case["qa"] == [{"question": "Q?", "answer": "A"}]


def test_add_source_yaml_is_checked_and_errors_name_the_key(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(f"name: breastmnist\nformat: medmnist\npath: {NPZ}\nsplits: [test]\nlimit: 5\n")
    src = load_source_yaml(str(good))
    assert (src.name, src.splits, src.limit, src.path) == ("breastmnist", ["test"], 5, str(NPZ))
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\nformat: medmnist\npath: {NPZ}\nsplitz: [test]\n")
    with pytest.raises(ConfigError, match="splitz"):
        load_source_yaml(str(bad))
    bad.write_text("name: x\nformat: medmnist\npath: a.npz\nlimit: many\n")
    with pytest.raises(ConfigError, match="limit"):
        load_source_yaml(str(bad))
    bad.write_text("name: x\nformat: tiff\npath: a.npz\n")
    with pytest.raises(ConfigError, match="'format': 'tiff' is not one of"):
        load_source_yaml(str(bad))
    bad.write_text("name: x\nformat: medmnist\n")
    with pytest.raises(ConfigError, match="required keys have no value: path"):
        load_source_yaml(str(bad))
    bad.write_text("- name: x\n")
    with pytest.raises(ConfigError, match="expected one source as a mapping"):
        load_source_yaml(str(bad))
    with pytest.raises(ConfigError, match="source file not found"):
        load_source_yaml(str(tmp_path / "missing.yaml"))
