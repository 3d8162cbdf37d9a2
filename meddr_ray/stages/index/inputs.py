"""The index stage's inputs: the annotations to index, one row per annotation of an image (from
``index.sources`` in any source format, or the training rows of the run's instruction mix), and the grouping of
the annotations of each image into one case (:func:`merge_case`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Sequence, Tuple

import pyarrow as pa

from meddr_ray.config import Config, DataConfig, SourceConfig
from meddr_ray.retrieval.format import QA_TYPE, case_key

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

    def answers_of(kind):  # the answer column, on the rows of one task only
        return [a if t == kind else None for a, t in zip(answer, task)]

    return _annotations(
        d, n, sample_id=[s or i for s, i in zip(col("source_id"), d["id"])],
        label=[lab if lab is not None else a for lab, a in zip(col("label"), answers_of("diagnosis"))],
        report=answers_of("report"), bootstrap_report=answers_of("guided_report"),
        question=[q if t == "vqa" else None for q, t in zip(col("question"), task)], answer=answers_of("vqa"),
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


def one_case_per_image(ds):
    """Group the annotations by case key (a distributed shuffle: no process holds more than its groups)."""
    return ds.groupby("key").map_groups(merge_case, batch_format="pyarrow")


def read_sources(sources: Sequence[SourceConfig], data_cfg: DataConfig):
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


def input_dataset(cfg: Config) -> Tuple[Any, List[Dict[str, Any]]]:
    """The annotations to index (one row per annotation; grouped into cases after known cases are dropped)."""
    import ray

    if cfg.index.sources:
        return read_sources(cfg.index.sources, cfg.data), [asdict(s) for s in cfg.index.sources]
    from meddr_ray.stages.instruct import current_version

    folder = cfg.layout.instruct_dir
    files = _instruct_parquet_files(folder)
    ds = ray.data.read_parquet(files).map_batches(_instruct_rows, batch_format="pyarrow")
    return ds, [{"name": "instruct", "format": "parquet", "path": folder, "splits": ["train"],
                 "version": current_version(folder)}]  # fmt: skip  (version: the mix it was built from)
