"""The index job's driver-side pieces (no Ray): the shard plan, case keys, input rows, the --add source file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddr_ray.config import PACKAGE_DIR, ConfigError
from meddr_ray.faiss_index import IndexArtifactError
from meddr_ray.config import load_source_file as load_source_yaml
from meddr_ray.index import Plan, _instruct_rows, case_key, make_plan, read_entries, value_text

NPZ = PACKAGE_DIR / "assets" / "breastmnist.npz"


def embedding_file(path, keys, errors=None, fingerprint="fp", dim=4, seed=0):
    n = len(keys)
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    errors = errors or [None] * n
    table = pa.table(
        {
            "key": keys,
            "id": [k.split("\x1f")[0] for k in keys],
            "dataset": ["toy"] * n,
            "modality": ["CT"] * n,
            "task": ["diagnosis"] * n,
            "label": ["a"] * n,
            "text": ["a"] * n,
            "error": pa.array(errors, pa.string()),
            "fingerprint": [fingerprint] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
        }
    )
    pq.write_table(table, path)
    return x


def test_shards_are_contiguous_slices_of_the_faiss_order():
    plan = Plan(files=["a", "b", "c"], keep=[np.array([0, 2, 3]), np.array([], np.int64), np.array([1, 5])], failed=[])
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


def test_make_plan_orders_rows_sets_failed_aside_and_skips_repeated_cases(tmp_path):
    x1 = embedding_file(tmp_path / "1.parquet", ["a\x1fdiagnosis", "b\x1fdiagnosis", "c\x1fdiagnosis"],
                        errors=[None, "bad.png row 1: not a readable image", None])  # fmt: skip
    x2 = embedding_file(tmp_path / "2.parquet", ["d\x1fdiagnosis", "a\x1fdiagnosis"], seed=1)
    plan = make_plan([str(tmp_path / "1.parquet"), str(tmp_path / "2.parquet")], pa.array([], pa.string()))
    assert (plan.count, plan.failed_count, plan.duplicates, plan.dim, plan.fingerprint) == (3, 1, 1, 4, "fp")
    assert plan.keys.to_pylist() == ["a\x1fdiagnosis", "c\x1fdiagnosis", "d\x1fdiagnosis"]
    vectors, values = read_entries(plan.everything(), plan.dim)
    np.testing.assert_array_equal(vectors, np.stack([x1[0], x1[2], x2[0]]))
    assert values.column("id").to_pylist() == ["a", "c", "d"]
    embedding_file(tmp_path / "3.parquet", ["e\x1fdiagnosis"], fingerprint="other")
    with pytest.raises(IndexArtifactError, match="different encoders"):
        make_plan([str(tmp_path / "1.parquet"), str(tmp_path / "3.parquet")], pa.array([], pa.string()))


def test_case_text_and_key_per_task():
    assert value_text("diagnosis", "malignant", None, None) == "malignant"
    assert value_text("vqa", None, "yes", None) == "yes"
    assert value_text("report", None, None, "Findings: ...") == "Findings: ..."
    assert case_key("abc", "vqa") != case_key("abc", "report")


def test_instruction_rows_become_cases_of_their_source_sample():
    batch = pa.table(
        {
            "id": ["i1", "i2", "i3"],
            "source_id": ["s1", "s1", "s2"],
            "dataset": ["d"] * 3,
            "task": ["diagnosis", "guided_report", "vqa"],
            "split": ["train"] * 3,
            "modality": ["CT"] * 3,
            "label": [None, "benign", None],
            "image": [b"x"] * 3,
            "prompt": ["p"] * 3,
            "answer": ["benign", "Findings: ok.", "yes"],
            "source_file": ["f"] * 3,
            "source_index": [0, 0, 1],
        }
    )
    rows = _instruct_rows(batch).to_pylist()
    assert [r["id"] for r in rows] == ["s1", "s1", "s2"]
    keys = [case_key("s1", "diagnosis"), case_key("s1", "guided_report"), case_key("s2", "vqa")]
    assert [r["key"] for r in rows] == keys
    assert [r["label"] for r in rows] == ["benign", "benign", None]  # a diagnosis answer is its label
    assert [r["text"] for r in rows] == ["benign", "Findings: ok.", "yes"]
    assert all(r["error"] is None for r in rows)


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
