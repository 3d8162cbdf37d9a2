"""What a training run reads, checked on the driver before any Ray work: the published instruction mix, its
columns and rows per split, the retrieval index for ``train.rag_context_fraction``; and the Ray datasets the
workers train on."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from meddr_ray import storage
from meddr_ray.config import Config, ConfigError
from meddr_ray.stages.instruct import MixNotFoundError, PublishedMix, published_mix

INSTRUCT_COLUMNS = ["id", "image", "prompt", "answer", "split"]


class TrainDataError(FileNotFoundError):
    """The instruction data is missing or unusable; the message names the folder."""


def instruction_mix(cfg: Config) -> PublishedMix:
    """The published instruction mix the run trains on (:func:`meddr_ray.stages.instruct.published_mix`)."""
    try:
        return published_mix(cfg.layout.instruct_dir)
    except MixNotFoundError as exc:
        raise TrainDataError(
            f"no instruction data: {exc}. Run `meddr-ray instruct --config {cfg.preset}` first (or point "
            "instruct.output_dir at the folder)"
        ) from None


def instruction_files(cfg: Config) -> List[str]:
    return instruction_mix(cfg).files


def split_counts(mix: PublishedMix) -> Dict[str, int]:
    """Rows per split: from the mix's manifest, or (a plain folder of Parquet files) from the ``split`` column
    alone, one file at a time (the driver never reads the images)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if mix.rows:
        return dict(mix.rows)
    counts: Dict[str, int] = {}
    for path in mix.files:
        fs, p = storage.resolve(path)
        table = pq.read_table(p, columns=["split"], filesystem=fs)
        for item in pc.value_counts(table.column("split")).to_pylist():
            key = item["values"] if item["values"] is not None else "null"
            counts[key] = counts.get(key, 0) + int(item["counts"])
    return counts


def check_columns(files: List[str]) -> None:
    import pyarrow.parquet as pq

    for path in files:
        fs, p = storage.resolve(path)
        names = set(pq.read_schema(fs.open_input_file(p)).names)
        missing = [c for c in INSTRUCT_COLUMNS if c not in names]
        if missing:
            raise TrainDataError(f"{path}: instruction Parquet lacks column(s) {missing} (has {sorted(names)})")


CONTEXT_COLUMNS = ["task", "dataset", "source_id"]  # what train.rag_context_fraction needs besides


def retrieval_context(cfg: Config) -> Optional[Dict[str, Any]]:
    """Arguments of :class:`meddr_ray.retrieval.rag.TrainingContext` for ``train.rag_context_fraction`` (None when 0): the
    run's index, its version pinned, checked to be the student's."""
    from meddr_ray.retrieval.store import published_manifest

    if not cfg.train.rag_context_fraction:
        return None
    index_dir = cfg.layout.index_dir
    manifest = published_manifest(index_dir, f"train (train.rag_context_fraction={cfg.train.rag_context_fraction})",
                                  " (the pipeline builds it before training then)")  # fmt: skip
    if manifest.get("model_path") != cfg.student.path:
        raise ConfigError(
            f"key 'train.rag_context_fraction': index version {manifest['version']} at {index_dir} was built with "
            f"the vision encoder of {manifest.get('model_path')}, not of the student {cfg.student.path}: rebuild "
            "it with `meddr-ray index`"
        )
    return {"index_dir": index_dir, "version": manifest["version"], "rag": cfg.rag,
            "fraction": cfg.train.rag_context_fraction}  # fmt: skip


def training_datasets(files: List[str], counts: Dict[str, int], cache_data: bool,
                      context: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The Ray datasets the workers train on: ``train`` (with retrieved labels in some prompts when ``context``)
    and ``val`` when the mix has a validation split."""
    import ray.data
    from ray.data.expressions import col

    from meddr_ray.config import ActorPoolConfig
    from meddr_ray.retrieval.rag import TrainingContext
    from meddr_ray.stages.runtime import map_with_actor_pool

    ds = ray.data.read_parquet(files, columns=INSTRUCT_COLUMNS + (CONTEXT_COLUMNS if context else []))
    train = ds.filter(expr=col("split") == "train")
    if context:  # one actor holds the index; the prompts of the picked diagnosis rows get retrieved labels
        pool = ActorPoolConfig(min_actors=1, max_actors=1, batch_size=256, num_cpus=0.5)
        train = map_with_actor_pool(train, TrainingContext, pool, **context).drop_columns(CONTEXT_COLUMNS)
        ds = ds.drop_columns(CONTEXT_COLUMNS)
    out = {"train": train.drop_columns(["split"])}
    if counts.get("val", 0):
        out["val"] = ds.filter(expr=col("split") == "val").drop_columns(["split"])
    for name, split in out.items():
        if cache_data:  # read once; every epoch and validation pass then iterates blocks already in memory
            split = out[name] = split.materialize()
        split.context.enable_progress_bars = False  # one bar per epoch and per evaluation would flood the log
    return out
