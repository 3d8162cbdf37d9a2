"""The findings/impression splitter and the bootstrap row building (no Ray, no model)."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddr_ray.config import GenerationConfig, ModelConfig
from meddr_ray.stages import bootstrap_rows, parts
from meddr_ray.report_sections import split_report


def test_findings_and_impression():
    r = split_report("Findings: A hypoechoic mass with irregular margins. Impression: Suspicious for malignancy.")
    assert r.findings == "A hypoechoic mass with irregular margins."
    assert r.impression == "Suspicious for malignancy."
    assert r.quality == "ok"


def test_upper_case_headers_on_their_own_lines():
    r = split_report("FINDINGS:\nThe lungs are clear.\n\nIMPRESSION:\nNo acute disease.")
    assert (r.findings, r.impression, r.quality) == ("The lungs are clear.", "No acute disease.", "ok")


def test_plural_impressions_and_markdown_decoration():
    r = split_report("**Findings:** Oval lesion, circumscribed.\n## Impressions\n1. Likely benign.")
    assert r.findings == "Oval lesion, circumscribed."
    assert r.impression == "1. Likely benign."
    assert r.quality == "ok"


def test_preamble_is_dropped_and_prose_is_not_a_header():
    r = split_report("Here is the report. Findings: the findings are unremarkable. Impression: normal")
    assert r.findings == "the findings are unremarkable."
    assert r.impression == "normal"


def test_only_one_section_is_partial():
    r = split_report("Findings: a round mass in the upper outer quadrant, and the")
    assert r.findings.startswith("a round mass")
    assert r.impression is None
    assert r.quality == "partial"


def test_no_sections_is_flagged():
    r = split_report("The image shows a breast with some tissue.")
    assert (r.findings, r.impression, r.quality) == (None, None, "no_sections")


def test_headers_with_empty_bodies_count_as_none():
    assert split_report("Findings:\nImpression:").quality == "no_sections"


@pytest.mark.parametrize("text", ["", "   \n", None])
def test_empty_is_flagged(text):
    assert split_report(text).quality == "empty"


SAMPLE = {
    "id": "abc",
    "dataset": "chestmnist",
    "split": "train",
    "source_index": 7,
    "source_file": "/data/chestmnist.npz",
    "modality": "chest X-ray",
    "label": "effusion, nodule",
    "labels": ["effusion", "nodule"],
    "label_set": ["effusion", "nodule", "mass"],
    "image": b"png",
}


def test_teacher_prompt_has_every_label_and_the_modality():
    text = bootstrap_rows.teacher_prompt(SAMPLE)
    assert "You are given a chest X-ray image and the diagnosis is effusion, nodule." in text


def test_teacher_prompt_falls_back_to_label_and_a_generic_modality():
    row = dict(SAMPLE, labels=[], label="no finding", modality=None)
    assert "You are given a medical image and the diagnosis is no finding." in bootstrap_rows.teacher_prompt(row)


def test_report_row_fills_the_schema():
    teacher = ModelConfig(name="smol", path="/models/smol")
    gen = GenerationConfig(max_new_tokens=12, response_prefix="Findings:")
    row = bootstrap_rows.report_row(
        SAMPLE,
        "the prompt",
        {"text": "Findings: fluid. Impression: effusion.", "tokens": 9},
        teacher=teacher,
        prompt_version="v1",
        generation_json=bootstrap_rows.generation_json(gen),
    )
    table = pa.Table.from_pylist([row], schema=bootstrap_rows.REPORT_SCHEMA)  # every field present and typed
    out = table.to_pylist()[0]
    assert (out["findings"], out["impression"], out["quality"]) == ("fluid.", "effusion.", "ok")
    assert (out["teacher"], out["teacher_path"], out["prompt_version"], out["tokens"]) == ("smol", "/models/smol", "v1", 9)
    assert json.loads(out["generation"])["response_prefix"] == "Findings:"
    assert out["labels"] == ["effusion", "nodule"]


def test_failed_row_keeps_where_it_came_from():
    row = parts.failed_row(SAMPLE, "bad.png row 7: not a readable image")
    table = pa.Table.from_pylist([row], schema=parts.FAILED_SCHEMA)
    assert table.to_pylist()[0]["source_file"] == "/data/chestmnist.npz"


def test_part_name_depends_on_the_set_of_ids_only():
    assert parts.part_name(["b", "a"]) == parts.part_name(["a", "b"])
    assert parts.part_name(["a"]) != parts.part_name(["a", "b"])


def test_write_table_is_atomic_and_readable(tmp_path):
    table = pa.table({"id": ["x", "y"], "v": [1, 2]})
    path = parts.write_table(str(tmp_path), table)
    assert path.endswith(parts.part_name(["x", "y"]))
    (tmp_path / "part-dead.parquet.tmp-1234abcd").write_bytes(b"half a file")
    assert parts.remove_stale_temps(str(tmp_path)) == 1
    assert parts.read_columns(str(tmp_path), ["id"]).column("id").to_pylist() == ["x", "y"]


def test_read_columns_of_an_empty_folder(tmp_path):
    assert parts.read_columns(str(tmp_path / "nothing"), ["id"]).num_rows == 0


def test_read_columns_reads_only_the_asked_columns(tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x" * 100]}), buf)
    (tmp_path / "part-1.parquet").write_bytes(buf.getvalue())
    assert parts.read_columns(str(tmp_path), ["id"]).column_names == ["id"]
