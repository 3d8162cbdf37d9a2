"""Embedding files, without Ray: the ``(values..., fingerprint, embedding)`` Parquet files the index stage's
encoder pool writes, read row group by row group (a shard or a sample never reads the rest of a file's vectors),
and the value files of shards and versions."""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np
import pyarrow as pa

from meddr_ray import storage
from meddr_ray.retrieval.format import VALUE_COLUMNS, VALUES_SCHEMA, IndexArtifactError, conform_values
from meddr_ray.storage import is_uri


def read_columns(path: str, columns: List[str]) -> pa.Table:
    """Just ``columns`` of one Parquet file (local or URI)."""
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    return pq.read_table(p, columns=columns, filesystem=fs)


def row_groups(path: str, rows: np.ndarray, columns: List[str]):
    """``(row group table, rows of it)`` for the row groups of ``path`` that hold any of ``rows`` (sorted file
    row numbers), one row group at a time: the rows of a sample or a shard are read without the rest of the
    file's vectors (memory: one row group of ``columns``)."""
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
            raise IndexArtifactError(f"{path}: row {int(rows.max())} asked for, the file has {int(starts[-1])} rows")
        which = np.searchsorted(starts, rows, side="right") - 1
        for g in np.unique(which):
            local = rows[which == g] - starts[g]
            yield pf.read_row_group(int(g), columns=columns).take(pa.array(local)), local


def iter_entries(entries: Sequence[Tuple[str, np.ndarray]], dim: int, with_values: bool = True):
    """``(vectors (n, dim) float32, values table or None)`` of the given rows of embedding files, in order, one
    row group at a time (a shard task adds each to its index and writes its values before reading the next)."""
    import pyarrow.parquet as pq

    for path, rows in entries:
        columns = ["embedding"]
        if with_values:  # the value columns the file has (embeddings of an older version lack the image location)
            fs, p = storage.resolve(path)
            columns += [c for c in VALUE_COLUMNS if c in pq.read_schema(p, filesystem=fs).names]
        for t, _ in row_groups(path, rows, columns):
            emb = t.column("embedding").combine_chunks()
            x = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
            yield x, (conform_values(t.drop_columns(["embedding"])) if with_values else None)


def read_entries(entries: Sequence[Tuple[str, np.ndarray]], dim: int, with_values: bool = True):
    """``(vectors (n, dim) float32, values table)`` of the given rows of embedding files, in order (all at once:
    a sample, or the vectors of an index that holds them all anyway)."""
    vectors, values = [], []
    for x, v in iter_entries(entries, dim, with_values):
        vectors.append(x)
        if with_values:
            values.append(v)
    x = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return x, (pa.concat_tables(values) if with_values and values else None)


def write_values(parts, path: str) -> int:
    """Stream value tables into one Parquet file (a temporary name, then renamed: a retried task never leaves
    half a file); returns the rows written."""
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    tmp = p if is_uri(path) else f"{p}.tmp-{os.getpid()}"
    rows = 0
    with pq.ParquetWriter(tmp, VALUES_SCHEMA, filesystem=fs) as writer:
        for t in parts:
            writer.write_table(t)
            rows += t.num_rows
    if tmp != p:
        os.replace(tmp, p)
    return rows


def read_value_files(paths: Sequence[str]):
    """The value rows of shard / version files, one row group at a time."""
    import pyarrow.parquet as pq

    for path in paths:
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.metadata.num_row_groups):
                yield conform_values(pf.read_row_group(g))
