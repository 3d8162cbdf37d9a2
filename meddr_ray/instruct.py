"""The instruction-tuning mix of Appendix A as a Ray Data job: every sample rendered with its task's template.

``run_instruct(cfg)`` reads ``instruct.sources`` (diagnosis, VQA and report data, in the sample schema) and,
with ``instruct.use_bootstrap``, the bootstrapped reports of the run, and writes one row per instruction:

- bootstrapped report -> ``guided_report``: A.4, the section 3.1 sentence WITHOUT the diagnosis; answer = report;
- diagnosis sample -> ``diagnosis``: A.3 with the dataset's label set as options; answer = the label(s);
- VQA sample -> ``vqa``: A.1 with the question; answer = the answer;
- report sample -> ``report``: A.2; answer = the reference report; with ``instruct.descriptions`` also
  ``description``: an OpenI-style description instruction, answered by the report's findings.

Weights and caps (per source, and ``bootstrap_weight`` / ``bootstrap_cap``) are deterministic: weight 2.0
repeats every row twice, 0.5 keeps the half of the rows whose id hash is lowest; a cap keeps the ``cap`` rows
of lowest hash. The train/val split hashes the *source* id, so the copies and every task of one image land in
the same split (no image in both). The same config always gives the same mix.

Output ``<stage_dir>`` (default ``<run_dir>/instruct``): ``part-*.parquet`` (:data:`MIX_SCHEMA`, both splits, a
``split`` column), ``failed/`` (rows set aside, with the reason), ``summary.json`` and ``config.yaml``. A re-run
rebuilds the whole mix in a temporary folder and swaps it in, so a reader never sees half a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meddr_ray import prompts, storage
from meddr_ray.config import Config, ConfigError, join_path, save_config
from meddr_ray.data import NO_FINDING, medmnist_info
from meddr_ray.reports import split_report

log = logging.getLogger("meddr_ray.instruct")

TASK_GUIDED_REPORT = "guided_report"
TASK_DIAGNOSIS = "diagnosis"
TASK_VQA = "vqa"
TASK_REPORT = "report"
TASK_DESCRIPTION = "description"
DEFAULT_MODALITY = "medical"
FAILED_DIR = "failed"
SUMMARY_FILE = "summary.json"

MIX_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # hash of task + source id + copy number: unique in the mix
        pa.field("source_id", pa.string()),  # the sample's id in its source (or in the bootstrap Parquet)
        pa.field("dataset", pa.string()),
        pa.field("task", pa.string()),  # guided_report | diagnosis | vqa | report | description
        pa.field("split", pa.string()),  # train | val (by source id hash)
        pa.field("modality", pa.string()),
        pa.field("label", pa.string()),  # the diagnosis, when known (never in a guided_report prompt)
        pa.field("image", pa.binary()),
        pa.field("prompt", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("source_index", pa.int64()),
        pa.field("question", pa.string()),  # vqa: the question alone (the index keeps each image's QA pairs)
    ]
)
# While rendering: plus why a row is set aside (null for a good row) and its rank for caps.
_RENDERED_SCHEMA = MIX_SCHEMA.append(pa.field("error", pa.string())).append(pa.field("rank", pa.float64()))
FAILED_COLUMNS = ["source_id", "dataset", "task", "source_file", "source_index", "error"]


class RowError(ValueError):
    """A sample that cannot become an instruction (the message says why)."""


# --------------------------------------------------------------------------------------- deterministic draws


def unit_hash(*parts: str) -> float:
    """A number in [0, 1) fixed by ``parts``: the same on every machine and every run."""
    digest = hashlib.sha1("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(source_id: str, val_fraction: float) -> str:
    return "val" if unit_hash("split", source_id) < val_fraction else "train"


def copies(source_id: str, weight: float) -> int:
    """How many times a row enters the mix: floor(weight), plus one with probability frac(weight) (by hash)."""
    whole = math.floor(weight)
    return whole + (1 if unit_hash("weight", source_id) < weight - whole else 0)


def instruction_id(task: str, source_id: str, copy: int) -> str:
    return hashlib.sha1(f"{task}\x1f{source_id}\x1f{copy}".encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- templates


def _need(row: Dict[str, Any], key: str, what: str) -> str:
    value = row.get(key)
    if value is None or not str(value).strip():
        raise RowError(f"no {what} (column {key!r} is empty)")
    return str(value).strip()


def _multi_label(dataset: Optional[str]) -> bool:
    return bool(dataset and (medmnist_info(dataset) or {}).get("multi_label"))


def sample_instructions(row: Dict[str, Any], descriptions: bool = False) -> List[Tuple[str, str, str]]:
    """``[(task, prompt, answer)]`` for one sample-schema row, by its task; :class:`RowError` if unusable."""
    task = row.get("task") or TASK_DIAGNOSIS
    modality = row.get("modality")
    if task == TASK_DIAGNOSIS:
        label = _need(row, "label", "label")
        options = list(row.get("label_set") or [])
        if not options:
            raise RowError("no label set to offer as options")
        if _multi_label(row.get("dataset")) and NO_FINDING not in [o.lower() for o in options]:
            # a multi-label sample may have no positive class (its label is "no finding"): offer it to every
            # sample of the dataset (a choice made here; the paper's label sets are not listed), so the option
            # itself does not give the answer away
            options.append(NO_FINDING)
        return [(TASK_DIAGNOSIS, prompts.diagnosis_prompt(modality or DEFAULT_MODALITY, options), label)]
    if task == TASK_VQA:
        question, answer = _need(row, "question", "question"), _need(row, "answer", "answer")
        return [(TASK_VQA, prompts.vqa_prompt(question), answer)]
    if task == TASK_REPORT:
        report = _need(row, "report", "report text")
        out = [(TASK_REPORT, prompts.report_prompt(modality), report)]
        if descriptions:
            findings = split_report(report).findings or report
            out.append((TASK_DESCRIPTION, prompts.description_prompt(), findings))
        return out
    raise RowError(f"unknown task {task!r}")


def bootstrap_instruction(row: Dict[str, Any]) -> Tuple[str, str, str]:
    """A.4 for a bootstrapped report: the instruction names the modality but never the diagnosis."""
    report = _need(row, "report", "bootstrapped report")
    return TASK_GUIDED_REPORT, prompts.guided_report_prompt(row.get("modality") or DEFAULT_MODALITY), report


def _base(row: Dict[str, Any], task: str) -> Dict[str, Any]:
    return {
        "source_id": row["id"],
        "dataset": row.get("dataset"),
        "task": task,
        "modality": row.get("modality"),
        "label": row.get("label"),
        "question": row.get("question") if task == TASK_VQA else None,
        "image": row.get("image"),
        "source_file": row.get("source_file"),
        "source_index": row.get("source_index"),
    }


def expand(
    row: Dict[str, Any], items: List[Tuple[str, str, str]], weight: float, val_fraction: float
) -> List[Dict[str, Any]]:
    """Mix rows of one sample: each (task, prompt, answer) ``copies(weight)`` times, all in the sample's split."""
    split = split_of(row["id"], val_fraction)
    out = []
    for task, prompt, answer in items:
        for k in range(copies(row["id"], weight)):
            iid = instruction_id(task, row["id"], k)
            out.append(
                {**_base(row, task), "id": iid, "split": split, "prompt": prompt, "answer": answer,
                 "error": None, "rank": unit_hash("cap", iid)}
            )  # fmt: skip
    return out


def set_aside(row: Dict[str, Any], task: Optional[str], error: str) -> Dict[str, Any]:
    return {**_base(row, task or row.get("task")), "id": row["id"], "split": None, "prompt": None, "answer": None,
            "image": None, "error": error, "rank": None}  # fmt: skip


def _where(row: Dict[str, Any]) -> str:
    return f"{row.get('source_file') or row.get('dataset')} row {row.get('source_index')}"


# ------------------------------------------------------------------------------------------ Ray Data steps


def _render_samples(batch: pa.Table, *, weight: float, val_fraction: float, descriptions: bool) -> pa.Table:
    """Ray task: sample-schema rows -> mix rows (errors kept as set-aside rows)."""
    out: List[Dict[str, Any]] = []
    for row in batch.to_pylist():
        if row.get("error"):
            out.append(set_aside(row, None, row["error"]))
            continue
        try:
            if not row.get("image"):
                raise RowError("no image")
            out.extend(expand(row, sample_instructions(row, descriptions), weight, val_fraction))
        except RowError as exc:
            out.append(set_aside(row, None, f"{_where(row)}: {exc}"))
    return pa.Table.from_pylist(out, schema=_RENDERED_SCHEMA)


def _render_bootstrap(batch: pa.Table, *, weight: float, val_fraction: float, keep_quality: List[str]) -> pa.Table:
    """Ray task: bootstrapped report rows -> guided-report mix rows; reports of unwanted quality set aside."""
    out: List[Dict[str, Any]] = []
    for row in batch.to_pylist():
        where = f"bootstrap {row.get('dataset')} row {row.get('source_index')}"
        if row.get("quality") not in keep_quality:
            out.append(set_aside(row, TASK_GUIDED_REPORT, f"{where}: report quality {row.get('quality')!r} is not "
                                 f"in instruct.bootstrap_quality {keep_quality}"))  # fmt: skip
            continue
        try:
            if not row.get("image"):
                raise RowError("no image")
            out.extend(expand(row, [bootstrap_instruction(row)], weight, val_fraction))
        except RowError as exc:
            out.append(set_aside(row, TASK_GUIDED_REPORT, f"{where}: {exc}"))
    return pa.Table.from_pylist(out, schema=_RENDERED_SCHEMA)


def _good(ds):
    from ray.data.expressions import col

    return ds.filter(expr=col("error").is_null())


def _bad(ds):
    from ray.data.expressions import col

    return ds.filter(expr=col("error").is_not_null())


def _apply_cap(ds, cap: Optional[int], name: str) -> Tuple[Any, int]:
    """Keep at most ``cap`` good rows (those of lowest rank) and every set-aside row; returns (ds, dropped)."""
    if cap is None:
        return ds, 0
    ranks = np.concatenate(
        [b["rank"] for b in _good(ds).select_columns(["rank"]).iter_batches(batch_size=None, batch_format="numpy")]
        or [np.zeros(0)]
    )
    if len(ranks) <= cap:
        return ds, 0
    threshold = float(np.partition(ranks, cap - 1)[cap - 1]) if cap > 0 else -1.0
    from ray.data.expressions import col

    log.info("instruct: source %s capped at %d of %d rows", name, cap, len(ranks))
    kept = ds.filter(expr=col("error").is_not_null() | (col("rank") <= threshold))
    return kept.materialize(), len(ranks) - cap


def _bootstrap_dataset(cfg: Config):
    import ray

    from meddr_ray.bootstrap import part_files

    folder = cfg.stage_dir("bootstrap")
    files = part_files(folder)
    if not files:
        raise FileNotFoundError(
            f"no bootstrapped reports at {folder}: run `meddr-ray bootstrap` first, or set instruct.use_bootstrap=false"
        )
    columns = ["id", "dataset", "split", "source_index", "modality", "label", "image", "report", "quality"]
    return ray.data.read_parquet(files, columns=columns)


def _small_columns(ds, columns: List[str]) -> pa.Table:
    """A few short text columns of every row, on the driver (never the images), for the counts."""
    import ray

    tables = ray.get(ds.select_columns(columns).to_arrow_refs())
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})


def _counts(table: pa.Table, keys: List[str]) -> List[Dict[str, Any]]:
    if table.num_rows == 0:
        return []
    grouped = table.group_by(keys).aggregate([([], "count_all")]).rename_columns(keys + ["count()"])
    return sorted(grouped.to_pylist(), key=lambda r: [str(r[k]) for k in keys])


def summary_table(by_group: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows of (task, dataset) with train / val / total counts, from (task, dataset, split) counts."""
    table: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in by_group:
        entry = table.setdefault((r["task"], r["dataset"]), {"task": r["task"], "dataset": r["dataset"], "train": 0,
                                                             "val": 0, "total": 0})  # fmt: skip
        entry[r["split"]] += r["count()"]
        entry["total"] += r["count()"]
    return [table[k] for k in sorted(table)]


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = ("task", "dataset", "train", "val", "total")
    cells = [head] + [tuple(str(r[h]) for h in head) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) if i < 2 else c[i].rjust(widths[i]) for i in range(len(head))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _remove_leftovers(out_dir: str) -> None:
    """Folders a killed earlier run left next to the output (``<out>.tmp-*``, ``<out>.old-*``)."""
    import pyarrow.fs as pafs

    fs, p = storage.resolve(out_dir)
    parent, name = p.rstrip("/").rsplit("/", 1)
    if fs.get_file_info(parent).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(parent)):
        if info.type == pafs.FileType.Directory and (
            info.base_name.startswith(f"{name}.tmp-") or info.base_name.startswith(f"{name}.old-")
        ):
            fs.delete_dir(info.path)


def _publish(tmp: str, out_dir: str) -> None:
    """Swap the finished mix into place: the old folder moves aside, the new one moves in, the old is deleted."""
    old = None
    if storage.exists(out_dir):
        old = f"{out_dir.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
        storage.move(out_dir, old)
    storage.move(tmp, out_dir)
    if old:
        fs, p = storage.resolve(old)
        fs.delete_dir(p)


def run_instruct(cfg: Config) -> str:
    """Build the instruction mix of ``cfg.instruct``; returns the output folder."""
    from meddr_ray.runtime import init_ray

    ic = cfg.instruct
    if not ic.sources and not ic.use_bootstrap:
        raise ConfigError("key 'instruct.sources': nothing to mix (no sources and instruct.use_bootstrap is false)")
    if not 0.0 <= ic.val_fraction < 1.0:
        raise ConfigError(f"key 'instruct.val_fraction': {ic.val_fraction} is not in [0, 1)")
    out_dir = cfg.stage_dir("instruct")
    started = time.perf_counter()
    _remove_leftovers(out_dir)
    init_ray(cfg)
    from meddr_ray.data import read_source

    parts, capped = [], {}
    # The bootstrap input is checked first: a missing one fails before any source is read.
    if ic.use_bootstrap:
        ds = _bootstrap_dataset(cfg).map_batches(
            _render_bootstrap,
            batch_format="pyarrow",
            fn_kwargs=dict(weight=ic.bootstrap_weight, val_fraction=ic.val_fraction,
                           keep_quality=list(ic.bootstrap_quality)),
        )  # fmt: skip
        parts.append(("bootstrap", ds, ic.bootstrap_cap))
    for src in ic.sources:
        ds = read_source(src, cfg.data).map_batches(
            _render_samples,
            batch_format="pyarrow",
            fn_kwargs=dict(weight=src.weight, val_fraction=ic.val_fraction, descriptions=ic.descriptions),
        )
        parts.append((src.name, ds, src.cap))

    rendered = []
    for name, ds, cap in parts:
        ds, dropped = _apply_cap(ds.materialize(), cap, name)  # materialized once: counted, capped, written
        capped[name] = dropped
        rendered.append(ds)
    mix = rendered[0].union(*rendered[1:]) if len(rendered) > 1 else rendered[0]
    good, bad = _good(mix), _bad(mix)
    meta = _small_columns(mix, ["task", "dataset", "split", "error"])
    is_bad = meta.column("error").is_valid()
    good_meta, bad_meta = meta.filter(pc.invert(is_bad)), meta.filter(is_bad)
    n_bad = bad_meta.num_rows

    parent = out_dir.rstrip("/").rsplit("/", 1)[0]
    storage.makedirs(parent)
    tmp = f"{out_dir.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    storage.makedirs(tmp)
    if good_meta.num_rows:
        good.drop_columns(["error", "rank"]).write_parquet(tmp)
    if n_bad:
        bad.select_columns(FAILED_COLUMNS).write_parquet(join_path(tmp, FAILED_DIR))
    table = summary_table(_counts(good_meta, ["task", "dataset", "split"]))
    set_aside_by = [
        {"task": r["task"], "dataset": r["dataset"], "count": r["count()"]} for r in _counts(bad_meta, ["task", "dataset"])
    ]
    totals = {s: sum(r[s] for r in table) for s in ("train", "val", "total")}
    summary = {
        "output_dir": out_dir,
        "rows": totals["total"],
        "train": totals["train"],
        "val": totals["val"],
        "set_aside": n_bad,
        "set_aside_by": set_aside_by,
        "capped": capped,
        "by_task_dataset": table,
        "val_fraction": ic.val_fraction,
        "seconds": round(time.perf_counter() - started, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.write_text(join_path(tmp, SUMMARY_FILE), json.dumps(summary, indent=2, sort_keys=True))
    save_config(cfg, tmp)
    _publish(tmp, out_dir)

    text = format_table(table)
    line = (
        f"instruct: {totals['total']} instructions ({totals['train']} train, {totals['val']} val), "
        f"{n_bad} rows set aside{f' (see {join_path(out_dir, FAILED_DIR)})' if n_bad else ''}, "
        f"capped {sum(capped.values())}, "
        f"in {summary['seconds']:.1f} s -> {out_dir}"
    )
    print(text + "\n" + line, flush=True)
    log.info(line)
    if totals["total"] == 0:
        raise ValueError(f"the instruction mix is empty: every row was set aside; see {join_path(out_dir, FAILED_DIR)}")
    return out_dir
