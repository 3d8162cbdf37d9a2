"""From one answer to one prediction row, and from prediction rows to a dataset's figures.

Every definition is :mod:`meddr_ray.metrics` (MultiMedEval's); this module only decides what goes in: which
options a diagnosis offers, which text is scored against which reference, and which small columns of the
prediction files a dataset's summary is computed from. No Ray, no models, no images.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from meddr_ray import metrics
from meddr_ray.data import NO_FINDING, medmnist_info

TASKS = ("diagnosis", "vqa", "report")
MODES = ("no_rag", "rag", "voting")
GENERATED_MODES = ("no_rag", "rag")  # the rows the student answers; voting uses the retrieved cases alone
VOTING_TASKS = ("diagnosis", "report")  # the paper's Table 4 has no voting row for VQA

# The columns a dataset's figures are computed from (never the prompts, answers or images).
SUMMARY_COLUMNS = ["id", "dataset", "task", "mode", "true_index", "pred_index", "true_vector", "pred_vector", "scores"]


def modes_for(task: str, modes: Sequence[str]) -> List[str]:
    """The configured modes that apply to a task, in table order."""
    return [m for m in MODES if m in modes and (m != "voting" or task in VOTING_TASKS)]


# ------------------------------------------------------------------------------------------------ diagnosis


def is_multi_label(dataset: Optional[str]) -> bool:
    """A multi-label MedMNIST set (ChestMNIST): several labels per image, scored per label."""
    return bool(dataset and (medmnist_info(dataset) or {}).get("multi_label"))


def diagnosis_options(dataset: Optional[str], label_set: Sequence[str]) -> List[str]:
    """The options a diagnosis prompt offers: the dataset's label set, plus "no finding" for a multi-label set
    (the instruction mix offers it the same way, so the student is asked what it was trained on)."""
    options = [str(o) for o in label_set or []]
    if is_multi_label(dataset) and NO_FINDING not in [o.lower() for o in options]:
        options.append(NO_FINDING)
    return options


def scored_labels(options: Sequence[str]) -> List[str]:
    """The labels a multi-label sample is scored on: the options without the "no finding" one (an image with no
    finding is the all-zero vector, as MultiMedEval scores ChestMNIST)."""
    return [o for o in options if o.lower() != NO_FINDING]


def true_index(labels: Sequence[str], options: Sequence[str]) -> Optional[int]:
    """The reference's option number; None when it is not exactly one of the options."""
    labels = [x for x in labels or [] if x]
    if len(labels) != 1 or labels[0] not in options:
        return None
    return list(options).index(labels[0])


def predicted_index(text: Optional[str], options: Sequence[str]) -> int:
    """The option a free-text answer names: MultiMedEval's BLEU-1 mapping (ties to the first; no overlap -> 0)."""
    return int(metrics.map_to_label(text or "", list(options)))


def voted_index(label: Optional[str], options: Sequence[str]) -> int:
    """The option a voted label is: itself when it is one (the index's cases of the same dataset), else mapped
    like a free-text answer (a neighbour from another dataset, or no labelled neighbour at all)."""
    if label in options:
        return list(options).index(label)
    return predicted_index(label, options)


# ------------------------------------------------------------------------------------------------ one row


def scored(task: str, output: Optional[str], reference: Optional[str], *, labels: Sequence[str] = (),
           options: Sequence[str] = (), multi_label: bool = False, voted: bool = False) -> Dict[str, Any]:  # fmt: skip
    """The prediction columns that depend on the answer.

    diagnosis: ``true_index`` / ``pred_index`` (single-label: option numbers, the answer mapped by BLEU-1, a
    voted label taken as it is) or ``true_vector`` / ``pred_vector`` (multi-label: 0/1 per label, the answer
    mapped by :func:`metrics.map_to_labels`, a voted ``", "``-joined label set split), ``pred_label`` and
    ``correct``; a reference outside the options leaves ``true_index`` / ``true_vector`` and ``correct`` null;
    VQA and report: ``scores``, the per-row figures as JSON.
    """
    out: Dict[str, Any] = dict.fromkeys(
        ("true_index", "pred_index", "true_vector", "pred_vector", "pred_label", "correct", "scores")
    )
    if task == "diagnosis":
        if multi_label:
            names = scored_labels(options)
            if voted:
                picked = set((output or "").split(", "))
                pred = [int(name in picked) for name in names]
            else:
                pred = metrics.map_to_labels(output or "", names) if names else []
            # a label outside the set cannot be a 0/1 vector entry: not scored (counted in ``not_scored``), never
            # read as the all-zero "no finding" vector
            known = set(names) | {NO_FINDING}
            scorable = all(x in known or x.lower() == NO_FINDING for x in labels if x)
            true = [int(name in labels) for name in names] if scorable else None
            out.update(true_vector=true, pred_vector=pred, correct=None if true is None else true == pred)
            out["pred_label"] = ", ".join(n for n, p in zip(names, pred) if p) or NO_FINDING
        else:
            true = true_index(labels, options)
            index = voted_index(output, options) if voted else predicted_index(output, options)
            out.update(true_index=true, pred_index=index, pred_label=options[index])
            out["correct"] = None if true is None else index == true
    elif task == "vqa":
        out["scores"] = json.dumps(metrics.vqa_scores(output or "", reference or ""), sort_keys=True)
    elif task == "report":
        out["scores"] = json.dumps(metrics.report_scores(output or "", reference or ""), sort_keys=True)
    else:
        raise ValueError(f"unknown task {task!r}: one of {list(TASKS)}")
    return out


# ----------------------------------------------------------------------------------------------- summaries


def summarize(task: str, table: pa.Table, num_classes: int = 0) -> Dict[str, Any]:
    """One dataset's figures in one mode from its prediction rows (:data:`SUMMARY_COLUMNS`).

    diagnosis: :func:`metrics.classification_summary` over the rows whose reference is one of the options
    (``not_scored`` counts the others), or :func:`metrics.multilabel_summary` for a multi-label set; VQA:
    :func:`metrics.vqa_summary` of the per-row scores; report: :func:`metrics.report_summary` of them. ``rows``
    counts every prediction row.
    """
    rows = table.num_rows
    if task == "diagnosis":
        vectors = table.filter(pc.is_valid(table.column("true_vector")))
        if vectors.num_rows:
            summary = dict(metrics.multilabel_summary(vectors.column("true_vector").to_pylist(),
                                                      vectors.column("pred_vector").to_pylist()))  # fmt: skip
            kept = vectors.num_rows
        else:
            single = table.filter(pc.is_valid(table.column("true_index")))
            y_true = single.column("true_index").to_pylist()
            y_pred = single.column("pred_index").to_pylist()
            summary = dict(metrics.classification_summary(y_true, y_pred, num_classes))
            kept = single.num_rows
        summary["not_scored"] = rows - kept
    else:
        per_row = (json.loads(s) for s in table.column("scores").to_pylist() if s is not None)
        summary = dict(metrics.vqa_summary(per_row) if task == "vqa" else metrics.report_summary(per_row))
    summary["rows"] = rows
    return summary
