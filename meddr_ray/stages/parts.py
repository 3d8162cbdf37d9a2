"""Exactly-once Parquet part files, as the bootstrap and evaluate stages write them (instruct reads bootstrap's).

A Ray Data batch writes its rows to one ``part-<hash>.parquet``: named by a hash of the batch's ids (a batch Ray
retries rewrites the same file instead of adding a second one) and written atomically (a temporary name, then a
rename: a killed writer leaves no half file, only a ``*.tmp-*`` that :func:`remove_stale_temps` deletes). A re-run
reads back only the columns it needs (:func:`read_columns`: the ids already done, never the images). Rows that
could not be used go to a ``failed/`` folder of the same kind (:data:`FAILED_SCHEMA`).

The same batch ids seed its sampling (:func:`batch_seed`), and each batch returns one row of counts that the
driver sums (:func:`sum_stats`).
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from meddr_ray import storage
from meddr_ray.storage import join_path

PART_PREFIX = "part-"

FAILED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("source_index", pa.int64()),
        pa.field("error", pa.string()),
    ]
)


def failed_row(sample: Dict[str, Any], error: str) -> Dict[str, Any]:
    """A :data:`FAILED_SCHEMA` row: the sample's id and place in its source, and why it was set aside."""
    return {
        "id": sample["id"],
        "dataset": sample.get("dataset"),
        "split": sample.get("split"),
        "source_file": sample.get("source_file"),
        "source_index": sample.get("source_index"),
        "error": error,
    }


def part_name(ids: Iterable[str]) -> str:
    """File name of a batch: the same set of ids always gets the same name, so a retried batch overwrites."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}.parquet"


def write_table(folder: str, table: pa.Table) -> str:
    """Write ``table`` as ``folder/part-<hash of its ids>.parquet``, atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return storage.write_bytes(join_path(folder, part_name(table.column("id").to_pylist())), buf.getvalue())


def part_files(folder: str) -> List[str]:
    return [f for f in storage.list_files(folder, ".parquet") if f.rsplit("/", 1)[-1].startswith(PART_PREFIX)]


def read_columns(folder: str, columns: Sequence[str]) -> pa.Table:
    """Only ``columns`` of every part file in ``folder`` (never the images); empty table if there are none."""
    import pyarrow.dataset as pads

    files = part_files(folder)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    return pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=list(columns))


def remove_stale_temps(folder: str) -> int:
    """Delete ``*.tmp-*`` files a killed writer left behind (never read: they do not end in .parquet)."""
    n = 0
    for f in storage.list_files(folder):
        if ".tmp-" in f.rsplit("/", 1)[-1]:
            storage.remove(f)
            n += 1
    return n


def batch_seed(seed: int, ids: Sequence[str]) -> int:
    """A sampling seed fixed by the run's seed and the batch's ids (a retried batch samples the same text)."""
    return int(hashlib.sha1(f"{seed}\x1f{'|'.join(sorted(ids))}".encode()).hexdigest()[:8], 16)


def sum_stats(stats_ds, keys: Sequence[str],
              each: Optional[Callable[[Dict[str, Any], Dict[str, float], float], None]] = None,
              ) -> Tuple[Dict[str, float], float]:  # fmt: skip
    """Runs the job (the driver pulls its count rows, one per batch) and sums ``keys`` over them (a key a row
    lacks counts 0); ``each(row, totals so far, seconds so far)`` is called after every row. Returns the totals
    and the seconds the job took."""
    started = time.perf_counter()
    totals: Dict[str, float] = dict.fromkeys(keys, 0)
    for batch in stats_ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            for key in totals:
                totals[key] += row.get(key, 0)
            if each is not None:
                each(row, totals, time.perf_counter() - started)
    return totals, time.perf_counter() - started
