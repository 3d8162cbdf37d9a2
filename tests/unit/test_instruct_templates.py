"""Instruction rendering: the templates per task, weights, the deterministic split (no Ray)."""

import pyarrow as pa
import pytest

from meddr_ray import prompts

from meddr_ray.stages import instruct

DIAG = {
    "id": "d1",
    "dataset": "breastmnist",
    "task": "diagnosis",
    "modality": "breast ultrasound",
    "label": "malignant",
    "label_set": ["malignant", "normal, benign"],
    "image": b"png",
    "source_file": "/x/breastmnist.npz",
    "source_index": 3,
}


def test_diagnosis_uses_a3_with_the_label_set_and_answers_the_label():
    [(task, prompt, answer)] = instruct.sample_instructions(DIAG)
    assert task == "diagnosis"
    assert prompt == prompts.diagnosis_prompt("breast ultrasound", ["malignant", "normal, benign"])
    assert answer == "malignant"


def test_vqa_uses_a1():
    row = dict(DIAG, task="vqa", question="Is there a mass?", answer="Yes", modality="CT")
    [(task, prompt, answer)] = instruct.sample_instructions(row)
    assert (task, prompt, answer) == ("vqa", prompts.vqa_prompt("Is there a mass?"), "Yes")


def test_report_uses_a2_and_optionally_adds_a_description_of_the_findings():
    row = dict(DIAG, task="report", modality="chest X-ray", report="Findings: clear lungs. Impression: normal.")
    assert instruct.sample_instructions(row) == [
        ("report", prompts.report_prompt("chest X-ray"), "Findings: clear lungs. Impression: normal.")
    ]
    both = instruct.sample_instructions(row, descriptions=True)
    assert both[1] == ("description", prompts.description_prompt(), "clear lungs.")


def test_guided_report_does_not_leak_the_diagnosis():
    row = dict(DIAG, report="Findings: irregular mass. Impression: suspicious.", label="malignant")
    task, prompt, answer = instruct.bootstrap_instruction(row)
    assert task == "guided_report"
    assert prompt == prompts.guided_report_prompt("breast ultrasound")
    assert "malignant" not in prompt and "diagnosis is" not in prompt
    assert answer == row["report"]


@pytest.mark.parametrize(
    "row, message",
    [
        (dict(DIAG, label=None), "no label"),
        (dict(DIAG, label_set=[]), "no label set"),
        (dict(DIAG, task="vqa", question="Q?", answer=" "), "no answer"),
        (dict(DIAG, task="report", report=None), "no report text"),
    ],
)
def test_unusable_rows_raise_with_the_reason(row, message):
    with pytest.raises(instruct.RowError, match=message):
        instruct.sample_instructions(row)


def test_weights_repeat_or_thin_deterministically():
    ids = [f"s{i}" for i in range(2000)]
    assert all(instruct.copies(i, 1.0) == 1 for i in ids)
    assert all(instruct.copies(i, 2.0) == 2 for i in ids)
    half = sum(instruct.copies(i, 0.5) for i in ids)
    assert 900 < half < 1100
    assert [instruct.copies(i, 1.5) for i in ids] == [instruct.copies(i, 1.5) for i in ids]


def test_split_is_by_source_id_and_stable():
    ids = [f"s{i}" for i in range(2000)]
    splits = [instruct.split_of(i, 0.1) for i in ids]
    assert splits == [instruct.split_of(i, 0.1) for i in ids]
    assert 150 < splits.count("val") < 250
    assert all(instruct.split_of(i, 0.0) == "train" for i in ids)


def test_expand_gives_unique_ids_and_one_split_per_sample():
    rows = instruct.expand(DIAG, [("report", "p", "a"), ("description", "p2", "b")], 2.0, 0.5)
    assert len(rows) == 4
    assert len({r["id"] for r in rows}) == 4
    assert len({r["split"] for r in rows}) == 1
    assert all(r["source_id"] == "d1" for r in rows)


def test_render_samples_sets_aside_bad_rows_with_their_source_row():
    batch = pa.Table.from_pylist(
        [
            dict(DIAG, split="train", labels=["malignant"], question=None, answer=None, answer_type=None,
                 report=None, error=None),
            dict(DIAG, id="d2", split="train", labels=[], question=None, answer=None, answer_type=None, report=None,
                 label=None, source_index=4, error=None),
            dict(DIAG, id="d3", split="train", labels=[], question=None, answer=None, answer_type=None, report=None,
                 image=None, source_index=5, error="b.png row 5: not a readable image"),
        ]
    )  # fmt: skip
    out = instruct._render_samples(batch, weight=1.0, val_fraction=0.0, descriptions=False).to_pylist()
    assert [r["error"] is None for r in out] == [True, False, False]
    assert out[1]["error"] == "/x/breastmnist.npz row 4: no label (column 'label' is empty)"
    assert out[2]["error"] == "b.png row 5: not a readable image"
    assert out[0]["split"] == "train" and out[0]["prompt"].startswith("You are a helpful medical assistant.")


def test_summary_table_adds_up_splits():
    rows = instruct.summary_table(
        [
            {"task": "diagnosis", "dataset": "b", "split": "train", "count()": 9},
            {"task": "diagnosis", "dataset": "b", "split": "val", "count()": 1},
            {"task": "vqa", "dataset": "s", "split": "train", "count()": 4},
        ]
    )
    assert rows == [
        {"task": "diagnosis", "dataset": "b", "train": 9, "val": 1, "total": 10},
        {"task": "vqa", "dataset": "s", "train": 4, "val": 0, "total": 4},
    ]
    assert "diagnosis" in instruct.format_table(rows)


def test_multi_label_datasets_offer_no_finding_to_every_sample():
    row = dict(DIAG, dataset="chestmnist", modality="chest X-ray", label="effusion", label_set=["effusion", "mass"])
    [(_, prompt, answer)] = instruct.sample_instructions(row)
    assert prompt == prompts.diagnosis_prompt("chest X-ray", ["effusion", "mass", "no finding"])
    assert prompt.endswith("The possible diagnoses are:effusion; mass; no finding.")
    assert answer == "effusion"
    [(_, single, _)] = instruct.sample_instructions(DIAG)
    assert "No finding" not in single
