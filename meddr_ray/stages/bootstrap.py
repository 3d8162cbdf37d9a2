"""Diagnosis-guided bootstrapping (paper section 3.1) as a Ray Data job: the teacher writes a report per image.

``run_bootstrap(cfg)`` reads every ``bootstrap.sources`` entry into the sample schema, and a pool of teacher
actors (``map_batches`` with a callable class, ``ActorPoolStrategy``) sees each labelled image with the
section 3.1 prompt (its modality and diagnosis, every label of a multi-label sample) and writes a report.

Exactly once, resumable (:mod:`meddr_ray.stages.parts`). Each actor call writes its own Parquet file, atomically (temporary name, then a
rename), named by a hash of the ids in it: a killed driver or actor leaves only complete files, and a batch
that Ray retries rewrites the same file instead of adding a second one. A re-run first reads the ``id``
column of the files already there, and the readers leave those ids out on the driver, before any image is read
(:class:`FinishedIds`), so in the end every input id is written exactly once and a resume costs nothing for the
rows already done. Ids that failed before (in ``failed/``) are skipped too; delete ``failed/`` to retry them.
Row ids survive files inserted into a source between runs (see :mod:`meddr_ray.data.schema`).

Layout of ``<stage_dir>`` (default ``<run_dir>/bootstrap``):
- ``part-<hash>.parquet``: reports (:data:`meddr_ray.stages.bootstrap_rows.REPORT_SCHEMA`);
- ``failed/part-<hash>.parquet``: rows that could not be used, with their error
  (:data:`meddr_ray.stages.parts.FAILED_SCHEMA`);
- ``summary.json``: the accounting of the last run; ``config.yaml``: the resolved config of the last run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

import pyarrow as pa

from meddr_ray import storage
from meddr_ray.config import Config, ConfigError, GenerationConfig, ModelConfig, save_config, validate
from meddr_ray.data import DataError, decode_image, read_source
from meddr_ray.data.errors import sample_where
from meddr_ray.layout import FAILED_DIR
from meddr_ray.report_sections import FLAGGED, QUALITIES, split_report
from meddr_ray.stages import bootstrap_vllm
from meddr_ray.stages.bootstrap_rows import REPORT_SCHEMA, generation_json, report_row, teacher_prompt
from meddr_ray.stages.parts import (
    FAILED_SCHEMA,
    batch_seed,
    failed_row,
    read_columns,
    remove_stale_temps,
    sum_stats,
    write_table,
)
from meddr_ray.stages.registry import StageResult
from meddr_ray.stages.runtime import init_ray, map_with_actor_pool
from meddr_ray.storage import join_path

log = logging.getLogger("meddr_ray.stages.bootstrap")

SUMMARY_FILE = "summary.json"

# One row per actor call: what it did. The driver sums these (a missing key counts 0); images never come back.
_STAT_KEYS = ("rows_in", "written", "failed", "tokens") + tuple(f"quality_{q}" for q in QUALITIES)


# ------------------------------------------------------------------------------------------ generation

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def continuation_prefix(text: str, header: str) -> str:
    """The teacher's text cut after its last full sentence, then ``header`` on a new line."""
    ends = list(_SENTENCE_END.finditer(text))
    kept = text[: ends[-1].end()] if ends else text
    return f"{kept.rstrip()}\n{header}"


def teacher_generate(
    vlm,
    images: Sequence,
    texts: Sequence[str],
    gen: GenerationConfig,
    impression_prefix: Optional[str] = None,
    impression_max_new_tokens: int = 48,
    seed: Optional[int] = None,
) -> List[dict]:
    """The teacher's reports ``[{"text", "tokens"}]``: one batched ``generate``, then, with
    ``impression_prefix``, a second one that continues every report still lacking an impression.

    With sampling, ``seed`` seeds torch first, so the same batch always gets the same reports.
    """
    if gen.do_sample and seed is not None:
        import torch

        torch.manual_seed(seed)
    outs = vlm.generate(images, texts, gen)
    if not impression_prefix:
        return outs
    need = [i for i, o in enumerate(outs) if o["text"] and split_report(o["text"]).impression is None]
    for i, o in enumerate(outs):
        if i not in need:  # already complete: only drop a sentence the token budget cut off
            o["text"] = drop_cut_sentence(o["text"])
    if not need:
        return outs
    prefixes = [continuation_prefix(outs[i]["text"], impression_prefix) for i in need]
    gen2 = dataclasses.replace(gen, max_new_tokens=impression_max_new_tokens, response_prefix="")
    more = vlm.generate([images[i] for i in need], [texts[i] for i in need], gen2, prefixes=prefixes)
    for i, prefix, extra in zip(need, prefixes, more):
        text = prefix + trim_continuation(extra["text"][len(prefix) :])
        outs[i] = {"text": text, "tokens": outs[i]["tokens"] + extra["tokens"]}
    return outs


def drop_cut_sentence(text: str) -> str:
    """``text`` without a last sentence the token budget cut off, unless that would empty a section."""
    ends = list(_SENTENCE_END.finditer(text))
    if not ends or text.rstrip()[-1:] in (".", "!", "?"):
        return text
    cut = text[: ends[-1].end()]
    return cut if split_report(cut).quality == split_report(text).quality else text


def trim_continuation(text: str) -> str:
    """The impression a teacher wrote, up to its first blank line (small models start a new document there)
    and its last full sentence, if it has one."""
    text = text.split("\n\n")[0].rstrip()
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()] if ends else text


# ------------------------------------------------------------------------------------------- the actor


class FinishedIds:
    """The ids a resumed run leaves out: reported before, or set aside in ``failed/`` before. Called by the
    readers on the driver for every row (``read_source(..., skip=finished)``) before any image is read, and
    counts what it left out; the actors never see those rows."""

    def __init__(self, done: Iterable[str], failed_before: Iterable[str]):
        self.done: Set[str] = set(done)
        self.failed_before: Set[str] = set(failed_before) - self.done
        self.skipped = 0
        self.skipped_failed = 0

    def __call__(self, row_id: str) -> bool:
        if row_id in self.done:
            self.skipped += 1
            return True
        if row_id in self.failed_before:
            self.skipped_failed += 1
            return True
        return False


class TeacherWriter:
    """Ray Data callable class: one teacher model per actor, loaded in ``__init__`` and kept for its life.

    Each call takes a batch of samples still to do, sets aside bad rows (``on_error: skip``) or stops on the
    first one (``raise``), generates the reports of the rest in one batched ``generate``, writes both kinds of
    rows to their own files and returns one row of counts.
    """

    def __init__(
        self,
        *,
        teacher: ModelConfig,
        generation: GenerationConfig,
        out_dir: str,
        prompt_version: str,
        impression_prefix: Optional[str],
        impression_max_new_tokens: int,
        seed: int,
        max_image_bytes: int,
        max_image_pixels: int,
        on_error: str,
    ):
        from ray.util.metrics import Counter

        from meddr_ray.model import load_model

        self.on_error = on_error
        self.model = load_model(teacher)
        self.teacher = teacher
        self.gen = generation
        self.gen_json = generation_json(generation)
        self.out_dir = out_dir
        self.failed_dir = join_path(out_dir, FAILED_DIR)
        self.prompt_version = prompt_version
        self.seed = seed
        self.impression = dict(
            impression_prefix=impression_prefix, impression_max_new_tokens=impression_max_new_tokens
        )
        self.limits = dict(max_bytes=max_image_bytes, max_pixels=max_image_pixels)
        tags = ("teacher",)
        self.tags = {"teacher": teacher.name}
        self.m_written = Counter("meddr_bootstrap_reports_written", "Reports written by the teacher", tag_keys=tags)
        self.m_tokens = Counter("meddr_bootstrap_tokens_generated", "Tokens generated by the teacher", tag_keys=tags)
        self.m_failed = Counter("meddr_bootstrap_rows_failed", "Rows set aside as bad input", tag_keys=tags)

    def _decode(self, row: Dict[str, Any]):
        """The sample's image as RGB, or an error message naming the source row (its full path)."""
        where = sample_where(row, full_path=True)
        if row.get("error"):
            return None, row["error"]
        if not row.get("image"):
            return None, f"{where}: no image"
        try:
            return decode_image(row["image"], where=where, **self.limits), None
        except DataError as exc:
            return None, str(exc)

    def __call__(self, batch: pa.Table) -> Dict[str, List[Any]]:
        stats = dict.fromkeys(_STAT_KEYS, 0)
        todo, images, bad = [], [], []
        for row in batch.to_pylist():
            stats["rows_in"] += 1
            image, error = self._decode(row)
            if error is not None and self.on_error == "raise":
                raise DataError(error)  # data.on_error=raise: the job stops, naming the file and row
            if error is not None:
                bad.append(failed_row(row, error))
            else:
                todo.append(row)
                images.append(image)

        rows, seconds = [], 0.0
        if todo:
            texts = [teacher_prompt(r) for r in todo]
            seed = batch_seed(self.seed, [r["id"] for r in todo])
            started = time.perf_counter()
            outs = teacher_generate(self.model, images, texts, self.gen, **self.impression, seed=seed)
            seconds = time.perf_counter() - started
            kw = dict(teacher=self.teacher, prompt_version=self.prompt_version, generation_json=self.gen_json)
            rows = [report_row(r, p, o, **kw) for r, p, o in zip(todo, texts, outs)]
            write_table(self.out_dir, pa.Table.from_pylist(rows, schema=REPORT_SCHEMA))
        if bad:
            write_table(self.failed_dir, pa.Table.from_pylist(bad, schema=FAILED_SCHEMA))

        stats["written"] = len(rows)
        stats["failed"] = len(bad)
        stats["tokens"] = sum(r["tokens"] for r in rows)
        for r in rows:
            stats[f"quality_{r['quality']}"] += 1
        if rows:
            self.m_written.inc(len(rows), tags=self.tags)
        if stats["tokens"]:
            self.m_tokens.inc(stats["tokens"], tags=self.tags)
        if bad:
            self.m_failed.inc(len(bad), tags=self.tags)
        out = {k: [v] for k, v in stats.items()}
        out["generate_seconds"] = [seconds]
        return out


# ---------------------------------------------------------------------------------------------- the job


def _check_sources(cfg: Config) -> None:
    if not cfg.bootstrap.sources:
        raise ConfigError("key 'bootstrap.sources': no sources to bootstrap (list at least one labelled source)")
    validate(cfg)  # again: a config changed after loading (one source name per split, ...)


def _check_compatible(existing: pa.Table, cfg: Config, out_dir: str) -> None:
    """Refuse to add reports of another teacher or prompt version to the same folder (a silent mix)."""
    if existing.num_rows == 0:
        return
    for column, want in (("teacher", cfg.teacher.name), ("prompt_version", cfg.bootstrap.prompt_version)):
        have = set(existing.column(column).unique().to_pylist())
        if have != {want}:
            raise ConfigError(
                f"{out_dir} already holds reports with {column} {sorted(map(str, have))}, but this run uses "
                f"{want!r}: use another run_dir / bootstrap.output_dir, or delete the folder to start over"
            )


def format_summary(s: Dict[str, Any]) -> str:
    return (
        f"bootstrap: rows in {s['rows_in']}, written {s['written']}, skipped (already done) {s['skipped']}, "
        f"skipped (failed before) {s['skipped_failed']}, failed {s['failed']}, "
        f"quality-flagged {s['quality_flagged']}, tokens {s['tokens']}, {s['tokens_per_s']:.1f} tokens/s "
        f"in {s['seconds']:.1f} s; {s['total_reports']} reports in {s['output_dir']}"
    )


def _samples_to_do(cfg: Config, finished: FinishedIds):
    """Every ``bootstrap.sources`` row not in ``finished``, as one Dataset; the readers leave finished rows out on
    the driver, so their images are never read, checked or re-encoded."""
    # One block per teacher batch: the pool hands whole blocks to its actors, so blocks of the readers' default
    # size (256 rows) would keep a second actor idle and make a retry after a lost actor redo 256 reports.
    batch = cfg.bootstrap.pool.batch_size
    read_cfg = dataclasses.replace(cfg.data, rows_per_block=max(1, min(cfg.data.rows_per_block, batch)))
    datasets = [read_source(src, read_cfg, skip=finished) for src in cfg.bootstrap.sources]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _teacher_stats(cfg: Config, ds, out_dir: str):
    """The teacher over ``ds`` (samples still to do): a Dataset of count rows (:data:`_STAT_KEYS`), one per batch."""
    if cfg.bootstrap.backend == "vllm":  # a paper-scale teacher on GPUs: ray.data.llm's engine, same files
        from meddr_ray.model import ensure_model

        return bootstrap_vllm.vllm_report_stats(cfg, ds, out_dir, str(ensure_model(cfg.teacher)))
    return map_with_actor_pool(
        ds,
        TeacherWriter,
        cfg.bootstrap.pool,
        teacher=cfg.teacher,
        generation=cfg.bootstrap.generation,
        out_dir=out_dir,
        prompt_version=cfg.bootstrap.prompt_version,
        impression_prefix=cfg.bootstrap.impression_prefix,
        impression_max_new_tokens=cfg.bootstrap.impression_max_new_tokens,
        seed=cfg.seed,
        max_image_bytes=cfg.data.max_image_bytes,
        max_image_pixels=cfg.data.max_image_pixels,
        on_error=cfg.data.on_error,
    )


def _check_inputs(cfg: Config) -> str:
    """Every check that needs no Ray, before any Ray work; returns the teacher's checkpoint folder."""
    from meddr_ray.model import ensure_model

    _check_sources(cfg)
    if cfg.bootstrap.backend == "vllm":
        bootstrap_vllm.check_vllm_config(cfg)  # settings vLLM cannot honour, vLLM not installed
    # Fail fast on a missing checkpoint; and build tiny/smol here once, so that the actors find it ready instead
    # of racing to build it.
    teacher_path = ensure_model(cfg.teacher)
    log.info("teacher %s at %s", cfg.teacher.name, teacher_path)
    return str(teacher_path)


def _finished_ids(cfg: Config) -> FinishedIds:
    """Prepare the output folders for a (re-)run and read what earlier runs finished there: reports written (of
    this teacher and prompt version only) and rows set aside."""
    out_dir, failed_dir = cfg.layout.bootstrap_dir, cfg.layout.failed_dir("bootstrap")
    storage.makedirs(failed_dir)
    remove_stale_temps(out_dir)
    remove_stale_temps(failed_dir)
    existing = read_columns(out_dir, ["id", "teacher", "prompt_version"])
    _check_compatible(existing, cfg, out_dir)
    failed_before = read_columns(failed_dir, ["id"]).column("id")
    return FinishedIds(existing.column("id").to_pylist(), failed_before.to_pylist())


def _set_aside_rows(cfg: Config) -> int:
    return read_columns(cfg.layout.failed_dir("bootstrap"), ["id"]).num_rows


def _summary(cfg: Config, totals: Dict[str, float], seconds: float, finished: FinishedIds,
             teacher_path: str) -> Dict[str, Any]:  # fmt: skip
    """The accounting of a run (``summary.json``): this run's counts plus what earlier runs had done."""
    summary: Dict[str, Any] = {k: int(v) for k, v in totals.items() if k != "generate_seconds"}
    pool = cfg.bootstrap.pool
    summary["skipped"], summary["skipped_failed"] = finished.skipped, finished.skipped_failed
    summary["rows_in"] += finished.skipped + finished.skipped_failed  # every source row, done before or not
    summary["quality"] = {q: summary.pop(f"quality_{q}") for q in QUALITIES}
    summary["quality_flagged"] = sum(summary["quality"][q] for q in FLAGGED)
    summary["seconds"] = round(seconds, 3)
    summary["generate_seconds"] = round(float(totals["generate_seconds"]), 3)
    summary["tokens_per_s"] = summary["tokens"] / seconds if seconds > 0 else 0.0
    summary["total_reports"] = len(finished.done) + summary["written"]
    summary["total_failed"] = len(finished.failed_before) + summary["failed"]
    summary.update(
        output_dir=cfg.layout.bootstrap_dir,
        teacher=cfg.teacher.name,
        teacher_path=teacher_path,
        prompt_version=cfg.bootstrap.prompt_version,
        actors={"min": pool.min_actors, "max": pool.max_actors, "batch_size": pool.batch_size},
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return summary


def run_bootstrap(cfg: Config) -> StageResult:
    """Bootstrap reports for every sample of ``cfg.bootstrap.sources``; returns the output folder."""
    teacher_path = _check_inputs(cfg)
    out_dir = cfg.layout.bootstrap_dir
    finished = _finished_ids(cfg)
    vllm = cfg.bootstrap.backend == "vllm"
    set_aside_before = _set_aside_rows(cfg) if vllm else 0
    save_config(cfg, out_dir)

    init_ray(cfg)
    stats = _teacher_stats(cfg, _samples_to_do(cfg, finished), out_dir)
    totals, seconds = sum_stats(stats, _STAT_KEYS + ("generate_seconds",))
    if vllm:  # its bad rows are set aside before the engine, which counts only reports
        totals["failed"] = _set_aside_rows(cfg) - set_aside_before
        totals["rows_in"] = totals["written"] + totals["failed"]

    summary = _summary(cfg, totals, seconds, finished, teacher_path)
    storage.write_text(join_path(out_dir, SUMMARY_FILE), json.dumps(summary, indent=2, sort_keys=True))
    return StageResult(out_dir, summary, format_summary(summary))


def load_summary(out_dir: str) -> Optional[Dict[str, Any]]:
    path = join_path(out_dir, SUMMARY_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None
