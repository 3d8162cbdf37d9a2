"""What a published index version is made of: its file names, the schema of its values (one case per image),
the errors a reader or publisher raises, and the key that names a case."""

from __future__ import annotations

import hashlib
from typing import List, Optional

import pyarrow as pa

METRIC = "inner_product"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"  # the inverted lists of an IVF version, mapped into memory by readers
VALUES_FILE = "values.parquet"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: one case per image (label, report, qa); 1 had one row per task (task, text)

# The value of every FAISS id: one case per image (paper section 3.3: "the visual embedding as the key while the
# text is the value"), with every annotation the training data give that image.
QA_TYPE = pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))
VALUES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),  # the case: one image of one dataset (case_key)
        pa.field("dataset", pa.string()),  # source name: what retrieval can be scoped to
        pa.field("modality", pa.string()),  # imaging modality
        pa.field("split", pa.string()),  # the source split the image came from
        pa.field("label", pa.string()),  # the image's diagnosis label(s), ", "-joined; null when it has none
        pa.field("report", pa.string()),  # its report (a reference report, else the bootstrapped one); or null
        pa.field("qa", QA_TYPE),  # its VQA question-answer pairs (empty when none)
        # Where the case's image lives, so a report can show a neighbour's image (paper Figure 5) without the index
        # holding images: the source file (dictionary-encoded: a few distinct paths over millions of rows) and the
        # row inside it.
        pa.field("source_file", pa.dictionary(pa.int32(), pa.string())),
        pa.field("source_index", pa.int64()),
    ]
)
VALUE_COLUMNS: List[str] = VALUES_SCHEMA.names
REQUIRED_VALUE_COLUMNS: List[str] = ["id", "dataset", "modality", "label", "report", "qa"]
VALUE_COLUMNS: List[str] = VALUES_SCHEMA.names
REQUIRED_VALUE_COLUMNS: List[str] = ["id", "dataset", "modality", "label", "report", "qa"]


class IndexArtifactError(ValueError):
    """A published index that cannot be used (missing, corrupt, or built with another encoder); says why."""


class PublishConflict(IndexArtifactError):
    """``CURRENT`` no longer names the version a build was made on: another publisher won; nothing was published."""


def case_key(dataset: Optional[str], image: Optional[bytes], sample_id: str) -> str:
    """The case an annotation belongs to: one image of one dataset, named by its content, so the key is the same
    on every machine and run, and every question, label and report of an image lands in one case. A row without
    an image (set aside by its reader) stays a case of its own, named by its sample id."""
    if not image:
        return f"noimage:{sample_id}"
    return hashlib.sha1(f"{dataset}\x1f".encode() + image).hexdigest()[:24]


def conform_values(values: pa.Table) -> pa.Table:
    """``values`` in :data:`VALUES_SCHEMA`, in its column order; optional columns it lacks (the image location, in
    indexes and callers older than it) become nulls."""
    missing = [c for c in REQUIRED_VALUE_COLUMNS if c not in values.column_names]
    if missing:
        raise ValueError(f"index values lack the columns {missing}")
    columns = [
        values.column(f.name).cast(f.type) if f.name in values.column_names else pa.nulls(values.num_rows, f.type)
        for f in VALUES_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=VALUES_SCHEMA)
