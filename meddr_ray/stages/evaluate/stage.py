"""The evaluation job (paper Table 4): the student without retrieval, with retrieval, and voting, on test splits.

``run_evaluate(cfg)`` reads every ``evaluate.sources`` entry (any task) into the sample schema, and a pool of
student actors (``map_batches`` with a callable class, ``ActorPoolStrategy``; each loads the student with the
run's adapter and the run's index once) answers every row:

1. the query images of a batch go through the vision tower ONCE (``encode_images``): the pooled keys find the
   neighbours in the index (paper section 3.3), and the same features feed both generations;
2. ``no_rag``: the task's instruction alone; ``rag``: with the retrieved context (:func:`meddr_ray.retrieval.rag.rag_prompt`:
   the labels of the top-5 images for diagnosis, the most similar image's QA pairs for VQA, its report for
   report generation), searched in the query's scope (``rag.same_dataset``: its own dataset, as section 4.5);
3. ``voting``: the retrieved cases alone, from the same neighbours (:func:`meddr_ray.retrieval.rag.vote` for diagnosis; the
   top-1 retrieved report as the prediction for report generation; VQA has no voting row);
4. each answer is mapped / scored per row (:mod:`meddr_ray.stages.evaluate.scoring`, MultiMedEval's definitions).

Exactly once, resumable, as bootstrap: each actor call writes its rows (one per sample and mode) to one Parquet
file, atomically, named by a hash of the batch's ids; a re-run skips the ids already written (before decoding
their images) and the ids set aside before. Predictions made with another student, adapter, index version or
settings (``run_key``) are never mixed with new ones (``evaluate.on_change``).

Layout of the evaluation folder (``cfg.layout.evaluate_dir``: ``evaluate.output_dir``, default ``<run_dir>/eval``):
- ``predictions/part-<hash>.parquet``: :data:`PREDICTION_SCHEMA`;
- ``failed/part-<hash>.parquet``: rows that could not be used, with their error;
- ``metrics.json``, ``report.md``, ``*.png`` (:mod:`meddr_ray.stages.evaluate.report`); ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meddr_ray import storage
from meddr_ray.config import Config, ConfigError, save_config, validate
from meddr_ray.progress import report
from meddr_ray.data import DataError, decode_image, read_source
from meddr_ray.data.common import default_task
from meddr_ray.data.errors import sample_where
from meddr_ray.layout import ADAPTER_META_FILE
from meddr_ray.retrieval.rag import Retriever, distinct_images, rag_prompt, scope_for, top_k_for, vote, vote_report
from meddr_ray.retrieval.store import published_manifest
from meddr_ray.stages.evaluate import report as evaluation_report
from meddr_ray.stages.evaluate import scoring
from meddr_ray.stages.evaluate.schema import PREDICTION_SCHEMA
from meddr_ray.stages.parts import (
    FAILED_SCHEMA,
    batch_seed,
    failed_row,
    part_files,
    remove_stale_temps,
    sum_stats,
    write_table,
)
from meddr_ray.stages.registry import StageResult
from meddr_ray.stages.runtime import init_ray, map_with_actor_pool
from meddr_ray.storage import join_path, run_lock

log = logging.getLogger("meddr_ray.stages.evaluate")

_STAT_KEYS = ("rows_in", "written", "skipped", "skipped_failed", "failed", "tokens")


class EvalArtifactError(ValueError):
    """A file in the evaluation folder that this stage cannot have written (unreadable, or another schema)."""


def needs_index(modes: Sequence[str]) -> bool:
    return "rag" in modes or "voting" in modes


def generation_for(cfg: Config, task: str):
    gen = cfg.evaluate.generation
    return dataclasses.replace(gen, max_new_tokens=cfg.evaluate.task_max_new_tokens.get(task, gen.max_new_tokens))


# ------------------------------------------------------------------------------------------- the actor


class StudentEvaluator:
    """Ray Data callable class: the student (+ adapter) and the index, loaded once per actor.

    Each call takes a batch of samples, skips ids already written or set aside before (before decoding any
    image), sets aside bad rows, answers the rest in every mode, writes the prediction rows to one file and
    returns one row of counts.
    """

    def __init__(self, *, cfg: Config, adapter: Optional[str], index_version: Optional[str], skip_ref: List[Any],
                 run_key: str):  # fmt: skip
        import ray

        from meddr_ray.model import load_model

        done, failed = ray.get(skip_ref[0])  # wrapped in a list so Ray hands the ref over unresolved
        # Sets built once per actor: a batch's skip check then costs its own size, not that of every id written
        # before (pc.is_in rebuilds its hash table from the whole value set on every call).
        self.done, self.failed_before = frozenset(done.to_pylist()), frozenset(failed.to_pylist())
        self.cfg = cfg
        self.modes = list(cfg.evaluate.modes)
        self.model = load_model(cfg.student, adapter)
        self.retriever = Retriever.from_config(cfg, self.model, version=index_version) if index_version else None
        self.failed_dir = cfg.layout.failed_dir("evaluate")
        self.pred_dir = cfg.layout.predictions_dir
        self.run_key = run_key
        self.limits = dict(max_bytes=cfg.data.max_image_bytes, max_pixels=cfg.data.max_image_pixels)
        from ray.util.metrics import Counter

        self.tags = {"student": cfg.student.name}
        keys = tuple(self.tags)
        self.m_answered = Counter("meddr_evaluate_rows_answered", "Test rows answered in every mode", tag_keys=keys)
        self.m_failed = Counter("meddr_evaluate_rows_failed", "Test rows set aside as bad input", tag_keys=keys)
        self.m_tokens = Counter("meddr_evaluate_tokens_generated", "Tokens the student generated", tag_keys=keys)

    # ---------------------------------------------------------------------------------------- inputs

    def _todo(self, batch: pa.Table) -> Tuple[pa.Table, int, int]:
        """The rows not written and not set aside before; and how many of each were skipped."""
        ids = batch.column("id").to_pylist()
        done = [i in self.done for i in ids]
        failed = [not d and i in self.failed_before for i, d in zip(ids, done)]
        keep = pa.array([not (d or f) for d, f in zip(done, failed)], pa.bool_())
        return batch.filter(keep), sum(done), sum(failed)

    def _decode(self, row: Dict[str, Any]):
        """The sample's image as RGB, or the error that sets the row aside (raised with ``on_error=raise``)."""
        where = sample_where(row)
        if row.get("error"):
            return None, row["error"]  # the reader set it aside (on_error=skip)
        try:
            if not row.get("image"):
                raise DataError(f"{where}: no image (id {row['id']})")
            return decode_image(row["image"], where=where, **self.limits), None
        except DataError as exc:
            if self.cfg.data.on_error == "raise":
                raise
            return None, str(exc)

    def _unscorable(self, row: Dict[str, Any]) -> Optional[str]:
        """Why a row cannot be asked or scored (no options or no reference), or None; raised with on_error=raise."""
        task = row.get("task") or "diagnosis"
        labelled = bool(row.get("label_set") and (row.get("label") or row.get("labels")))
        has = {
            "diagnosis": ("label and label set", labelled),
            "vqa": ("question and answer", bool(row.get("question") and row.get("answer") is not None)),
            "report": ("reference report", bool(row.get("report"))),
        }
        what, ok = has.get(task, (f"known task (not {task!r})", False))
        if ok:
            return None
        message = f"{sample_where(row)}: no {what} to evaluate (id {row['id']})"
        if self.cfg.data.on_error == "raise":
            raise DataError(message)
        return message

    # ---------------------------------------------------------------------------------------- answers

    def _neighbours(self, keys: np.ndarray, tasks: Sequence[str], datasets: Sequence[Optional[str]]):
        """Each query's retrieved images, searched in its scope (``rag.same_dataset`` / ``rag.datasets``): enough
        for its prompt and vote (``rag.top_k_*``) and for the figure."""
        top_k = [top_k_for(t, self.cfg.rag) for t in tasks]
        if self.retriever is None:
            return [[] for _ in tasks], top_k
        k = max(top_k + [self.cfg.evaluate.figure_top_k])
        scopes: Dict[Optional[Tuple[str, ...]], List[int]] = {}
        for i, name in enumerate(datasets):
            scope = scope_for(self.cfg.rag, name)
            scopes.setdefault(tuple(scope) if scope else None, []).append(i)
        found: List[Any] = [None] * len(tasks)
        for scope, rows in scopes.items():
            for i, hits in zip(rows, self.retriever.search(keys[rows], k, list(scope) if scope else None)):
                found[i] = hits
        return found, top_k

    def _prompt(self, row: Dict[str, Any], options: List[str], neighbours) -> str:
        return rag_prompt(
            row["task"], neighbours, self.cfg.rag, modality=row.get("modality"), options=options,
            question=row.get("question"),
        )  # fmt: skip

    def _generate(self, encoding, jobs: List[Tuple[int, str, str]], seed: Optional[int]) -> Dict[Tuple[int, str], dict]:
        """Answers of ``jobs`` ``(row position, mode, prompt)``: one batched ``generate`` per task (each task has
        its own token budget), the images given as their encoding, so the vision tower does not run again."""
        out: Dict[Tuple[int, str], dict] = {}
        by_task: Dict[str, List[Tuple[int, str, str, str]]] = {}
        for pos, mode, prompt, task in jobs:
            by_task.setdefault(task, []).append((pos, mode, prompt, task))
        for task, items in by_task.items():
            gen = generation_for(self.cfg, task)
            if gen.do_sample and seed is not None:
                import torch

                torch.manual_seed(seed)
            answers = self.model.generate(
                None, [p for _, _, p, _ in items], gen, encoding=encoding.select([pos for pos, *_ in items])
            )
            for (pos, mode, _, _), answer in zip(items, answers):
                out[(pos, mode)] = answer
        return out

    def _usable(self, todo: pa.Table) -> Tuple[List[Dict[str, Any]], List[Any], List[Dict[str, Any]]]:
        """The rows that can be asked and scored with their decoded images; and the failed rows of the rest."""
        rows, images, bad = [], [], []
        for row in todo.to_pylist():
            image, error = self._decode(row)
            if error is None:
                error = self._unscorable(row)
            if error is not None:
                bad.append(failed_row(row, error))
            else:
                rows.append(row)
                images.append(image)
        return rows, images, bad

    def _generated(self, rows, tasks, options, neighbours, encoding) -> Tuple[Dict[Tuple[int, str], dict],
                                                                              Dict[Tuple[int, str], str]]:  # fmt: skip
        """The student's answers and the prompts it saw, by ``(row position, mode)``, for the generated modes."""
        jobs, prompts = [], {}
        for i, (row, task) in enumerate(zip(rows, tasks)):
            for mode in scoring.modes_for(task, self.modes):
                if mode in scoring.GENERATED_MODES:
                    used = neighbours[i] if mode == "rag" else None  # rag_context takes the top k
                    prompts[(i, mode)] = self._prompt(row, options[i], used)
                    jobs.append((i, mode, prompts[(i, mode)], task))
        seed = batch_seed(self.cfg.seed, [r["id"] for r in rows])
        return (self._generate(encoding, jobs, seed) if jobs else {}), prompts

    @staticmethod
    def _voted(task: str, neighbours, top_k: int) -> dict:
        """The retrieved cases' answer: the top-k labelled images' majority; for reports the top-1 report."""
        labelled = [n for n in distinct_images(neighbours) if n.label][:top_k]
        return {"text": vote(labelled) if task == "diagnosis" else vote_report(neighbours), "tokens": 0}

    def _answer(self, rows: List[Dict[str, Any]], images: List[Any]) -> List[Dict[str, Any]]:
        """Prediction rows of ``rows``, one per row and mode; the images go through the vision tower once."""
        tasks = [r.get("task") or "diagnosis" for r in rows]
        encoding = self.model.encode_images(images)
        neighbours, top_k = self._neighbours(encoding.keys, tasks, [r.get("dataset") for r in rows])
        options = [scoring.diagnosis_options(r.get("dataset"), r.get("label_set")) if t == "diagnosis" else []
                   for r, t in zip(rows, tasks)]  # fmt: skip
        answers, prompts = self._generated(rows, tasks, options, neighbours, encoding)
        out_rows = []
        for i, (row, task) in enumerate(zip(rows, tasks)):
            for mode in scoring.modes_for(task, self.modes):
                answer = self._voted(task, neighbours[i], top_k[i]) if mode == "voting" else answers[(i, mode)]
                out_rows.append(self._row(row, task, mode, options[i], prompts.get((i, mode)), answer,
                                          neighbours[i], top_k[i]))  # fmt: skip
        return out_rows

    def _count(self, stats: Dict[str, int], rows, bad, out_rows) -> None:
        """This call's counts into ``stats`` and the Ray metrics."""
        stats["written"] = len(rows)
        stats["failed"] = len(bad)
        stats["tokens"] = sum(int(r["tokens"]) for r in out_rows)
        counts = ((self.m_answered, len(rows)), (self.m_failed, len(bad)), (self.m_tokens, stats["tokens"]))
        for counter, value in counts:
            if value:
                counter.inc(value, tags=self.tags)

    def __call__(self, batch: pa.Table) -> Dict[str, List[Any]]:
        stats = dict.fromkeys(_STAT_KEYS, 0)
        stats["rows_in"] = batch.num_rows
        todo, stats["skipped"], stats["skipped_failed"] = self._todo(batch)
        rows, images, bad = self._usable(todo)

        out_rows: List[Dict[str, Any]] = []
        seconds = 0.0
        if rows:
            started = time.perf_counter()
            out_rows = self._answer(rows, images)
            seconds = time.perf_counter() - started
        if out_rows:
            write_table(self.pred_dir, pa.Table.from_pylist(out_rows, schema=PREDICTION_SCHEMA))
        if bad:
            write_table(self.failed_dir, pa.Table.from_pylist(bad, schema=FAILED_SCHEMA))

        self._count(stats, rows, bad, out_rows)
        out = {k: [v] for k, v in stats.items()}
        out["seconds"] = [seconds]
        out["datasets"] = [",".join(sorted({str(r.get("dataset")) for r in rows + bad}))]
        return out

    def _row(self, row, task, mode, options, prompt, answer, neighbours, top_k) -> Dict[str, Any]:
        labels = [x for x in (row.get("labels") or []) if x] or ([row["label"]] if row.get("label") else [])
        reference = {"diagnosis": ", ".join(labels), "vqa": row.get("answer"), "report": row.get("report")}[task]
        result = scoring.scored(task, answer["text"], reference, labels=labels, options=options,
                                multi_label=scoring.is_multi_label(row.get("dataset")), voted=mode == "voting")
        has_index = self.retriever is not None
        return {
            "id": row["id"],
            "mode": mode,
            "dataset": row.get("dataset"),
            "split": row.get("split"),
            "task": task,
            "source_file": row.get("source_file"),
            "source_index": row.get("source_index"),
            "modality": row.get("modality"),
            "question": row.get("question"),
            "answer_type": row.get("answer_type"),
            "reference": reference,
            "options": options if task == "diagnosis" else None,
            "prompt": prompt,
            "output": answer["text"],
            **result,
            "neighbour_ids": [n.id for n in neighbours] if has_index else None,
            "neighbour_scores": [float(n.score) for n in neighbours] if has_index else None,
            "neighbour_labels": [n.label for n in neighbours] if has_index else None,
            "top_k": top_k if has_index else None,
            "tokens": int(answer.get("tokens") or 0),
            "run_key": self.run_key,
        }


# ------------------------------------------------------------------------------------------ the driver


def _check(cfg: Config) -> None:
    ev = cfg.evaluate
    if not ev.sources:
        raise ConfigError("key 'evaluate.sources': no test sources to evaluate (list at least one)")
    validate(cfg)  # again: a config changed after loading (one task per source name, modes, ...)
    for i, src in enumerate(ev.sources):
        if not scoring.modes_for(default_task(src), ev.modes):  # e.g. VQA with modes [voting]: nothing to answer
            raise ConfigError(f"key 'evaluate.modes': {list(ev.modes)} has no row for evaluate.sources[{i}] "
                              f"({src.name}, task {default_task(src)}); VQA has no voting row")  # fmt: skip
    if ev.on_change not in ("restart", "error"):
        raise ConfigError(f"key 'evaluate.on_change': {ev.on_change!r} is not one of ['restart', 'error']")


def _adapter(cfg: Config) -> Tuple[Optional[str], str, Optional[dict]]:
    """``(adapter or None, the folder looked in, its meddr.json)``; an error if one is required and absent."""
    from meddr_ray.model import default_adapter

    folder = cfg.layout.adapter_dir
    adapter = default_adapter(folder)
    if adapter is None and cfg.evaluate.require_adapter:
        raise FileNotFoundError(
            f"evaluate: no trained adapter at {folder} (no adapter_config.json); run `meddr-ray train` first, or "
            f"set evaluate.require_adapter=false to evaluate the base student"
        )
    meta_path = join_path(folder, ADAPTER_META_FILE)
    meta = None
    if adapter and storage.exists(meta_path):
        try:
            meta = json.loads(storage.read_text(meta_path))
        except (ValueError, UnicodeDecodeError) as exc:  # a truncated copy of the adapter folder
            raise EvalArtifactError(f"{meta_path}: not valid JSON ({exc}); copy the adapter again or re-run "
                                    f"`meddr-ray train`") from None  # fmt: skip
    return adapter, folder, meta


def _index_manifest(cfg: Config) -> Optional[dict]:
    """The manifest of the index version this evaluation uses (``CURRENT`` now, pinned for every actor)."""
    if not needs_index(cfg.evaluate.modes):
        return None
    manifest = published_manifest(cfg.layout.index_dir, "evaluate", ", or set evaluate.modes=[no_rag]")
    _check_scope(cfg, manifest)
    return manifest


def _check_scope(cfg: Config, manifest: dict) -> None:
    """Every dataset a query will search (its own, with ``rag.same_dataset``; ``rag.datasets``) has images in the
    index, said before any model loads rather than by an actor mid-run."""
    held = (manifest.get("summary") or {}).get("datasets")
    if held is None:
        raise ConfigError(
            f"evaluate: index version {manifest['version']} at {manifest['path']} does not list its datasets (it "
            "was published before one case per image): rebuild it with `meddr-ray index`"
        )
    for src in cfg.evaluate.sources:
        missing = [d for d in scope_for(cfg.rag, src.name) or [] if d not in held]
        if missing:
            key = "rag.same_dataset" if cfg.rag.same_dataset else "rag.datasets"
            raise ConfigError(
                f"key '{key}': evaluate source {src.name!r} would retrieve from dataset(s) {missing}, which index "
                f"version {manifest['version']} holds no images of (it holds {sorted(held)}); index that dataset's "
                "training split (index.sources), name the source as the indexed dataset, or set "
                "rag.same_dataset=false"
            )


def _file_signature(folder: Optional[str]) -> List[Any]:
    """Names and sizes of a folder's files: changes when an adapter is retrained."""
    if not folder or not os.path.isdir(folder):
        return []
    return [[n, os.path.getsize(os.path.join(folder, n))] for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))]  # fmt: skip


def run_key(cfg: Config, adapter: Optional[str], adapter_meta: Optional[dict], manifest: Optional[dict]) -> str:
    """What the answers depend on: the student, its adapter, the index version and the settings; sources are
    not in it, so adding a source or raising a limit only answers the new rows."""
    blob = json.dumps(
        {
            "student": [cfg.student.name, cfg.student.path, cfg.student.dtype],
            "adapter": [adapter, adapter_meta, _file_signature(adapter)],
            "index": [manifest["version"], manifest["encoder_fingerprint"], manifest["path"]] if manifest else None,
            "modes": sorted(cfg.evaluate.modes),
            "generation": dataclasses.asdict(cfg.evaluate.generation),
            "task_max_new_tokens": dict(sorted(cfg.evaluate.task_max_new_tokens.items())),
            "rag": dataclasses.asdict(cfg.rag),
            "figure_top_k": cfg.evaluate.figure_top_k,
            "seed": cfg.seed,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_parts(folder: str, schema: pa.Schema, columns: Sequence[str]) -> pa.Table:
    """``columns`` of every part file of ``folder``, each file checked to be one this stage wrote (readable, with
    every column of ``schema`` at its type). A file that is not (truncated by a crash of the disk, copied in from
    elsewhere) would otherwise be read with nulls for what it lacks, and its rows would count as another run's:
    an error naming it instead, before anything is answered or removed."""
    import pyarrow.dataset as pads

    files = part_files(folder)
    if not files:
        return schema.empty_table().select(list(columns))
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    for shown, path in zip(files, paths):
        fix = f"delete it (its rows are answered again) or move it out of {folder}"
        try:
            with fs.open_input_file(path) as f:
                found = pq.read_schema(f)
        except (pa.ArrowException, OSError) as exc:
            raise EvalArtifactError(f"{shown}: not a readable Parquet file ({exc}); {fix}") from None
        wrong = [c.name for c in schema if found.get_field_index(c.name) < 0 or found.field(c.name).type != c.type]
        if wrong:
            raise EvalArtifactError(f"{shown}: not a file of this stage (columns {wrong} missing or of another "
                                    f"type); {fix}")  # fmt: skip
    return pads.dataset(paths, format="parquet", filesystem=fs, schema=schema).to_table(columns=list(columns))


def _prepare_output(cfg: Config, key: str) -> Tuple[pa.Array, pa.Array]:
    """Make the folders, drop stale temporary files and predictions of another run key; the ids to skip."""
    pred_dir, failed_dir = cfg.layout.predictions_dir, cfg.layout.failed_dir("evaluate")
    for folder in (pred_dir, failed_dir):
        storage.makedirs(folder)
        remove_stale_temps(folder)
    existing = read_parts(pred_dir, PREDICTION_SCHEMA, ["id", "run_key", "dataset", "task"])
    failed_before = read_parts(failed_dir, FAILED_SCHEMA, ["id"])
    keys = set(existing.column("run_key").unique().to_pylist()) if existing.num_rows else set()
    if keys and keys != {key}:
        what = (f"{pred_dir} holds predictions made with another student, adapter, index version or settings "
                f"(run key {sorted(map(str, keys))}, now {key})")  # fmt: skip
        if cfg.evaluate.on_change == "error":
            raise ConfigError(f"{what}: use another evaluate.output_dir, delete the folder, or set "
                              f"evaluate.on_change=restart")  # fmt: skip
        report("evaluate", f"{what}; removing them and answering every row again")
        for folder in (pred_dir, failed_dir):
            storage.remove(folder)
            storage.makedirs(folder)
        existing, failed_before = existing.slice(0, 0), failed_before.slice(0, 0)
    # A source renamed onto another task (a diagnosis set's name now on a VQA file) keeps the same run key: its old
    # rows would be summarised with the new ones. Found here, not after every row is answered.
    tasks = {src.name: default_task(src) for src in cfg.evaluate.sources}
    if existing.num_rows:
        pairs = existing.select(["dataset", "task"]).group_by(["dataset", "task"]).aggregate([]).to_pylist()
        for pair in pairs:
            if pair["dataset"] in tasks and pair["task"] != tasks[pair["dataset"]]:
                raise ConfigError(
                    f"{pred_dir} holds {pair['task']} predictions of dataset {pair['dataset']!r}, which "
                    f"evaluate.sources now names a {tasks[pair['dataset']]} source: give the source another name, "
                    f"or use another evaluate.output_dir"
                )
    done = pc.unique(existing.column("id").combine_chunks()) if existing.num_rows else pa.array([], pa.string())
    failed = failed_before.column("id").combine_chunks()
    return done.cast(pa.string()), failed.cast(pa.string())


def _source_dataset(cfg: Config):
    # One block per student batch, so a second actor gets work and a retried batch redoes one batch.
    batch = cfg.evaluate.pool.batch_size
    read_cfg = dataclasses.replace(cfg.data, rows_per_block=max(1, min(cfg.data.rows_per_block, batch)))
    datasets = [read_source(src, read_cfg) for src in cfg.evaluate.sources]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def run_evaluate(cfg: Config) -> StageResult:
    """Answer every row of ``evaluate.sources`` in every mode, then write metrics.json, report.md and the plots;
    returns the evaluation folder."""
    from meddr_ray.model import ensure_model

    _check(cfg)
    student_path = ensure_model(cfg.student)  # fail fast on a missing checkpoint; build tiny/smol once, here
    adapter, adapter_folder, adapter_meta = _adapter(cfg)
    if adapter is None:
        report("evaluate", f"no trained adapter at {adapter_folder}: evaluating the base student {cfg.student.name}")
    manifest = _index_manifest(cfg)
    key = run_key(cfg, adapter, adapter_meta, manifest)
    out_dir = cfg.layout.evaluate_dir
    # Two evaluations writing one folder at once would answer the same rows in differently cut batches: the
    # same (id, mode) in two files. The second stops instead (not locked on object stores); it is the one run-folder
    # lock, the pipeline's and the demo's too.
    with run_lock(out_dir):
        return _answer_and_report(cfg, str(student_path), adapter, adapter_folder, adapter_meta, manifest, key, out_dir)


def _answer_all(cfg: Config, adapter: Optional[str], manifest: Optional[dict], key: str, skip) -> Any:
    """The student pool over every source row: a Dataset of count rows, one per batch (lazy: nothing runs yet)."""
    import ray

    return map_with_actor_pool(
        _source_dataset(cfg),
        StudentEvaluator,
        cfg.evaluate.pool,
        cfg=cfg,
        adapter=adapter,
        index_version=manifest["version"] if manifest else None,
        skip_ref=[ray.put(skip)],
        run_key=key,
    )


def _report_batch(row: Dict[str, Any], totals: Dict[str, float], elapsed: float) -> None:
    """Says each answered batch, with the counts so far."""
    if row["written"] or row["failed"]:
        report("evaluate", f"batch done ({row['datasets']}): {int(totals['written'])} rows answered, "
               f"{int(totals['failed'])} failed, {int(totals['skipped'])} skipped so far; "
               f"{totals['written'] / max(elapsed, 1e-9):.2f} rows/s")  # fmt: skip


def _answer_and_report(cfg: Config, student_path: str, adapter: Optional[str], adapter_folder: str,
                       adapter_meta: Optional[dict], manifest: Optional[dict], key: str,
                       out_dir: str) -> StageResult:  # fmt: skip
    done, failed_before = _prepare_output(cfg, key)
    save_config(cfg, out_dir)
    if len(done):
        report("evaluate", f"resuming, {len(done)} ids already answered in {cfg.layout.predictions_dir}")

    init_ray(cfg)
    stats = _answer_all(cfg, adapter, manifest, key, (done, failed_before))
    totals, seconds = sum_stats(stats, _STAT_KEYS + ("seconds",), each=_report_batch)

    run = {k: int(v) for k, v in totals.items() if k != "seconds"}
    run.update(seconds=round(seconds, 3), answer_seconds=round(float(totals["seconds"]), 3),
               rows_per_s=round(run["written"] / seconds, 3) if seconds > 0 else 0.0)  # fmt: skip
    context = evaluation_report.RunContext(
        cfg=cfg, out_dir=out_dir, run_key=key, student_path=student_path, adapter=adapter,
        adapter_folder=adapter_folder, adapter_meta=adapter_meta, manifest=manifest, run=run,
    )  # fmt: skip
    metrics = evaluation_report.write_all(context)
    return StageResult(out_dir, run, evaluation_report.summary_line(metrics))
