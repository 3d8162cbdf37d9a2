"""The shard plan of an index build: which rows of which embedding files become FAISS ids, in order, cut into
``index.num_shards`` contiguous shards; which rows were set aside; and the IVF training sample. Made on the
driver from the small columns only (``id``, ``dataset``, ``error``, ``fingerprint``), never the vectors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from meddr_ray import storage
from meddr_ray.retrieval.embedding_files import read_columns
from meddr_ray.retrieval.format import IndexArtifactError

# The IVF training sample is drawn from random whole row groups holding this many times its size (ShardPlan.sample)
SAMPLE_READ_FACTOR = 4


@dataclass
class ShardPlan:
    """Which rows of which embedding files become FAISS ids, in order; and which were set aside."""

    files: List[str]
    keep: List[np.ndarray]  # per file: row numbers that get indexed, in file order
    failed: List[np.ndarray]  # per file: rows with an error
    dim: int = 0
    fingerprint: Optional[str] = None
    duplicates: int = 0
    keys: Optional[pa.Array] = None  # every indexed case key, in FAISS order
    datasets: Dict[str, int] = field(default_factory=dict)  # indexed cases (images) per dataset
    group_starts: List[np.ndarray] = field(default_factory=list)  # per file: first row of each Parquet row group

    @property
    def count(self) -> int:
        return int(sum(len(k) for k in self.keep))

    @property
    def failed_count(self) -> int:
        return int(sum(len(f) for f in self.failed))

    def _positions(self) -> Tuple[np.ndarray, np.ndarray]:
        """(file number, row) of every indexed row, in FAISS order, as two arrays."""
        files = np.concatenate([np.full(len(k), f, dtype=np.int64) for f, k in enumerate(self.keep)] or [[]])
        rows = np.concatenate(self.keep or [np.zeros(0, np.int64)])
        return files.astype(np.int64), rows.astype(np.int64)

    def _group(self, files: np.ndarray, rows: np.ndarray) -> List[Tuple[str, np.ndarray]]:
        """Consecutive positions -> [(file path, rows in that file)], keeping the order."""
        out: List[Tuple[str, np.ndarray]] = []
        if not len(files):
            return out
        cuts = np.flatnonzero(np.diff(files)) + 1
        for f, r in zip(np.split(files, cuts), np.split(rows, cuts)):
            out.append((self.files[int(f[0])], r))
        return out

    def shards(self, n: int) -> List[List[Tuple[str, np.ndarray]]]:
        """``n`` contiguous, near-equal slices of the FAISS order (fewer when there are fewer rows)."""
        files, rows = self._positions()
        n = max(1, min(n, len(rows)))
        bounds = np.linspace(0, len(rows), n + 1).astype(int)
        return [self._group(files[a:b], rows[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def sample(self, size: int, seed: int) -> List[Tuple[str, np.ndarray]]:
        """``size`` rows drawn at random from about ``SAMPLE_READ_FACTOR x size`` rows: whole Parquet row groups
        picked at random (from every file), then rows within them. A sample drawn from all rows would touch every
        row group, so the training task would read the whole collection to keep a sliver of it; this way it reads
        a bounded multiple of the sample."""
        files, rows = self._positions()
        size = min(size, len(rows))
        rng = np.random.default_rng(seed)
        candidates = np.arange(len(rows))
        if self.group_starts and size * SAMPLE_READ_FACTOR < len(rows):
            group = np.zeros(len(rows), dtype=np.int64)  # a global row-group number of every indexed row
            edges = np.searchsorted(files, np.arange(len(self.files) + 1))  # positions are in file order
            base = 0
            for f, starts in enumerate(self.group_starts):
                a, b = edges[f], edges[f + 1]
                group[a:b] = base + np.searchsorted(starts, rows[a:b], side="right") - 1
                base += len(starts)
            chosen, total = [], 0
            counts = np.bincount(group, minlength=base)
            for g in rng.permutation(np.flatnonzero(counts)):
                chosen.append(g)
                total += counts[g]
                if total >= size * SAMPLE_READ_FACTOR:
                    break
            candidates = np.flatnonzero(np.isin(group, chosen))
        pick = np.sort(rng.choice(candidates, size=size, replace=False))
        return self._group(files[pick], rows[pick])

    def everything(self) -> List[Tuple[str, np.ndarray]]:
        return self._group(*self._positions())


def plan_shards(files: List[str], known_ids: pa.Array) -> ShardPlan:
    """Order the embedded rows (file by file); set aside the ones with errors and skip case keys seen before
    (both counted)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    plan = ShardPlan(files=list(files), keep=[], failed=[])
    seen = set(known_ids.to_pylist()) if len(known_ids) else set()
    fingerprints = set()
    ordered_ids: List[str] = []
    for path in plan.files:
        # the small columns only: the dimension comes from the file's schema, never from reading its vectors
        t = read_columns(path, ["id", "dataset", "error", "fingerprint"])
        fs, p = storage.resolve(path)
        md = pq.read_metadata(p, filesystem=fs)  # the footer: schema and row groups, no data
        plan.group_starts.append(np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])[:-1])
        if not plan.dim and t.num_rows:
            plan.dim = md.schema.to_arrow_schema().field("embedding").type.list_size
        errors = t.column("error").is_valid().to_numpy(zero_copy_only=False)
        fingerprints.update(x for x in pc.unique(t.column("fingerprint")).to_pylist() if x)
        keep = []
        names = t.column("dataset").to_pylist()
        for r, (rid, bad) in enumerate(zip(t.column("id").to_pylist(), errors)):
            if bad:
                continue
            if rid in seen:
                plan.duplicates += 1
                continue
            seen.add(rid)
            plan.datasets[str(names[r])] = plan.datasets.get(str(names[r]), 0) + 1
            keep.append(r)
            ordered_ids.append(rid)
        plan.keep.append(np.asarray(keep, dtype=np.int64))
        plan.failed.append(np.flatnonzero(errors))
    if len(fingerprints) > 1:
        raise IndexArtifactError(
            f"the embeddings were made by different encoders ({sorted(fingerprints)}); delete "
            f"{os.path.dirname(files[0])} and run again"
        )
    plan.fingerprint = next(iter(fingerprints), None)
    plan.keys = pa.array(ordered_ids, pa.string())
    return plan
