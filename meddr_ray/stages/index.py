"""The index stage (paper section 3.3): the student's own vision encoder embeds every training image into a
versioned FAISS index; each image is one case whose value holds all of its annotations (diagnosis label, report,
question-answer pairs), so the top five neighbours are five different images, as the paper retrieves them.

``run_index(cfg)``:
1. Ray Data reads ``index.sources`` (any source format) or, when empty, the training rows of the run's
   instruction Parquet (its validation rows are not part of the database). Each row is one annotation of an
   image; its case key is a hash of the dataset and the image bytes (:func:`case_key`), and a distributed
   ``groupby`` merges the annotations of each image into one case (:func:`merge_case`).
2. An actor pool (``index.pool``; the model loaded once per actor) embeds the images -- the vision tower's last
   hidden state, mean-pooled and L2-normalised (the paper names no layer or pooling: this project's choice) --
   and writes ``(values..., embedding)`` Parquet files to a work folder. Only embeddings and text leave the
   actors; images never pass through the driver.
3. The driver reads just the ``id``/``dataset``/``error``/``fingerprint`` columns, sets failed rows aside, and cuts
   the good rows into ``index.num_shards`` contiguous shards (:func:`build_from_embeddings`, the build half, also
   run by ``benchmarks/index_scale.py`` on a folder of embedding files). Ray tasks build one FAISS index per shard
   in parallel, row group by row group (IVF / IVF-PQ: each a copy of one template trained on a sample that is
   read row group by row group), and write it to a file; a last task merges the shard files -- IVF on disk, one
   shard at a time (:func:`meddr_ray.retrieval.store.merge_ivf_on_disk`) -- and publishes a new version
   (:func:`meddr_ray.retrieval.store.publish_staged`: temporary folder, rename, then ``CURRENT``, compare-and-swap
   on the version the build started from, idempotent per build id). HNSW cannot be merged, so it is built in
   that last task from the gathered vectors (refused above ``index.max_in_memory_gb``). The manifest counts the
   cases of each dataset, which retrieval can be scoped to (``rag.same_dataset``, ``rag.datasets``).

``run_index(cfg, add_source=path)`` (``meddr-ray index --add source.yaml``) appends the cases of a source as a
new version: only images whose case key is not in the current version are embedded, and they are added to a copy
of the current index (IVF: with its trained quantizer, no retraining). The parent version stays as it was.

Resume: the embeddings of an interrupted run stay in ``<index_dir>/_work/<key>/`` (the key hashes the sources,
the model and adapter files, and the parent version); a re-run embeds only the rows not there yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from meddr_ray import storage
from meddr_ray.storage import is_uri, join_path
from meddr_ray.stages.registry import StageResult
from meddr_ray.config import (
    Config,
    DataConfig,
    ModelConfig,
    SourceConfig,
)
from meddr_ray.retrieval.store import (  # noqa: F401  (case_key: the stage's own name for it)
    IVF_KINDS,
    PublishConflict,
    QA_TYPE,
    VALUE_COLUMNS,
    case_key,
    IndexArtifactError,
    VALUES_FILE,
    IndexParams,
    current_version,
    effective_nlist,
    ivf_train_size,
    load_manifest,
    resolve_kind,
)

log = logging.getLogger("meddr_ray.stages.index")

# One annotation of an image, as the readers and the instruction mix give it (an image has as many as it has
# tasks and questions): what the grouping step turns into one case per image.
ANNOTATION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),  # the case: one image of one dataset (case_key)
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("source_index", pa.int64()),
        pa.field("modality", pa.string()),
        pa.field("label", pa.string()),  # a diagnosis annotation
        pa.field("report", pa.string()),  # a reference report
        pa.field("bootstrap_report", pa.string()),  # a report written by the teacher (section 3.1)
        pa.field("question", pa.string()),  # a VQA annotation ...
        pa.field("answer", pa.string()),  # ... and its answer
        pa.field("error", pa.string()),
        pa.field("image", pa.binary()),
    ]
)
# One case per image: the rows that go into the encoder (image included); the embedding files it writes hold
# the same columns without the image, plus the embedding.
ROW_COLUMNS = [
    "id", "dataset", "split", "source_file", "source_index", "modality", "label", "report", "qa", "error",
]  # fmt: skip
ROW_SCHEMA = pa.schema(
    [pa.field("id", pa.string()), *[ANNOTATION_SCHEMA.field(c) for c in ROW_COLUMNS[1:-2]]]
    + [pa.field("qa", QA_TYPE), pa.field("error", pa.string())]
    + [pa.field("image", pa.binary())]
)
WORK_DIR = "_work"
# The IVF training sample is drawn from random whole row groups holding this many times its size (see Plan.sample)
SAMPLE_READ_FACTOR = 4
from meddr_ray.layout import FAILED_DIR  # noqa: E402  (named once, in the run layout)


# ---------------------------------------------------------------------------------------------- inputs


def _annotations(d: Dict[str, list], n: int, **columns: list) -> pa.Table:
    """``ANNOTATION_SCHEMA`` rows from pydict columns (``key`` computed from dataset + image + id)."""
    out = {name: columns.get(name, d.get(name, [None] * n)) for name in ANNOTATION_SCHEMA.names if name != "key"}
    ids = columns.pop("sample_id")
    out["key"] = [case_key(ds, img, i) for ds, img, i in zip(out["dataset"], out["image"], ids)]
    return pa.table({c: out[c] for c in ANNOTATION_SCHEMA.names}, schema=ANNOTATION_SCHEMA)


def _sample_rows(batch: pa.Table) -> pa.Table:
    """Sample-schema rows (``meddr_ray.data.schema``) -> annotations."""
    d = batch.to_pydict()
    n = batch.num_rows
    vqa = [t == "vqa" for t in d["task"]]
    return _annotations(
        d, n, sample_id=d["id"],
        label=[lab if t in (None, "diagnosis") else None for lab, t in zip(d["label"], d["task"])],
        question=[q if v else None for q, v in zip(d["question"], vqa)],
        answer=[a if v else None for a, v in zip(d["answer"], vqa)],
    )  # fmt: skip


def _instruct_rows(batch: pa.Table) -> pa.Table:
    """Training rows of the instruction mix (``meddr_ray.stages.instruct.MIX_SCHEMA``) -> annotations. The validation
    rows are not part of the database (the paper builds it on the training set); image descriptions repeat a
    report's findings and add nothing."""
    import pyarrow.compute as pc

    if "split" in batch.column_names:
        batch = batch.filter(pc.equal(batch.column("split"), "train"))
    d = batch.to_pydict()
    n = batch.num_rows

    def col(name):
        return d[name] if name in d else [None] * n

    task, answer = col("task"), col("answer")

    def where(kind):
        return [a if t == kind else None for a, t in zip(answer, task)]

    return _annotations(
        d, n, sample_id=[s or i for s, i in zip(col("source_id"), d["id"])],
        label=[lab if lab is not None else a for lab, a in zip(col("label"), where("diagnosis"))],
        report=where("report"), bootstrap_report=where("guided_report"),
        question=[q if t == "vqa" else None for q, t in zip(col("question"), task)], answer=where("vqa"),
        error=[None] * n,
    )  # fmt: skip


def _first(values: Sequence[Any]) -> Any:
    return next((v for v in values if v is not None and v != ""), None)


def merge_case(group: pa.Table) -> pa.Table:
    """All annotations of one image -> one case row: its diagnosis label (the first, when copies disagree), its
    report (a reference report before a bootstrapped one) and every distinct QA pair, in order."""
    d = group.to_pydict()
    good = [i for i, e in enumerate(d["error"]) if e is None] or list(range(group.num_rows))
    first = good[0]
    qa = list(dict.fromkeys((q, a) for q, a in zip(d["question"], d["answer"]) if q and a))
    row = {c: [d[c][first]] for c in ("dataset", "split", "source_file", "source_index", "modality", "image")}
    row["id"] = [d["key"][first]]
    row["label"] = [_first([d["label"][i] for i in good])]
    row["report"] = [_first([d["report"][i] for i in good]) or _first([d["bootstrap_report"][i] for i in good])]
    row["qa"] = [[{"question": q, "answer": a} for q, a in qa]]
    row["error"] = [None if any(d["error"][i] is None for i in good) else d["error"][first]]
    return pa.table({c: row[c] for c in ROW_SCHEMA.names}, schema=ROW_SCHEMA)


def _one_case_per_image(ds):
    """Group the annotations by case key (a distributed shuffle: no process holds more than its groups)."""
    return ds.groupby("key").map_groups(merge_case, batch_format="pyarrow")


def _read_sources(sources: Sequence[SourceConfig], data_cfg: DataConfig):
    from meddr_ray.data import read_source

    datasets = [read_source(src, data_cfg).map_batches(_sample_rows, batch_format="pyarrow") for src in sources]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _instruct_parquet_files(folder: str) -> List[str]:
    """The instruction Parquet files of the mix published at ``folder`` (:func:`meddr_ray.stages.instruct.published_mix`)."""
    from meddr_ray.stages.instruct import MixNotFoundError, published_mix_files

    try:
        return published_mix_files(folder)
    except MixNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}: run `meddr-ray instruct` first, or list the training images under index.sources"
        ) from None


def _input_dataset(cfg: Config) -> Tuple[Any, List[Dict[str, Any]]]:
    """The annotations to index (one row per annotation; grouped into cases after known cases are dropped)."""
    import ray

    if cfg.index.sources:
        return _read_sources(cfg.index.sources, cfg.data), [asdict(s) for s in cfg.index.sources]
    from meddr_ray.stages.instruct import current_version

    folder = cfg.layout.instruct_dir
    files = _instruct_parquet_files(folder)
    ds = ray.data.read_parquet(files).map_batches(_instruct_rows, batch_format="pyarrow")
    return ds, [{"name": "instruct", "format": "parquet", "path": folder, "splits": ["train"],
                 "version": current_version(folder)}]  # fmt: skip  (version: the mix it was built from)


# ---------------------------------------------------------------------------------------------- encoder


class Encoder:
    """Ray Data actor: loads the student's vision tower once (not the whole model: the key needs only the tower,
    :func:`meddr_ray.model.vision_encoder.load_vision_encoder`), embeds a batch of images, returns values +
    embedding rows."""

    def __init__(self, model_cfg: ModelConfig, adapter_dir: Optional[str], data_cfg: DataConfig):
        from meddr_ray.model.vision_encoder import load_vision_encoder

        self.model = load_vision_encoder(model_cfg, adapter_dir=adapter_dir)
        self.fingerprint = self.model.encoder_fingerprint()
        self.dim = self.model.embed_dim
        self.data_cfg = data_cfg
        from ray.util.metrics import Counter

        # the dashboard's embeddings/s (Prometheus ray_meddr_index_images_embedded_total; docs/operations.md)
        self.metric_tags = {"student": model_cfg.name}
        self.m_embedded = Counter("meddr_index_images_embedded", "Images the encoder embedded", tag_keys=("student",))
        self.m_failed = Counter("meddr_index_rows_failed", "Rows set aside as bad input", tag_keys=("student",))

    def _where(self, row: Dict[str, Any]) -> str:
        src = row.get("source_file") or row.get("dataset") or "?"
        idx = row.get("source_index")
        return f"{os.path.basename(str(src))} row {idx} (case {row['id']})" if idx is not None else f"case {row['id']}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from meddr_ray.data import DataError, decode_image

        rows = batch.select([c for c in ROW_COLUMNS]).to_pylist()
        images = batch.column("image").to_pylist()
        errors = [r["error"] for r in rows]
        decoded, positions = [], []
        for i, (row, data) in enumerate(zip(rows, images)):
            if errors[i] is not None:
                continue  # the reader already set this row aside (on_error=skip)
            try:
                if not data:
                    raise DataError(f"{self._where(row)}: no image to embed")
                decoded.append(
                    decode_image(
                        data,
                        max_bytes=self.data_cfg.max_image_bytes,
                        max_pixels=self.data_cfg.max_image_pixels,
                        where=self._where(row),
                    )
                )
                positions.append(i)
            except DataError as exc:
                if self.data_cfg.on_error == "raise":
                    raise
                errors[i] = str(exc)
        vectors = np.zeros((len(rows), self.dim), dtype=np.float32)
        if decoded:
            vectors[positions] = self.model.embed(decoded)
            self.m_embedded.inc(len(decoded), tags=self.metric_tags)
        failed = sum(e is not None for e in errors)  # by the reader or here: not embedded, written to failed/
        if failed:
            self.m_failed.inc(failed, tags=self.metric_tags)
        valid = np.zeros(len(rows), dtype=bool)
        valid[positions] = True
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1)), self.dim, mask=pa.array(~valid)
        )
        out = {c: batch.column(c) for c in ROW_COLUMNS if c != "error"}
        out["error"] = pa.array(errors, pa.string())
        out["fingerprint"] = pa.array([self.fingerprint] * len(rows), pa.string())
        out["embedding"] = embedding
        return pa.table(out)


def _weights_signature(paths: Sequence[Optional[str]]) -> List[Any]:
    """Names, sizes and times of the model and adapter files: part of the resume key, so embeddings made with
    other weights are never reused (they also carry the encoder fingerprint, checked before the build)."""
    sig: List[Any] = []
    for path in paths:
        if not path or not os.path.isdir(path):
            sig.append([path, None])
            continue
        for name in sorted(os.listdir(path)):
            st = os.stat(os.path.join(path, name))
            sig.append([name, st.st_size, st.st_mtime_ns])
    return sig


def _valid_embedding_files(folder: str) -> List[str]:
    """Complete embedding files of an earlier attempt; a file cut short by a crash is deleted (its rows are
    embedded again)."""
    import pyarrow.parquet as pq

    good = []
    for path in storage.list_files(folder, ".parquet"):
        fs, p = storage.resolve(path)
        try:
            with fs.open_input_file(p) as f:
                pq.read_metadata(f)
            good.append(path)
        except Exception as exc:  # truncated footer, partial write
            log.warning("index: %s is incomplete (%s); its rows will be embedded again", path, exc)
            storage.remove(path)
    return good


def _read_columns(path: str, columns: List[str]) -> pa.Table:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    return pq.read_table(p, columns=columns, filesystem=fs)


_ID_FILTERS: Dict[str, Any] = {}


def _drop_known_ids(batch: pa.Table, ids_ref) -> pa.Table:
    """Keep rows whose case key is not in the (object-store) array of known keys; cached per worker process."""
    import pyarrow.compute as pc
    import ray

    if isinstance(ids_ref, ray.ObjectRef):  # fetched once per worker process, not once per batch
        key = ids_ref.hex()
        if key not in _ID_FILTERS:
            _ID_FILTERS.clear()
            _ID_FILTERS[key] = ray.get(ids_ref)
        known = _ID_FILTERS[key]
    else:
        known = ids_ref
    return batch.filter(pc.invert(pc.is_in(batch.column("key"), value_set=known)))


def _embed(cfg: Config, ds, out_dir: str, adapter: Optional[str], known_ids: pa.Array) -> int:
    """Run the encoder pool over the rows whose case key is not in ``known_ids``; returns how many were skipped."""
    import ray

    from meddr_ray.stages.runtime import map_with_actor_pool

    if len(known_ids):
        ds = ds.map_batches(_drop_known_ids, fn_args=(ray.put(known_ids),), batch_format="pyarrow")
    ds = _one_case_per_image(ds)
    pool = cfg.index.pool
    cpus = ray.cluster_resources().get("CPU", 0)
    if pool.min_actors * pool.num_cpus + 1 > cpus:
        # Ray Data would wait forever: the read and write tasks need a CPU the actors never free
        log.warning(
            "index: the encoder pool reserves %s of the cluster's %s CPUs, leaving none for reading and writing; "
            "raise ray.num_cpus (logical CPUs) or lower index.pool.min_actors / num_cpus",
            pool.min_actors * pool.num_cpus, cpus,
        )  # fmt: skip
    embedded = map_with_actor_pool(ds, Encoder, pool, model_cfg=cfg.student, adapter_dir=adapter, data_cfg=cfg.data)
    embedded.write_parquet(out_dir)
    return len(known_ids)


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class Plan:
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


def make_plan(files: List[str], known_ids: pa.Array) -> Plan:
    """Order the embedded rows (file by file); set aside the ones with errors and skip case keys seen before
    (both counted)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    plan = Plan(files=list(files), keep=[], failed=[])
    seen = set(known_ids.to_pylist()) if len(known_ids) else set()
    fingerprints = set()
    ordered_ids: List[str] = []
    for path in plan.files:
        # the small columns only: the dimension comes from the file's schema, never from reading its vectors
        t = _read_columns(path, ["id", "dataset", "error", "fingerprint"])
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


# ---------------------------------------------------------------------------------- build tasks (Ray)


def _row_groups(path: str, rows: np.ndarray, columns: List[str]):
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

    from meddr_ray.retrieval.store import conform_values

    for path, rows in entries:
        columns = ["embedding"]
        if with_values:  # the value columns the file has (embeddings of an older version lack the image location)
            fs, p = storage.resolve(path)
            columns += [c for c in VALUE_COLUMNS if c in pq.read_schema(p, filesystem=fs).names]
        for t, _ in _row_groups(path, rows, columns):
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


def _threads(n: float) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, int(n)))


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB). Build tasks run one per worker process (``max_calls=1``), so it
    is the task's own peak; it includes pages of memory-mapped files the task touched."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _train_ivf_task(entries, dim: int, params: IndexParams, nlist: int, device: str, cpus: float, out: str):
    """Train the IVF template on the sampled rows only (read row group by row group) and write it to ``out``."""
    from meddr_ray.retrieval import store as fi

    _threads(cpus)
    sample, _ = read_entries(entries, dim, with_values=False)
    fi.save_index(fi.train_ivf(sample, params, nlist, device), out)
    return {"template": out, "peak_rss_mb": peak_rss_mb()}


def _template_from_parent_task(parent: Dict[str, Any], out: str):
    """The trained structure of an IVF parent version, without its vectors, as a template file."""
    from meddr_ray.retrieval import store as fi

    index = fi.open_index_file(_local_index_file(parent))
    fi.save_index(fi.empty_like(index), out)
    return {"template": out, "peak_rss_mb": peak_rss_mb()}


def _local_index_file(manifest: Dict[str, Any]) -> str:
    """A published version's ``index.faiss`` as a path FAISS can read with its on-disk lists beside it."""
    from meddr_ray.retrieval import store as fi

    path = join_path(manifest["path"], fi.INDEX_FILE)
    if is_uri(path) and fi.IVFDATA_FILE in manifest["files"]:
        return fi._fetch_on_disk_version(manifest["path"], manifest["files"])
    return path


def _write_values(parts, path: str) -> int:
    """Stream value tables into one Parquet file (a temporary name, then renamed: a retried task never leaves
    half a file); returns the rows written."""
    import pyarrow.parquet as pq

    from meddr_ray.retrieval.store import VALUES_SCHEMA

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


def _shard_task(entries, dim: int, params: IndexParams, template: Optional[str], cpus: float, out: str):
    """Build one shard's index row group by row group and write it and its values to ``out`` + ``.faiss`` /
    ``.values.parquet``; returns their paths (never the index itself: it does not travel through the object
    store), its count and, for IVF, its list sizes (what the merge pre-sizes the on-disk lists with)."""
    from meddr_ray.retrieval import store as fi

    _threads(cpus)
    if params.kind in fi.IVF_KINDS:
        if template is None:
            raise ValueError("an IVF shard needs the trained template")
        index = fi.read_index_file(template)
    else:
        index = fi.new_flat(dim)

    def values():
        for x, v in iter_entries(entries, dim):
            index.add(fi.check_vectors(x, dim))
            yield v

    rows = _write_values(values(), out + ".values.parquet")
    fi.save_index(index, out + ".faiss")
    return {
        "index": out + ".faiss",
        "values": out + ".values.parquet",
        "count": rows,
        "sizes": fi.ivf_list_sizes(index) if params.kind in fi.IVF_KINDS else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def _read_value_files(paths: Sequence[str]):
    """The value rows of shard / version files, one row group at a time."""
    import pyarrow.parquet as pq

    from meddr_ray.retrieval.store import conform_values

    for path in paths:
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.metadata.num_row_groups):
                yield conform_values(pf.read_row_group(g))


def _merge_publish_task(
    index_dir: str, manifest: dict, extra: dict, cpus: float, kind: str, template: Optional[str],
    sources: List[Dict[str, Any]], parent: Optional[str], build_id: str,
):  # fmt: skip
    """Merge shard (and parent version) files into a new version and publish it. ``sources``: paths and list
    sizes, never index bytes. IVF: the lists are copied one shard at a time into an on-disk ``index.ivfdata``
    (the task holds one shard); flat: the shards are concatenated in memory (bounded by
    ``index.max_in_memory_gb``)."""
    from meddr_ray.retrieval import store as fi

    _threads(cpus)
    done = fi.find_build(index_dir, build_id)  # a retry of a merge that already published
    if done is not None:
        return done
    for source in sources:  # the parent version of an add: its index file, fetched here if it is remote
        if "parent" in source:
            source["index"], source["sizes"] = _local_index_file(source.pop("parent")), None
    stage = fi.new_stage(index_dir)
    try:
        if kind in fi.IVF_KINDS:
            info = fi.merge_ivf_on_disk(
                fi.read_index_file(template), [s["index"] for s in sources], stage, [s["sizes"] for s in sources]
            )
        else:
            index = fi.merge_flat_files([s["index"] for s in sources])
            fi.save_index(index, os.path.join(stage, fi.INDEX_FILE))
            info = fi.describe(index)
            del index
        _write_values(_read_value_files([s["values"] for s in sources]), os.path.join(stage, fi.VALUES_FILE))
    except BaseException:
        storage.remove(stage)
        raise
    summary = dict(manifest.get("summary", {}))
    peaks = dict(summary.get("task_peak_rss_mb", {}), merge=peak_rss_mb())
    manifest = dict(manifest, summary=dict(summary, task_peak_rss_mb=peaks))
    return fi.publish_staged(index_dir, stage, info, manifest, extra, parent=parent, build_id=build_id)


def _hnsw_publish_task(index_dir: str, manifest: dict, extra: dict, entries, dim: int, params, cpus: float,
                       parent: Optional[str], build_id: str):  # fmt: skip
    from meddr_ray.retrieval import store as fi

    _threads(cpus)
    vectors, values = read_entries(entries, dim)
    index = fi.build_hnsw(vectors, params)
    return fi.publish(index_dir, index, values, manifest, extra, parent=parent, build_id=build_id)


def _add_publish_task(index_dir: str, parent: str, manifest: dict, extra: dict, entries, dim: int, cpus: float,
                      build_id: str):  # fmt: skip
    """Flat / HNSW parents (in memory anyway): load the parent version, add the new vectors, publish."""
    from meddr_ray.retrieval import store as fi

    _threads(cpus)
    base = fi.load_index(index_dir, expect_dim=dim, expect_fingerprint=manifest["encoder_fingerprint"], version=parent)
    vectors, values = read_entries(entries, dim)
    base.index.add(fi.check_vectors(vectors, dim))
    merged = pa.concat_tables([fi.conform_values(base.values), fi.conform_values(values)])
    return fi.publish(index_dir, base.index, merged, manifest, extra, parent=parent, build_id=build_id)


# ----------------------------------------------------------------------------------------------- stage


@dataclass
class _Run:
    index_dir: str
    mode: str  # build | add
    sources: List[Dict[str, Any]]
    parent: Optional[Dict[str, Any]] = None  # manifest of the version added to
    known_ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))


def _work_key(cfg: Config, run: _Run, adapter: Optional[str]) -> str:
    blob = json.dumps(
        {
            "mode": run.mode,
            "sources": run.sources,
            "parent": run.parent["version"] if run.parent else None,
            "model": [cfg.student.name, cfg.student.path, adapter],
            "weights": _weights_signature([cfg.student.path, adapter]),
            "data": asdict(cfg.data),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_failed(run: _Run, plan: Plan, version: str) -> Optional[str]:
    """Rows set aside (unreadable images, ...) with their errors: ``<index_dir>/failed/<version>.parquet``."""
    if not plan.failed_count:
        return None
    columns = [c for c in ROW_COLUMNS]
    parts = [_read_columns(p, columns).take(pa.array(rows)) for p, rows in zip(plan.files, plan.failed) if len(rows)]
    path = join_path(run.index_dir, FAILED_DIR, f"{version}.parquet")
    import pyarrow.parquet as pq

    storage.makedirs(join_path(run.index_dir, FAILED_DIR))
    fs, p = storage.resolve(path)
    pq.write_table(pa.concat_tables(parts), p, filesystem=fs)
    return path


def _remove_work(work: str) -> None:
    """The embeddings are in the published index now; drop them (and ``_work/`` once empty)."""
    storage.remove(work)
    parent = os.path.dirname(work)
    if not is_uri(work) and os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)


def _gpu_for_tasks(cfg: Config) -> float:
    """One GPU for the IVF training task when asked for and the cluster has one (else it would never run)."""
    import ray

    if cfg.index.device != "gpu":
        return 0
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return 1
    log.warning("index.device=gpu but the Ray cluster has no GPU: FAISS runs on the CPU")
    return 0


def run_index(cfg: Config) -> StageResult:
    """Build (or, with ``add_source`` / ``index.add_sources``, extend) the retrieval index; returns the path of
    the published version. Prints count, dimension, type and version."""
    from meddr_ray.model import default_adapter, ensure_model
    from meddr_ray.stages.runtime import init_ray

    init_ray(cfg)
    index_dir = cfg.layout.index_dir
    adapter = default_adapter(cfg.layout.adapter_dir)
    log.info("index: encoder %s (%s)%s", cfg.student.name, cfg.student.path, f" + adapter {adapter}" if adapter else "")
    if cfg.student.build:
        ensure_model(cfg.student)  # build the offline model once here, not in every actor

    add_sources = list(cfg.index.add_sources)  # checked and made absolute by load_config
    if add_sources:
        parent = load_manifest(index_dir)
        known = _read_columns(join_path(parent["path"], VALUES_FILE), ["id"]).column("id").combine_chunks()
        run = _Run(index_dir, "add", [asdict(s) for s in add_sources], parent, known)
        ds = _read_sources(add_sources, cfg.data)
        names = [s.name for s in add_sources]
        log.info("index: adding %s to version %s (%d cases)", names, parent["version"], parent["count"])
    else:
        ds, sources = _input_dataset(cfg)
        run = _Run(index_dir, "build", sources)

    # ------------------------------------------------------------------ 1-2: embed (resuming earlier attempts)
    work = join_path(index_dir, WORK_DIR, _work_key(cfg, run, adapter))
    emb_dir = join_path(work, "embeddings")
    t0 = time.time()
    done = _valid_embedding_files(emb_dir)
    done_ids = (
        pa.concat_arrays([_read_columns(p, ["id"]).column("id").combine_chunks() for p in done])
        if done
        else pa.array([], pa.string())
    )
    if len(done_ids):
        log.info("index: resuming, %d rows already embedded in %s", len(done_ids), emb_dir)
    skip = pa.concat_arrays([run.known_ids.cast(pa.string()), done_ids.cast(pa.string())])
    _embed(cfg, ds, emb_dir, adapter, skip)
    embed_s = time.time() - t0

    # ------------------------------------------------------------------ 3: plan, shard, build, merge, publish
    build_id, expected = _build_identity(work, run, index_dir)
    try:
        published, plan = build_from_embeddings(
            cfg, _valid_embedding_files(emb_dir), run, join_path(work, "shards"), build_id, expected,
            adapter=adapter, embed_s=embed_s,
        )  # fmt: skip
    except PublishConflict:
        storage.remove(join_path(work, BUILD_FILE))  # the next run builds on the version CURRENT names then
        raise
    if published is None:  # an add with nothing new
        _remove_work(work)
        return StageResult(run.parent["path"], {"added": 0, "failed": plan.failed_count}, (
            f"index: nothing new to add (every case is already in version {run.parent['version']}"
            + (f"; {plan.failed_count} failed" if plan.failed_count else "")
            + f"); version {run.parent['version']} stays current"
        ))
    failed_path = _write_failed(run, plan, published["version"])
    _remove_work(work)
    build_s = published.get("summary", {}).get("build_seconds", 0.0)
    headline = (
        f"index: {published['count']} vectors, dimension {published['dim']}, {published['faiss_type']} "
        f"({published['index_type']}), version {published['version']}"
        + (f" (parent {run.parent['version']}, +{plan.count})" if run.parent else "")
        + f" -> {published['path']}  [embed {embed_s:.1f} s, build {build_s:.1f} s"
        + (f", {plan.failed_count} failed -> {failed_path}" if failed_path else "")
        + "]"
    )
    return StageResult(published["path"], published.get("summary", {}), headline)


BUILD_FILE = "build.json"


def _build_identity(work: str, run: _Run, index_dir: str) -> Tuple[str, Optional[str]]:
    """``(build id, the version CURRENT named when this build began)``, kept in the work folder so that a re-run
    after a crash between publishing and cleaning up returns the version already published (same build id) and
    a build never publishes over a version it did not see (compare-and-swap on that parent)."""
    path = join_path(work, BUILD_FILE)
    if storage.exists(path):
        saved = json.loads(storage.read_text(path))
        return saved["build_id"], saved["parent"]
    parent = run.parent["version"] if run.parent else current_version(index_dir)
    build_id = uuid.uuid4().hex
    storage.write_text(path, json.dumps({"build_id": build_id, "parent": parent}) + "\n")
    return build_id, parent


def build_from_embeddings(
    cfg: Config,
    files: List[str],
    run: _Run,
    scratch: str,
    build_id: str,
    expected_parent: Optional[str],
    adapter: Optional[str] = None,
    embed_s: float = 0.0,
) -> Tuple[Optional[Dict[str, Any]], Plan]:
    """The build half of the index job, on a folder of embedding files (``(values..., fingerprint, embedding)``
    Parquet, as the encoder pool writes them): plan, train (IVF), build shards, merge, publish. Returns the
    published manifest (None: an add with nothing new) and the plan. Every shard task writes its index and
    values under ``scratch``; the merge reads those files one shard at a time. ``expected_parent``: the version
    ``CURRENT`` must still name when publishing (compare-and-swap); ``build_id``: a retried publish returns the
    version the first attempt made. Also used by ``benchmarks/index_scale.py``."""
    import ray

    from meddr_ray.retrieval import store as fi

    index_dir = run.index_dir
    already = fi.find_build(index_dir, build_id)
    plan = make_plan(files, run.known_ids)
    if already is not None:  # published before a crash; nothing to build again
        return already, plan
    if plan.failed_count:
        log.warning(
            "index: %d rows could not be embedded; they are listed in %s/",
            plan.failed_count, join_path(index_dir, FAILED_DIR),
        )  # fmt: skip
    if plan.duplicates:
        log.warning("index: %d images repeat a case already indexed; each image is indexed once", plan.duplicates)
    if run.mode == "add" and plan.count == 0:
        return None, plan
    if plan.count == 0:
        raise ValueError(
            f"index: no rows to index ({plan.failed_count} failed, listed under {join_path(index_dir, FAILED_DIR)})"
        )
    if run.parent and plan.fingerprint != run.parent["encoder_fingerprint"]:
        raise IndexArtifactError(
            f"cannot add to version {run.parent['version']}: it was built with encoder "
            f"{run.parent['encoder_fingerprint']} but the current encoder is {plan.fingerprint}; rebuild the index "
            f"with `meddr-ray index`"
        )

    total = plan.count + (run.parent["count"] if run.parent else 0)
    if run.parent:
        kind = run.parent["index_type"]  # an add keeps the parent's structure; a rebuild changes it
    else:
        kind = resolve_kind(cfg.index.type, total, cfg.index.auto_ivf_threshold)
    fi.check_in_memory(kind, total, plan.dim, cfg.index.max_in_memory_gb)
    params = IndexParams.from_config(cfg.index, kind)
    if run.parent:
        params = IndexParams(**{**asdict(params), **run.parent.get("params", {})})
    manifest = {
        "encoder_fingerprint": plan.fingerprint,
        "model_name": cfg.student.name,
        "model_path": cfg.student.path,
        "adapter_dir": adapter,
        "parent_version": run.parent["version"] if run.parent else None,
        "replaces": expected_parent if not run.parent else None,
        "sources": [{k: s.get(k) for k in ("name", "format", "path", "splits")} for s in run.sources],
        "config_fingerprint": cfg.fingerprint(),
    }
    extra = {"config.yaml": cfg.to_yaml()}
    cpus = cfg.index.build_cpus
    # one task per worker process (max_calls=1): its memory is returned when it ends, and its peak is its own
    task = ray.remote(num_cpus=cpus, max_retries=2, max_calls=1)
    gpus = _gpu_for_tasks(cfg)
    t1 = time.time()
    datasets = dict(run.parent.get("summary", {}).get("datasets", {})) if run.parent else {}
    for name, n in plan.datasets.items():
        datasets[name] = datasets.get(name, 0) + n
    summary: Dict[str, Any] = {
        "datasets": datasets,  # cases (images) per dataset: what retrieval can be scoped to
        "added": plan.count,
        "failed": plan.failed_count,
        "duplicates": plan.duplicates,
        "faiss_device": "gpu" if gpus and kind in IVF_KINDS and not run.parent else "cpu",  # IVF training only
        "embed_seconds": round(embed_s, 2),
    }
    storage.makedirs(scratch)

    def finish_manifest(**more):
        return dict(manifest, params=params.as_dict(), summary=dict(summary, **more))

    if run.parent and kind not in IVF_KINDS:
        ref = task(_add_publish_task).remote(
            index_dir, run.parent["version"], finish_manifest(shards=1), extra, plan.everything(), plan.dim, cpus,
            build_id,
        )  # fmt: skip
    elif kind == "hnsw":
        ref = task(_hnsw_publish_task).remote(
            index_dir, finish_manifest(shards=1), extra, plan.everything(), plan.dim, params, cpus,
            expected_parent, build_id,
        )  # fmt: skip
    else:
        shards = plan.shards(cfg.index.num_shards)
        template, peaks = None, {}
        if kind in IVF_KINDS and run.parent:
            log.info("index: adding to the trained %s structure of version %s", kind, run.parent["version"])
            trained = ray.get(task(_template_from_parent_task).remote(run.parent, join_path(scratch, "template.faiss")))
            template, peaks["template"] = trained["template"], trained["peak_rss_mb"]
        elif kind in IVF_KINDS:
            params.nlist = effective_nlist(cfg.index.nlist, plan.count)
            size = ivf_train_size(params.nlist, plan.count, cfg.index.train_size)
            log.info("index: training the %s template (nlist=%d) on %d sampled vectors", kind, params.nlist, size)
            trained = ray.get(
                ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2, max_calls=1)(_train_ivf_task).remote(
                    plan.sample(size, cfg.seed), plan.dim, params, params.nlist, cfg.index.device, cpus,
                    join_path(scratch, "template.faiss"),
                )  # fmt: skip
            )
            template, peaks["train"] = trained["template"], trained["peak_rss_mb"]
        log.info("index: building %d %s shards of %d vectors in parallel", len(shards), kind, plan.count)
        built = ray.get(
            [
                task(_shard_task).remote(entries, plan.dim, params, template, cpus, join_path(scratch, f"shard-{i:05d}"))
                for i, entries in enumerate(shards)
            ]
        )
        sources = list(built)
        if run.parent:  # the parent version's lists come first: its FAISS ids stay what they were
            sources.insert(0, {"parent": run.parent, "values": join_path(run.parent["path"], VALUES_FILE)})
        peaks["shards"] = [b["peak_rss_mb"] for b in built]
        ref = task(_merge_publish_task).remote(
            index_dir, finish_manifest(shards=len(shards), task_peak_rss_mb=peaks), extra, cpus, kind, template,
            sources, run.parent["version"] if run.parent else expected_parent, build_id,
        )  # fmt: skip
    published = ray.get(ref)
    published.setdefault("summary", {})["build_seconds"] = round(time.time() - t1, 2)
    storage.remove(scratch)
    return published, plan

