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

Output ``cfg.layout.instruct_dir`` (default ``<run_dir>/instruct``): one version folder per build,
``mix-<time>-<random>/`` with ``part-*.parquet`` (:data:`MIX_SCHEMA`, both splits, a ``split`` column), ``failed/``
(rows set aside, with the reason), ``summary.json``, ``config.yaml`` and ``manifest.json``; and ``CURRENT``, which
names the published version. A re-run builds a new version and switches ``CURRENT`` last, so a reader never sees
half a mix (see "publishing" below).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from meddr_ray import prompts, storage
from meddr_ray.config import Config, ConfigError, save_config, validate
from meddr_ray.data import NO_FINDING, medmnist_info, read_source
from meddr_ray.data.errors import sample_where, where
from meddr_ray.layout import CURRENT_FILE, FAILED_DIR
from meddr_ray.progress import report
from meddr_ray.prompts import DEFAULT_MODALITY
from meddr_ray.report_sections import split_report
from meddr_ray.stages.parts import part_files
from meddr_ray.stages.registry import StageResult
from meddr_ray.stages.runtime import init_ray
from meddr_ray.storage import join_path

log = logging.getLogger("meddr_ray.stages.instruct")

TASK_GUIDED_REPORT = "guided_report"
TASK_DIAGNOSIS = "diagnosis"
TASK_VQA = "vqa"
TASK_REPORT = "report"
TASK_DESCRIPTION = "description"
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
            out.append(set_aside(row, None, f"{sample_where(row, full_path=True)}: {exc}"))
    return pa.Table.from_pylist(out, schema=_RENDERED_SCHEMA)


def _render_bootstrap(batch: pa.Table, *, weight: float, val_fraction: float, keep_quality: List[str]) -> pa.Table:
    """Ray task: bootstrapped report rows -> guided-report mix rows; reports of unwanted quality set aside."""
    out: List[Dict[str, Any]] = []
    for row in batch.to_pylist():
        here = f"bootstrap {where(row.get('dataset'), row.get('source_index'))}"
        if row.get("quality") not in keep_quality:
            out.append(set_aside(row, TASK_GUIDED_REPORT, f"{here}: report quality {row.get('quality')!r} is not "
                                 f"in instruct.bootstrap_quality {keep_quality}"))  # fmt: skip
            continue
        try:
            if not row.get("image"):
                raise RowError("no image")
            out.extend(expand(row, [bootstrap_instruction(row)], weight, val_fraction))
        except RowError as exc:
            out.append(set_aside(row, TASK_GUIDED_REPORT, f"{here}: {exc}"))
    return pa.Table.from_pylist(out, schema=_RENDERED_SCHEMA)


def _good(ds):
    from ray.data.expressions import col

    return ds.filter(expr=col("error").is_null())


def _bad(ds):
    from ray.data.expressions import col

    return ds.filter(expr=col("error").is_not_null())


def cap_threshold(ds, cap: Optional[int], name: str) -> Tuple[Optional[float], int]:
    """The rank at or below which ``cap`` good rows of ``ds`` lie, and how many rows the cap drops (None, 0: no
    cap, or fewer rows than the cap). Streams the good rows' ``rank`` column alone (the render step fuses with
    the projection, so no image leaves it); the driver keeps the ``cap`` lowest ranks seen so far, never the rows."""
    if cap is None:
        return None, 0
    lowest, total = np.zeros(0), 0
    for batch in _good(ds).select_columns(["rank"]).iter_batches(batch_size=65536, batch_format="numpy"):
        total += len(batch["rank"])
        lowest = np.concatenate([lowest, batch["rank"]])
        if len(lowest) > cap:
            lowest = np.partition(lowest, cap - 1)[:cap] if cap > 0 else np.zeros(0)
    if total <= cap:
        return None, 0
    log.info("instruct: source %s capped at %d of %d rows", name, cap, total)
    return (float(lowest.max()) if cap > 0 else -1.0), total - cap


def _within_cap(ds, threshold: Optional[float]):
    """Every set-aside row, and the good rows at or below the cap's rank."""
    if threshold is None:
        return ds
    from ray.data.expressions import col

    return ds.filter(expr=col("error").is_not_null() | (col("rank") <= threshold))


def _bootstrap_dataset(cfg: Config):
    import ray

    folder = cfg.layout.bootstrap_dir
    files = part_files(folder)
    if not files:
        raise FileNotFoundError(
            f"no bootstrapped reports at {folder}: run `meddr-ray bootstrap` first, or set instruct.use_bootstrap=false"
        )
    columns = ["id", "dataset", "split", "source_index", "modality", "label", "image", "report", "quality"]
    return ray.data.read_parquet(files, columns=columns)


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



# ------------------------------------------------------------------------------------------------ writing


def mix_sink(version_dir: str):
    """A Ray Data sink of rendered rows into ``version_dir``: each write task streams its blocks into one Parquet
    file of instructions (:data:`MIX_SCHEMA`) and, if it has set-aside rows, one under ``failed/``, and returns
    its files and its counts per group (``sink.results`` once written): the driver sums counts, never reads rows.
    File names are ``part-<write id>-<task index>``: a retried task rewrites its own file, never adds one."""
    from ray.data import Datasink

    class _MixSink(Datasink):
        def __init__(self):
            self.version_dir = version_dir
            self.write_id = uuid.uuid4().hex[:8]
            self.results: List[Dict[str, Any]] = []

        def write(self, blocks, ctx) -> Dict[str, Any]:
            return _write_blocks(blocks, self.version_dir, f"part-{self.write_id}-{ctx.task_idx:06d}.parquet")

        def on_write_complete(self, write_result) -> None:
            self.results = [r for r in write_result.write_returns if r]

        def get_name(self) -> str:
            return "InstructionMix"

    return _MixSink()


_DIGEST_MOD = 1 << 64


def row_digest(row: Dict[str, Any]) -> int:
    """A 64-bit hash of one instruction row, every :data:`MIX_SCHEMA` column (the image's bytes included)."""
    h = hashlib.blake2b(digest_size=8)
    for name in MIX_SCHEMA.names:
        value = row.get(name)
        data = value if isinstance(value, bytes) else ("\x00" if value is None else str(value)).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


def content_fingerprint(digest_sum: int, rows: int) -> str:
    """The mix's fingerprint from the sum of its rows' digests (mod 2**64): the same rows give the same
    fingerprint whatever files, order or write tasks hold them, so rebuilding an unchanged mix does not make a
    training run's checkpoints look stale, while any changed, added or removed row does."""
    return hashlib.sha256(f"{digest_sum % _DIGEST_MOD}:{rows}".encode()).hexdigest()[:16]


def _write_blocks(blocks, version_dir: str, name: str) -> Dict[str, Any]:
    """One write task: good rows -> ``<version>/<name>``, set-aside rows -> ``<version>/failed/<name>``, block by
    block (memory bounded by a block); returns the files written and the counts by group."""
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor

    fs, root = storage.resolve(version_dir)
    writers: Dict[str, Any] = {}
    rows = {"mix": 0, "failed": 0}
    digest_sum = 0
    good_counts: Dict[Tuple[str, str, str], int] = {}
    bad_counts: Dict[Tuple[str, str], int] = {}
    try:
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            is_bad = table.column("error").is_valid()
            for kind, part, columns, schema in (
                ("mix", table.filter(pc.invert(is_bad)), MIX_SCHEMA.names, MIX_SCHEMA),
                ("failed", table.filter(is_bad), FAILED_COLUMNS, None),
            ):
                if part.num_rows == 0:
                    continue
                part = part.select(columns)
                part = part.cast(schema) if schema is not None else part
                if kind not in writers:
                    path = f"{root}/{name}" if kind == "mix" else f"{root}/{FAILED_DIR}/{name}"
                    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                    writers[kind] = (path, pq.ParquetWriter(fs.open_output_stream(path), part.schema))
                writers[kind][1].write_table(part)
                rows[kind] += part.num_rows
                if kind == "mix":
                    digest_sum = (digest_sum + sum(map(row_digest, part.to_pylist()))) % _DIGEST_MOD
                keys = ["task", "dataset", "split"] if kind == "mix" else ["task", "dataset"]
                counts = good_counts if kind == "mix" else bad_counts
                for r in part.select(keys).group_by(keys).aggregate([([], "count_all")]).to_pylist():
                    key = tuple(r[k] for k in keys)
                    counts[key] = counts.get(key, 0) + r["count_all"]
    finally:
        for _, writer in writers.values():
            writer.close()
    files = {}
    for kind, (path, _) in writers.items():
        files[kind] = {"file": path[len(root) + 1:], "rows": rows[kind], "bytes": fs.get_file_info(path).size}
    return {"files": files, "digest_sum": digest_sum, "counts": [[*k, n] for k, n in good_counts.items()],
            "set_aside": [[*k, n] for k, n in bad_counts.items()]}  # fmt: skip


# --------------------------------------------------------------------------------------------- publishing
#
# <stage_dir>/CURRENT names the published version (<stage_dir>/mix-<time>-<random>/: part-*.parquet, failed/,
# summary.json, config.yaml, manifest.json). A build writes a new version folder and switches CURRENT last (a
# local temporary file renamed over it; on an object store one PUT, which is atomic there): no folder is ever
# renamed, and a crash at any step leaves CURRENT naming a whole version. A version no CURRENT names is a
# leftover of a killed build and the only thing ever deleted.

MANIFEST_FILE = "manifest.json"
VERSION_PREFIX = "mix-"
_OLD_LAYOUT = (SUMMARY_FILE, "config.yaml", FAILED_DIR)  # what earlier versions wrote next to the Parquet files


class MixNotFoundError(FileNotFoundError):
    """No published instruction mix where one is needed; the message names the folder."""


@dataclass
class PublishedMix:
    """The instruction mix a reader uses: the version ``CURRENT`` names (or a plain folder of Parquet files)."""

    folder: str  # the stage folder (instruct.output_dir)
    version: Optional[str]  # None: a plain folder of Parquet files (written by hand or by an earlier release)
    path: str  # the folder holding the files
    files: List[str]  # the Parquet files of instructions, in reading order
    sizes: List[int]  # their sizes in bytes
    rows: Dict[str, int]  # rows per split ({} when not recorded: a plain folder)
    fingerprint: str  # of the rows (published versions) or of file names and sizes (a plain folder)


def _fingerprint(names: List[str], sizes: List[int]) -> str:
    return hashlib.sha256(json.dumps([[n, s] for n, s in zip(names, sizes)]).encode()).hexdigest()[:16]


def current_version(folder: str) -> Optional[str]:
    """The version ``CURRENT`` names, or None when nothing has been published there."""
    return storage.read_pointer(join_path(folder, CURRENT_FILE))


def published_mix(folder: str) -> PublishedMix:
    """The published mix at ``folder`` (``instruct.output_dir``): the version ``CURRENT`` names, each file
    checked against its manifest; without ``CURRENT``, the ``*.parquet`` files directly in ``folder``.
    :class:`MixNotFoundError` naming the folder when there is none."""
    version = current_version(folder)
    if version is None:
        files = storage.list_files(folder, ".parquet")
        if not files:
            raise MixNotFoundError(f"no instruction mix at {folder} (no {CURRENT_FILE}, no .parquet files)")
        sizes = [_size(f) for f in files]
        return PublishedMix(folder, None, folder, files, sizes, {}, _fingerprint([_base_name(f) for f in files], sizes))
    path = join_path(folder, version)
    manifest_path = join_path(path, MANIFEST_FILE)
    if not storage.exists(manifest_path):
        raise MixNotFoundError(f"{join_path(folder, CURRENT_FILE)} names {version}, which has no {MANIFEST_FILE}: "
                               "rebuild the mix with `meddr-ray instruct`")  # fmt: skip
    manifest = json.loads(storage.read_text(manifest_path))
    files, sizes = [], []
    for entry in manifest["files"]:
        f = join_path(path, entry["file"])
        size = _size(f)
        if size != entry["bytes"]:
            raise MixNotFoundError(f"{f}: {'missing' if size is None else f'{size} bytes'}, but {manifest_path} "
                                   f"lists {entry['bytes']} bytes: rebuild the mix with `meddr-ray instruct`")  # fmt: skip
        files.append(f)
        sizes.append(size)
    return PublishedMix(folder, version, path, files, sizes, dict(manifest["rows"]), manifest["fingerprint"])


def published_mix_files(folder: str) -> List[str]:
    """The Parquet files of the published mix at ``folder``: :func:`published_mix`'s list, with its one error
    (:class:`MixNotFoundError`, which each caller completes with its own way out)."""
    return published_mix(folder).files


def _size(path: str) -> Optional[int]:
    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    return info.size if info.type == pafs.FileType.File else None


def _base_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def remove_unpublished(folder: str) -> List[str]:
    """Delete what no ``CURRENT`` names: version folders of killed or replaced builds, a pointer's temporary
    files, and (once a version is published) the files of the old one-folder layout. Returns what it removed."""
    fs, root = storage.resolve(folder)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    named = current_version(folder)
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        name = info.base_name
        unnamed_version = info.type == pafs.FileType.Directory and name.startswith(VERSION_PREFIX) and name != named
        stale_pointer = name.startswith(f"{CURRENT_FILE}.tmp-")
        old_layout = named is not None and (name in _OLD_LAYOUT or (name.endswith(".parquet") and
                                                                   info.type == pafs.FileType.File))  # fmt: skip
        if unnamed_version or stale_pointer or old_layout:
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)
            removed.append(name)
    return removed


def _publish(folder: str, version: str, results: List[Dict[str, Any]], summary: Dict[str, Any]) -> None:
    """Write the version's manifest, then switch ``CURRENT`` to it, then remove what nothing names."""
    path = join_path(folder, version)
    entries = sorted((r["files"]["mix"] for r in results if "mix" in r["files"]), key=lambda e: e["file"])
    rows: Dict[str, int] = {}
    for r in results:
        for _, _, split, n in r["counts"]:
            rows[split] = rows.get(split, 0) + n
    manifest = {
        "version": version,
        "files": entries,
        "rows": rows,
        "fingerprint": content_fingerprint(sum(r["digest_sum"] for r in results), sum(e["rows"] for e in entries)),
        "created": summary["finished"],
    }
    storage.write_text(join_path(path, MANIFEST_FILE), json.dumps(manifest, indent=2, sort_keys=True))
    storage.write_pointer(join_path(folder, CURRENT_FILE), version)
    removed = remove_unpublished(folder)
    if removed:
        log.info("instruct: removed %s from %s (no longer published)", removed, folder)


# ---------------------------------------------------------------------------------------------- the stage


def run_instruct(cfg: Config) -> StageResult:
    """Build the instruction mix of ``cfg.instruct`` and publish it; returns the stage folder."""
    ic = cfg.instruct
    if not ic.sources and not ic.use_bootstrap:
        raise ConfigError("key 'instruct.sources': nothing to mix (no sources and instruct.use_bootstrap is false)")
    validate(cfg)  # again: a config changed after loading (val_fraction in [0, 1), ...)
    out_dir = cfg.layout.instruct_dir
    storage.makedirs(out_dir)
    with storage.run_lock(out_dir):  # a second build in this folder would delete this one's version as a leftover
        return _build(cfg, out_dir)


def _rendered_sources(cfg: Config) -> List[Tuple[str, Any, Optional[int]]]:
    """``(name, rendered rows, cap)`` per input: the bootstrapped reports (checked first: a missing folder fails
    before any source is read), then every ``instruct.sources`` entry. Lazy Datasets: nothing runs yet."""
    ic = cfg.instruct
    parts = []
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
    return parts


def _capped_mix(parts: List[Tuple[str, Any, Optional[int]]]) -> Tuple[Any, Dict[str, int]]:
    """Every input within its cap, as one Dataset; and how many rows each cap dropped."""
    capped, streams = {}, []
    for name, ds, cap in parts:  # a capped source is rendered twice: once for its ranks, once to write
        threshold, capped[name] = cap_threshold(ds, cap, name)
        streams.append(_within_cap(ds, threshold))
    return (streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]), capped


def _new_version_name() -> str:
    return f"{VERSION_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _mix_summary(cfg: Config, out_dir: str, version: str, results: List[Dict[str, Any]], capped: Dict[str, int],
                 seconds: float) -> Dict[str, Any]:  # fmt: skip
    """The accounting of one built version (its ``summary.json``), from the write tasks' counts."""
    good = [{"task": t, "dataset": d, "split": s, "count()": n} for r in results for t, d, s, n in r["counts"]]
    table = summary_table(good)
    set_aside: Dict[Tuple[str, str], int] = {}
    for r in results:
        for t, d, n in r["set_aside"]:
            set_aside[(t, d)] = set_aside.get((t, d), 0) + n
    totals = {s: sum(r[s] for r in table) for s in ("train", "val", "total")}
    return {
        "output_dir": out_dir,
        "version": version,
        "rows": totals["total"],
        "train": totals["train"],
        "val": totals["val"],
        "set_aside": sum(set_aside.values()),
        "set_aside_by": [{"task": t, "dataset": d, "count": n}
                         for (t, d), n in sorted(set_aside.items(), key=lambda kv: [str(k) for k in kv[0]])],
        "capped": capped,
        "by_task_dataset": table,
        "val_fraction": cfg.instruct.val_fraction,
        "seconds": round(seconds, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip


def _headline(summary: Dict[str, Any], version_dir: str) -> str:
    n_bad = summary["set_aside"]
    failed_dir = join_path(version_dir, FAILED_DIR)
    return (
        f"instruct: {summary['rows']} instructions ({summary['train']} train, {summary['val']} val), "
        f"{n_bad} rows set aside{f' (see {failed_dir})' if n_bad else ''}, "
        f"capped {sum(summary['capped'].values())}, "
        f"in {summary['seconds']:.1f} s -> {version_dir}"
    )


def _build(cfg: Config, out_dir: str) -> StageResult:
    """Render, write and publish one new version of the mix in ``out_dir`` (the caller holds its lock)."""
    started = time.perf_counter()
    remove_unpublished(out_dir)
    init_ray(cfg)
    mix, capped = _capped_mix(_rendered_sources(cfg))

    version = _new_version_name()
    version_dir = join_path(out_dir, version)
    storage.makedirs(version_dir)
    sink = mix_sink(version_dir)
    mix.write_datasink(sink)

    summary = _mix_summary(cfg, out_dir, version, sink.results, capped, time.perf_counter() - started)
    storage.write_text(join_path(version_dir, SUMMARY_FILE), json.dumps(summary, indent=2, sort_keys=True))
    save_config(cfg, version_dir)
    _publish(out_dir, version, sink.results, summary)

    report("instruct", format_table(summary["by_task_dataset"]))
    if summary["rows"] == 0:
        failed_dir = join_path(version_dir, FAILED_DIR)
        raise ValueError(f"the instruction mix is empty: every row was set aside; see {failed_dir}")
    return StageResult(out_dir, summary, _headline(summary, version_dir))
