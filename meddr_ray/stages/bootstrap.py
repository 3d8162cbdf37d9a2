"""Diagnosis-guided bootstrapping (paper section 3.1) as a Ray Data job: the teacher writes a report per image.

``run_bootstrap(cfg)`` reads every ``bootstrap.sources`` entry into the sample schema, and a pool of teacher
actors (``map_batches`` with a callable class, ``ActorPoolStrategy``) sees each labelled image with the
section 3.1 prompt (its modality and diagnosis, every label of a multi-label sample) and writes a report.

Exactly once, resumable. Each actor call writes its own Parquet file, atomically (temporary name, then a
rename), named by a hash of the ids in it: a killed driver or actor leaves only complete files, and a batch
that Ray retries rewrites the same file instead of adding a second one. A re-run first reads the ``id``
column of the files already there, and the readers leave those ids out on the driver, before any image is read
(:class:`FinishedIds`), so in the end every input id is written exactly once and a resume costs nothing for the
rows already done. Ids that failed before (in ``failed/``) are skipped too; delete ``failed/`` to retry them.
Row ids survive files inserted into a source between runs (see :mod:`meddr_ray.data.schema`).

Layout of ``<stage_dir>`` (default ``<run_dir>/bootstrap``):
- ``part-<hash>.parquet``: reports (:data:`REPORT_SCHEMA`);
- ``failed/part-<hash>.parquet``: rows that could not be used, with their error (:data:`FAILED_SCHEMA`);
- ``summary.json``: the accounting of the last run; ``config.yaml``: the resolved config of the last run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from meddr_ray import prompts, storage
from meddr_ray.config import Config, ConfigError, GenerationConfig, ModelConfig, save_config, validate
from meddr_ray.layout import FAILED_DIR
from meddr_ray.prompts import DEFAULT_MODALITY
from meddr_ray.report_sections import FLAGGED, QUALITIES, split_report
from meddr_ray.stages.registry import StageResult
from meddr_ray.storage import join_path

log = logging.getLogger("meddr_ray.stages.bootstrap")

PART_PREFIX = "part-"
SUMMARY_FILE = "summary.json"

REPORT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # the sample's id, stable under inserts (data.schema)
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("source_index", pa.int64()),
        pa.field("modality", pa.string()),
        pa.field("label", pa.string()),  # ", "-joined diagnosis
        pa.field("labels", pa.list_(pa.string())),  # every label the teacher was told
        pa.field("label_set", pa.list_(pa.string())),
        pa.field("image", pa.binary()),  # encoded image, as read
        pa.field("prompt", pa.string()),  # the exact instruction the teacher saw
        pa.field("report", pa.string()),  # the teacher's whole text
        pa.field("findings", pa.string()),  # null when absent
        pa.field("impression", pa.string()),  # null when absent
        pa.field("quality", pa.string()),  # ok | partial | no_sections | empty (meddr_ray.report_sections)
        pa.field("teacher", pa.string()),  # teacher model name
        pa.field("teacher_path", pa.string()),  # teacher checkpoint directory
        pa.field("prompt_version", pa.string()),
        pa.field("generation", pa.string()),  # decoding settings, JSON
        pa.field("tokens", pa.int64()),  # generated tokens
    ]
)

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

# One row per actor call: what it did. The driver sums these (a missing key counts 0); images never come back.
_STAT_KEYS = ("rows_in", "written", "failed", "tokens") + tuple(f"quality_{q}" for q in QUALITIES)


# --------------------------------------------------------------------------------------------- pure helpers


def teacher_prompt(row: Dict[str, Any]) -> str:
    """The section 3.1 prompt of a sample: its modality and every one of its labels."""
    labels = [x for x in (row.get("labels") or []) if x] or [row.get("label") or ""]
    return prompts.bootstrap_prompt(row.get("modality") or DEFAULT_MODALITY, labels)


def sample_where(row: Dict[str, Any]) -> str:
    """Where a sample came from, for its error message: its source file (as the reader named it; the dataset
    when there is none) and its row, e.g. ``/data/a.csv row 5``."""
    return f"{row.get('source_file') or row.get('dataset')} row {row.get('source_index')}"


def report_row(
    sample: Dict[str, Any],
    prompt: str,
    generated: Dict[str, Any],
    *,
    teacher: ModelConfig,
    prompt_version: str,
    generation_json: str,
) -> Dict[str, Any]:
    """An output row (:data:`REPORT_SCHEMA`) from an input sample and the teacher's ``{"text", "tokens"}``."""
    text = generated.get("text") or ""
    parts = split_report(text)
    return {
        "id": sample["id"],
        "dataset": sample.get("dataset"),
        "split": sample.get("split"),
        "source_index": sample.get("source_index"),
        "modality": sample.get("modality"),
        "label": sample.get("label"),
        "labels": list(sample.get("labels") or []),
        "label_set": list(sample.get("label_set") or []),
        "image": sample.get("image"),
        "prompt": prompt,
        "report": text,
        "findings": parts.findings,
        "impression": parts.impression,
        "quality": parts.quality,
        "teacher": teacher.name,
        "teacher_path": teacher.path,
        "prompt_version": prompt_version,
        "generation": generation_json,
        "tokens": int(generated.get("tokens") or 0),
    }


def failed_row(sample: Dict[str, Any], error: str) -> Dict[str, Any]:
    return {
        "id": sample["id"],
        "dataset": sample.get("dataset"),
        "split": sample.get("split"),
        "source_file": sample.get("source_file"),
        "source_index": sample.get("source_index"),
        "error": error,
    }


def generation_json(gen: GenerationConfig) -> str:
    return json.dumps(dataclasses.asdict(gen), sort_keys=True)


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
    files = part_files(folder)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    import pyarrow.dataset as pads

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


def batch_seed(seed: int, ids: Sequence[str]) -> int:
    """A sampling seed fixed by the run's seed and the batch's ids (a retried batch samples the same text)."""
    return int(hashlib.sha1(f"{seed}\x1f{'|'.join(sorted(ids))}".encode()).hexdigest()[:8], 16)


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
        """The sample's image as RGB, or an error message naming the source row."""
        from meddr_ray.data import DataError, decode_image

        where = sample_where(row)
        if row.get("error"):
            return None, row["error"]
        if not row.get("image"):
            return None, f"{where}: no image"
        try:
            return decode_image(row["image"], where=where, **self.limits), None
        except DataError as exc:
            return None, str(exc)

    def __call__(self, batch: pa.Table) -> Dict[str, List[Any]]:
        from meddr_ray.data import DataError

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
    from meddr_ray.data import read_source

    # One block per teacher batch: the pool hands whole blocks to its actors, so blocks of the readers' default
    # size (256 rows) would keep a second actor idle and make a retry after a lost actor redo 256 reports.
    batch = cfg.bootstrap.pool.batch_size
    read_cfg = dataclasses.replace(cfg.data, rows_per_block=max(1, min(cfg.data.rows_per_block, batch)))
    datasets = [read_source(src, read_cfg, skip=finished) for src in cfg.bootstrap.sources]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _teacher_stats(cfg: Config, ds, out_dir: str):
    """The teacher over ``ds`` (samples still to do): a Dataset of count rows (:data:`_STAT_KEYS`), one per batch."""
    from meddr_ray.stages.runtime import map_with_actor_pool

    if cfg.bootstrap.backend == "vllm":  # a paper-scale teacher on GPUs: ray.data.llm's engine, same files
        from meddr_ray.stages.bootstrap_vllm import vllm_report_stats
        from meddr_ray.model import ensure_model

        return vllm_report_stats(cfg, ds, out_dir, str(ensure_model(cfg.teacher)))
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
        from meddr_ray.stages.bootstrap_vllm import check_vllm_config

        check_vllm_config(cfg)  # settings vLLM cannot honour, vLLM not installed
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


def _sum_stats(stats_ds) -> Tuple[Dict[str, float], float]:
    """Runs the job (the driver pulls the count rows) and sums the counts; and the seconds it took."""
    started = time.perf_counter()
    totals: Dict[str, float] = dict.fromkeys(_STAT_KEYS + ("generate_seconds",), 0)
    for batch in stats_ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for key in totals:
            if key in batch.column_names:
                totals[key] += sum(batch.column(key).to_pylist())
    return totals, time.perf_counter() - started


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
    from meddr_ray.stages.runtime import init_ray

    teacher_path = _check_inputs(cfg)
    out_dir = cfg.layout.bootstrap_dir
    finished = _finished_ids(cfg)
    vllm = cfg.bootstrap.backend == "vllm"
    set_aside_before = _set_aside_rows(cfg) if vllm else 0
    save_config(cfg, out_dir)

    init_ray(cfg)
    totals, seconds = _sum_stats(_teacher_stats(cfg, _samples_to_do(cfg, finished), out_dir))
    if vllm:  # its bad rows are set aside before the engine, which counts only reports
        totals["failed"] = _set_aside_rows(cfg) - set_aside_before
        totals["rows_in"] = totals["written"] + totals["failed"]

    summary = _summary(cfg, totals, seconds, finished, teacher_path)
    storage.write_text(join_path(out_dir, SUMMARY_FILE), json.dumps(summary, indent=2, sort_keys=True))
    return StageResult(out_dir, summary, format_summary(summary))


def load_summary(out_dir: str) -> Optional[Dict[str, Any]]:
    path = join_path(out_dir, SUMMARY_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None
