"""The evaluation's per-row scoring and per-dataset summaries (no Ray, no model): which options a diagnosis
offers, how answers and votes become option numbers or label vectors, and which rows a summary counts."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from meddr_ray import metrics
from meddr_ray.data import medmnist_info
from meddr_ray.stages.evaluate.schema import PREDICTION_SCHEMA
from meddr_ray.stages.evaluate.scoring import (
    SUMMARY_COLUMNS,
    diagnosis_options,
    modes_for,
    scored,
    summarize,
)

BREAST = ["malignant", "normal, benign"]
CHEST = medmnist_info("chestmnist")["labels"]


def test_options_add_no_finding_only_for_a_multi_label_set():
    assert diagnosis_options("breastmnist", BREAST) == BREAST
    assert diagnosis_options("chestmnist", CHEST) == CHEST + ["no finding"]
    assert diagnosis_options("chestmnist", CHEST + ["No finding"]) == CHEST + ["No finding"]  # not twice


def test_voting_has_no_vqa_row():
    assert modes_for("vqa", ["no_rag", "rag", "voting"]) == ["no_rag", "rag"]
    assert modes_for("report", ["voting", "no_rag"]) == ["no_rag", "voting"]  # table order
    assert modes_for("vqa", ["voting"]) == []


def test_single_label_answers_are_mapped_and_votes_taken_as_they_are():
    out = scored("diagnosis", "It looks normal, benign.", "normal, benign", labels=["normal, benign"], options=BREAST)
    assert (out["true_index"], out["pred_index"], out["pred_label"], out["correct"]) == (1, 1, "normal, benign", True)
    # free text that shares no word with any option: MultiMedEval's class 0, not a skipped row
    assert scored("diagnosis", "xyz", "malignant", labels=["malignant"], options=BREAST)["pred_index"] == 0
    # a vote for an option is that option, by name
    voted = scored("diagnosis", "normal, benign", None, labels=["malignant"], options=BREAST, voted=True)
    assert (voted["pred_index"], voted["correct"]) == (1, False)
    # a vote for a label of another dataset, or no labelled neighbour at all, is mapped like free text
    other = scored("diagnosis", "benign cyst", None, labels=["malignant"], options=BREAST, voted=True)
    assert other["pred_index"] == metrics.map_to_label("benign cyst", BREAST) == 1
    assert scored("diagnosis", None, None, labels=["malignant"], options=BREAST, voted=True)["pred_index"] == 0
    # a reference outside the options is not scored
    unknown = scored("diagnosis", "malignant", None, labels=["cyst"], options=BREAST)
    assert (unknown["true_index"], unknown["correct"]) == (None, None)


def test_multi_label_answers_become_label_vectors():
    options = diagnosis_options("chestmnist", CHEST)
    out = scored("diagnosis", "effusion, mass", None, labels=["effusion", "mass"], options=options, multi_label=True)
    want = [int(n in ("effusion", "mass")) for n in CHEST]
    assert out["true_vector"] == want and len(out["true_vector"]) == 14  # "no finding" is no label of its own
    assert out["pred_vector"] == metrics.map_to_labels("effusion, mass", CHEST)
    voted = scored("diagnosis", "effusion, mass", None, labels=["effusion"], options=options, multi_label=True,
                   voted=True)  # fmt: skip
    assert voted["pred_vector"] == want and voted["correct"] is False and voted["pred_label"] == "effusion, mass"
    healthy = scored("diagnosis", "no finding", None, labels=[], options=options, multi_label=True, voted=True)
    assert healthy["true_vector"] == [0] * 14 and healthy["pred_vector"] == [0] * 14 and healthy["correct"] is True
    assert healthy["pred_label"] == "no finding"


def _table(rows):
    full = [{c: r.get(c) for c in SUMMARY_COLUMNS} for r in rows]
    return pa.Table.from_pylist(full, schema=pa.schema([PREDICTION_SCHEMA.field(c) for c in SUMMARY_COLUMNS]))


def test_summaries_count_what_they_score():
    rows = [dict(id=str(i), dataset="d", task="diagnosis", mode="rag", true_index=t, pred_index=p)
            for i, (t, p) in enumerate([(0, 0), (1, 0), (1, 1), (None, 1)])]  # fmt: skip
    s = summarize("diagnosis", _table(rows), 2)
    assert (s["n"], s["not_scored"], s["rows"]) == (3, 1, 4)
    assert s["confusion"] == [[1, 0], [1, 1]] and s["accuracy"] == pytest.approx((1.0 + 0.5) / 2)

    vectors = [dict(id=str(i), dataset="c", task="diagnosis", mode="rag", true_vector=t, pred_vector=p)
               for i, (t, p) in enumerate([([1, 0], [1, 0]), ([0, 1], [0, 0])])]  # fmt: skip
    s = summarize("diagnosis", _table(vectors))
    assert s == {**metrics.multilabel_summary([[1, 0], [0, 1]], [[1, 0], [0, 0]]), "not_scored": 0, "rows": 2}

    qa = [("yes", "yes"), ("not enlarged", "no"), ("liver", "lung")]
    vqa = [dict(id=str(i), dataset="v", task="vqa", mode="rag", scores=json.dumps(metrics.vqa_scores(p, a)))
           for i, (p, a) in enumerate(qa)]  # fmt: skip
    s = summarize("vqa", _table(vqa))
    assert s == {**metrics.vqa_summary(metrics.vqa_scores(p, a) for p, a in qa), "rows": 3}
    assert (s["closed_acc"], s["n_closed"], s["n_open"]) == (1.0, 2, 1)

    report = scored("report", None, "Lungs are clear.")  # no retrieved report to vote with: an empty prediction
    assert json.loads(report["scores"])["bleu1"] == 0.0 and json.loads(report["scores"])["bleu_ref_len"] == 3


def test_a_multi_label_reference_outside_the_label_set_is_not_scored():
    options = diagnosis_options("chestmnist", CHEST)
    out = scored("diagnosis", "effusion", None, labels=["effusion", "tumour"], options=options, multi_label=True)
    assert (out["true_vector"], out["correct"]) == (None, None)  # not the all-zero "no finding" vector
    assert out["pred_vector"] == metrics.map_to_labels("effusion", CHEST)
    rows = [dict(id="a", dataset="c", task="diagnosis", mode="rag", true_vector=out["true_vector"],
                 pred_vector=out["pred_vector"]),
            dict(id="b", dataset="c", task="diagnosis", mode="rag", true_vector=[0] * 14, pred_vector=[0] * 14)]
    s = summarize("diagnosis", _table(rows))
    assert (s["n"], s["not_scored"], s["rows"]) == (1, 1, 2)
    # "no finding" as a reference is the all-zero vector, in any case
    healthy = scored("diagnosis", "no finding", None, labels=["No finding"], options=options, multi_label=True)
    assert healthy["true_vector"] == [0] * 14 and healthy["correct"] is True
