"""What the evaluate stage's modules share: the prediction rows (:data:`PREDICTION_SCHEMA`, written by
:mod:`.stage`, read by :mod:`.report`), the rows of the paper's Table 4 and the modes' titles (in report.md and
in the plots of :mod:`.figures`)."""

from __future__ import annotations

import pyarrow as pa

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # the sample's stable id (one row per id and mode)
        pa.field("mode", pa.string()),  # no_rag | rag | voting
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("task", pa.string()),  # diagnosis | vqa | report
        pa.field("source_file", pa.string()),  # where the query image came from
        pa.field("source_index", pa.int64()),
        pa.field("modality", pa.string()),
        pa.field("question", pa.string()),  # VQA
        pa.field("answer_type", pa.string()),  # VQA: OPEN / CLOSED as the source states it
        pa.field("reference", pa.string()),  # the label(s), the answer or the reference report
        pa.field("options", pa.list_(pa.string())),  # diagnosis: the options the prompt offered, in order
        pa.field("prompt", pa.string()),  # the exact instruction the student saw (null for voting)
        pa.field("output", pa.string()),  # the student's text; voting: the voted label or the top-1 report
        pa.field("true_index", pa.int64()),  # diagnosis: the reference's option (null: not exactly one option)
        pa.field("pred_index", pa.int64()),  # diagnosis: the option the output maps to (MultiMedEval BLEU-1)
        pa.field("true_vector", pa.list_(pa.int8())),  # multi-label diagnosis: 0/1 per label (options but "no finding")
        pa.field("pred_vector", pa.list_(pa.int8())),  # multi-label diagnosis: the labels the output names
        pa.field("pred_label", pa.string()),  # diagnosis: the predicted option(s)' name
        pa.field("correct", pa.bool_()),  # diagnosis: prediction == reference (multi-label: every label)
        pa.field("scores", pa.string()),  # VQA / report: the per-row figures, JSON
        pa.field("neighbour_ids", pa.list_(pa.string())),  # retrieved cases, nearest first (null without an index)
        pa.field("neighbour_scores", pa.list_(pa.float32())),  # their cosine similarities
        pa.field("neighbour_labels", pa.list_(pa.string())),  # their labels (null entries: cases without one)
        pa.field("top_k", pa.int64()),  # how many of the neighbours the prompt and the vote used (rag.top_k_*)
        pa.field("tokens", pa.int64()),  # generated tokens (0 for voting)
        pa.field("run_key", pa.string()),  # what the answers depend on (student, adapter, index, settings)
    ]
)

# The rows of a task in the paper's Table 4 (the report rows include the model-based metrics it reports).
TABLE4_ROWS = {
    "diagnosis": ["accuracy", "macro_f1"],
    "vqa": ["bleu1", "closed_acc", "open_recall", "recall", "open_acc", "f1"],
    "report": ["f1_radgraph", "bleu1", "bleu4", "rouge1", "rougeL", "radcliq", "chexbert_similarity", "meteor"],
}

# The modes in the order of the paper's Table 4 columns, and their titles there.
MODE_ORDER = ("voting", "no_rag", "rag")
MODE_TITLES = {"voting": "voting", "no_rag": "w/o RAG", "rag": "w/ RAG"}
