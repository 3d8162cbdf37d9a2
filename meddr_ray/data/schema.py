"""The one Arrow schema every sample has, whatever source it came from.

A row is a sample: one image with whatever text the source gives (a label, a QA pair or a report). Stages add
their own columns (a bootstrapped report, a prompt) but never change these.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional

import pyarrow as pa

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # stable under inserts: see sample_id / keyed_id
        pa.field("dataset", pa.string(), nullable=False),  # source name (breastmnist, slake, ...)
        pa.field("split", pa.string()),  # train / val / test
        pa.field("source_index", pa.int64()),  # row number inside the source file, for error messages (not the id)
        pa.field("source_file", pa.string()),  # the file the row (or its image) came from
        pa.field("modality", pa.string()),  # "breast ultrasound", "chest X-ray", "CT", ...
        pa.field("task", pa.string()),  # diagnosis | vqa | report
        pa.field("image", pa.binary()),  # encoded image (PNG/JPEG), validated; null if absent and allowed
        pa.field("label", pa.string()),  # diagnosis: the label name(s), ", "-joined when multi-label
        pa.field("labels", pa.list_(pa.string())),  # diagnosis: every label of the sample
        pa.field("label_set", pa.list_(pa.string())),  # diagnosis: all the classes of the dataset
        pa.field("question", pa.string()),  # vqa
        pa.field("answer", pa.string()),  # vqa
        pa.field("answer_type", pa.string()),  # vqa: OPEN / CLOSED
        pa.field("report", pa.string()),  # report datasets: the reference report
        pa.field("error", pa.string()),  # null for a good row; else why it is bad (on_error: skip keeps it)
    ]
)

COLUMNS: List[str] = SAMPLE_SCHEMA.names


def sample_id(dataset: str, split: str, index: int) -> str:
    """Id of row ``index`` of a fixed array release (MedMNIST's npz): there the position is the official index,
    so it never shifts. Not for folders or tables, which grow: one inserted file would shift every later id."""
    return hashlib.sha1(f"{dataset}\x1f{split}\x1f{index}".encode()).hexdigest()[:20]


def keyed_id(dataset: str, split: str, key: str) -> str:
    """Readable id of a row named by a key of its own (a file's relative path, an id column, an image path plus a
    hash of the row): ``dataset/split/key``, the same however many files or rows are inserted before it."""
    return f"{dataset}/{split}/{key}"


def make_row(**values: Any) -> Dict[str, Optional[Any]]:
    """A row with every schema column (missing ones null); unknown keys are a programming error."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not in the sample schema: {sorted(unknown)}")
    return {name: values.get(name) for name in COLUMNS}


def rows_to_table(rows: List[Dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([make_row(**r) if set(r) != set(COLUMNS) else r for r in rows], schema=SAMPLE_SCHEMA)
