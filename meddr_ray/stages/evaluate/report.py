"""The evaluation's outputs: ``metrics.json``, ``report.md`` (the paper's Table 4 shape) and the PNG plots.

Every figure is computed from the prediction files' small columns (:data:`scoring.SUMMARY_COLUMNS`: ids, modes,
option numbers, per-row scores), never from images or prompts; ``report.md`` only formats ``metrics.json``. The
plots, and the retrieval figure that needs a few images, are drawn in one Ray task (images are never decoded on
the driver).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from meddr_ray import metrics as mm
from meddr_ray import storage
from meddr_ray.config import Config
from meddr_ray.layout import FAILED_DIR, PREDICTIONS_DIR
from meddr_ray.data.common import default_task
from meddr_ray.stages.evaluate import figures, scoring
from meddr_ray.stages.evaluate.schema import MODE_ORDER, MODE_TITLES, PREDICTION_SCHEMA, TABLE4_ROWS
from meddr_ray.stages.parts import part_files, read_columns
from meddr_ray.storage import join_path

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"

METRIC_NAMES = {
    "accuracy": "Accuracy (macro)↑", "accuracy_micro": "Accuracy (micro)↑", "macro_f1": "Macro-F1↑",
    "bleu1": "BLEU-1↑", "closed_acc": "Closed Q Acc↑",
    "open_recall": "Open Q Recall↑", "recall": "Recall↑", "open_acc": "Open Q Acc↑", "f1": "F1↑",
    "f1_radgraph": "F1-RadGraph↑", "bleu4": "BLEU-4↑", "rouge1": "ROUGE-1↑", "rougeL": "ROUGE-L↑",
    "radcliq": "RadCliQ↓", "chexbert_similarity": "CheXbert vector↑", "meteor": "METEOR↑",
}  # fmt: skip

# The paper's Table 4, MedDr's columns: metric -> (voting, w/o RAG, w/ RAG); None where the paper has "-".
PAPER_TABLE4: Dict[str, Tuple[str, Dict[str, Tuple[Optional[float], float, float]]]] = {
    "ham10000": ("HAM10000", {"accuracy": (0.707, 0.668, 0.690), "macro_f1": (0.451, 0.332, 0.395)}),
    "octmnist": ("OCT-MNIST", {"accuracy": (0.682, 0.675, 0.692), "macro_f1": (0.633, 0.583, 0.661)}),
    "pneumoniamnist": ("Pneumonia-MNIST", {"accuracy": (0.905, 0.870, 0.929), "macro_f1": (0.895, 0.873, 0.926)}),
    "breastmnist": ("Breast-MNIST", {"accuracy": (0.820, 0.718, 0.878), "macro_f1": (0.742, 0.661, 0.842)}),
    "bloodmnist": ("Blood-MNIST", {"accuracy": (0.969, 0.050, 0.955), "macro_f1": (0.969, 0.027, 0.954)}),
    "organamnist": ("OrganA-MNIST", {"accuracy": (0.890, 0.259, 0.846), "macro_f1": (0.879, 0.207, 0.822)}),
    "slake": ("Slake-VQA", {
        "bleu1": (None, 0.764, 0.774), "closed_acc": (None, 0.834, 0.862), "open_recall": (None, 0.742, 0.743),
        "recall": (None, 0.772, 0.783), "open_acc": (None, 0.705, 0.703), "f1": (None, 0.775, 0.785)}),
    "iuxray": ("IU-Xray", {
        "f1_radgraph": (0.311, 0.331, 0.352), "bleu1": (0.407, 0.377, 0.418), "bleu4": (0.124, 0.122, 0.138),
        "rouge1": (0.367, 0.394, 0.405), "rougeL": (0.268, 0.283, 0.296), "radcliq": (1.059, 1.006, 0.968),
        "chexbert_similarity": (0.535, 0.564, 0.575), "meteor": (0.340, 0.323, 0.341)}),
}  # fmt: skip
_PAPER_ALIASES = {"slakevqa": "slake", "slake": "slake", "iuxray": "iuxray", "openi": "iuxray"}

def paper_entry(dataset: str) -> Optional[Tuple[str, Dict[str, Tuple[Optional[float], float, float]]]]:
    """The paper's Table 4 figures for a dataset name of this project (``breastmnist``, ``slake``, ...)."""
    key = re.sub(r"[^a-z0-9]", "", re.sub(r"_\d+$", "", dataset.strip().lower()))
    return PAPER_TABLE4.get(_PAPER_ALIASES.get(key, key))


@dataclasses.dataclass
class RunContext:
    """What the stage knows about the run besides the prediction files."""

    cfg: Config
    out_dir: str
    run_key: str
    student_path: str
    adapter: Optional[str]
    adapter_folder: str
    adapter_meta: Optional[dict]
    manifest: Optional[dict]
    run: Dict[str, Any]


# ------------------------------------------------------------------------------------------------ metrics


def _prediction_files(out_dir: str):
    """Every prediction file of ``out_dir`` as one pyarrow dataset, or None before anything was answered."""
    import pyarrow.dataset as pads

    files = part_files(join_path(out_dir, PREDICTIONS_DIR))
    if not files:
        return None
    fs, _ = storage.resolve(files[0])
    return pads.dataset([storage.resolve(f)[1] for f in files], format="parquet", filesystem=fs,
                        schema=PREDICTION_SCHEMA)  # fmt: skip


def _predictions(out_dir: str, columns: Sequence[str], filter=None) -> pa.Table:
    """Columns of every prediction file (optionally filtered while reading)."""
    ds = _prediction_files(out_dir)
    if ds is None:
        return pa.schema([PREDICTION_SCHEMA.field(c) for c in columns]).empty_table()
    return ds.to_table(columns=list(columns), filter=filter)


def dataset_metrics(cfg: Config, out_dir: str) -> Dict[str, Dict[str, Any]]:
    """Every figure of every configured dataset in every mode, from the prediction files' small columns, read one
    dataset at a time (the driver holds one dataset's ids and per-row scores, not every dataset's)."""
    failed = read_columns(join_path(out_dir, FAILED_DIR), ["id", "dataset"])
    out: Dict[str, Dict[str, Any]] = {}
    for src in cfg.evaluate.sources:
        entry = out.setdefault(src.name, {"splits": [], "failed": 0, "modes": {}})
        entry["splits"] = sorted(set(entry["splits"]) | set(src.splits))
    configured = {src.name: default_task(src) for src in cfg.evaluate.sources}  # one task per name (stage._check)
    for name, entry in out.items():
        rows = _predictions(out_dir, scoring.SUMMARY_COLUMNS, pc.field("dataset") == name)
        entry["task"] = configured[name]  # also when no row was answered (limit 0, a split the file lacks)
        entry["failed"] = int(pc.sum(pc.equal(failed.column("dataset"), name)).as_py() or 0) if failed.num_rows else 0
        entry["n"] = len(pc.unique(rows.column("id")))
        if entry["task"] == "diagnosis":
            entry["labels"] = _options(out_dir, name)
        for mode in scoring.MODES:
            part = rows.filter(pc.equal(rows.column("mode"), mode))
            if part.num_rows:
                entry["modes"][mode] = scoring.summarize(entry["task"], part, len(entry.get("labels") or []))
    return out


def _options(out_dir: str, dataset: str) -> List[str]:
    """The options a diagnosis dataset's prompts offered (its first answered row's), in order."""
    ds = _prediction_files(out_dir)
    if ds is None:  # nothing answered yet (an empty source)
        return []
    first = ds.head(1, columns=["options"], filter=(pc.field("dataset") == dataset) & pc.field("options").is_valid())
    return list(first.column("options")[0].as_py() or []) if first.num_rows else []


def unavailable_metrics(datasets: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """Metrics this evaluation cannot compute, with the reason, as the summaries report them (the model-based
    report metrics always; METEOR when WordNet or Punkt is missing)."""
    out: Dict[str, str] = {}
    for d in datasets.values():
        for summary in d["modes"].values():
            for name, reason in (summary.get("unavailable") or {}).items():
                out.setdefault(name, reason)
    return out


def build_metrics(ctx: RunContext, datasets: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    cfg, manifest = ctx.cfg, ctx.manifest
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "eval_dir": ctx.out_dir,
        "run_dir": cfg.run_dir,
        "preset": cfg.preset,
        "config_fingerprint": cfg.fingerprint(),
        "run_key": ctx.run_key,
        "student": {
            "name": cfg.student.name,
            "path": ctx.student_path,
            "adapter_dir": ctx.adapter,
            "adapter_meta": ctx.adapter_meta,
            "base_model": ctx.adapter is None,
            "note": None if ctx.adapter else f"no trained adapter at {ctx.adapter_folder}: the base student answered",
        },
        "index": None if manifest is None else {
            "dir": cfg.layout.index_dir, "version": manifest["version"], "path": manifest["path"],
            "count": manifest["count"], "dim": manifest["dim"], "faiss_type": manifest.get("faiss_type"),
            "encoder_fingerprint": manifest["encoder_fingerprint"], "model_name": manifest.get("model_name"),
            "adapter_dir": manifest.get("adapter_dir"), "created": manifest.get("created"),
        },  # fmt: skip
        "modes": list(cfg.evaluate.modes),
        "rag": dataclasses.asdict(cfg.rag),
        "generation": dataclasses.asdict(cfg.evaluate.generation),
        "task_max_new_tokens": dict(cfg.evaluate.task_max_new_tokens),
        "wordnet": dict(zip(("available", "detail"), mm.wordnet_status())),
        "meteor": dict(zip(("available", "detail"), mm.meteor_status())),
        "unavailable": unavailable_metrics(datasets),
        "run": ctx.run,
        "predictions": "predictions/",
        "datasets": datasets,
    }


def summary_line(metrics: Dict[str, Any]) -> str:
    run = metrics["run"]
    parts = []
    for name, d in metrics["datasets"].items():
        key = {"diagnosis": "accuracy", "vqa": "recall", "report": "bleu1"}.get(d.get("task"))
        figures = ", ".join(f"{MODE_TITLES[m]} {_fmt(s.get(key))}" for m, s in d["modes"].items())
        unscored = max([s.get("not_scored") or 0 for s in d["modes"].values()] or [0])
        if unscored:  # references outside the label set: in no figure, so said here and not only in report.md
            figures += f" ({unscored} rows not scored: their reference is not one of the options)"
        parts.append(f"{name} ({d.get('task')}, n={d.get('n', 0)}) {key}: {figures}" if figures else
                     f"{name} ({d.get('task')}): {_no_rows(d)}")  # fmt: skip
    before = run.get("skipped_failed") or 0  # not answered again until failed/ is deleted: say so on every run
    return (
        f"evaluate: {run['written']} rows answered, {run['skipped']} skipped (already done), {run['failed']} failed "
        + (f"(+{before} set aside by an earlier run: delete failed/ to retry them) " if before else "")
        + f"in {run['seconds']:.1f} s ({run['rows_per_s']:.2f} rows/s); " + "; ".join(parts)
    )


# ------------------------------------------------------------------------------------------------ report.md


def _no_rows(d: Dict[str, Any]) -> str:
    """Why a configured dataset has no figures: said wherever its figures would be, never left blank."""
    failed = f"all {d['failed']} set aside as bad rows (failed/)" if d.get("failed") else "none read"
    return f"NO ROWS ANSWERED ({failed}: limit 0, or no row in splits {d.get('splits')}?)"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table4_rows(metrics: Dict[str, Any]) -> List[List[str]]:
    """Rows ``[dataset, metric, voting, w/o RAG, w/ RAG, paper voting, paper w/o RAG, paper w/ RAG]``."""
    rows = []
    unavailable = metrics.get("unavailable", {})
    for name, d in metrics["datasets"].items():
        task = d.get("task")
        if task is None:
            continue
        paper = paper_entry(name)
        for i, key in enumerate(TABLE4_ROWS[task]):
            ours = []
            for mode in MODE_ORDER:
                summary = d["modes"].get(mode)
                if summary is None:
                    ours.append("-")
                elif key in unavailable and summary.get(key) is None:
                    ours.append("unavailable")
                else:
                    ours.append(_fmt(summary.get(key)))
            theirs = [_fmt(v) for v in paper[1].get(key, (None, None, None))] if paper else ["", "", ""]
            label = f"{name} (n={d.get('n', 0)})" if i == 0 else ""
            rows.append([label, METRIC_NAMES.get(key, key), *ours, *theirs])
    return rows


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(metrics: Dict[str, Any], plots: Dict[str, Any]) -> str:
    st, ix = metrics["student"], metrics["index"]
    out = [f"# Evaluation: {metrics['run_dir']}", ""]
    out.append(f"- student: `{st['name']}` ({st['path']})"
               + (f" + adapter `{st['adapter_dir']}`" if st["adapter_dir"] else f" — **base model**: {st['note']}"))
    out.append(f"- index: version `{ix['version']}` of `{ix['dir']}`, {ix['count']} cases, {ix['faiss_type']}"
               if ix else "- index: none (modes without retrieval)")  # fmt: skip
    out.append(f"- modes: {', '.join(metrics['modes'])}; retrieval: top-{metrics['rag']['top_k_diagnosis']} labels "
               f"(diagnosis), top-{metrics['rag']['top_k_vqa']} text (VQA), top-{metrics['rag']['top_k_report']} "
               f"report (report generation)")  # fmt: skip
    out.append(f"- config fingerprint `{metrics['config_fingerprint']}`, run key `{metrics['run_key']}`, "
               f"written {metrics['created']}; WordNet: {_wordnet_text(metrics['wordnet'])}")
    run = metrics["run"]
    out.append(f"- this run: {run['written']} rows answered, {run['skipped']} already done, {run['failed']} failed, "
               f"{run['seconds']:.1f} s ({run['rows_per_s']:.2f} rows/s)")
    out += ["", "## Retrieval-augmented diagnosis (the paper's Table 4)", "",
            "Metrics as MultiMedEval defines them (`meddr_ray/metrics.py`). The last three columns are the paper's "
            "MedDr figures from its Table 4 (He et al. 2024), copied for reference where the paper reports that "
            "dataset; they come from a 40B model trained on the full data, not from this run.", ""]  # fmt: skip
    header = ["dataset", "metric", "voting", "w/o RAG", "w/ RAG", "paper: voting", "paper: w/o RAG", "paper: w/ RAG"]
    out += [_md_table(header, table4_rows(metrics)), ""]
    if any(d.get("task") == "diagnosis" for d in metrics["datasets"].values()):
        out += ["Accuracy (macro) is MultiMedEval's (which the paper follows): torchmetrics' macro accuracy, the mean of the "
                "per-class recalls (balanced accuracy). Accuracy (micro), the share of correct answers, is in the "
                "diagnosis table below and `accuracy_micro` in metrics.json; the two differ when classes are "
                "unbalanced.", ""]  # fmt: skip
    out += [f"- **{name}**: {_no_rows(d)}" for name, d in metrics["datasets"].items() if not d["modes"]]
    out += [""] if any(not d["modes"] for d in metrics["datasets"].values()) else []
    out += _task_sections(metrics)
    if metrics["unavailable"]:
        out += ["## Unavailable metrics", ""]
        out += [f"- **{METRIC_NAMES.get(k, k)}**: {v}" for k, v in sorted(metrics["unavailable"].items())] + [""]
    out += ["## Plots", ""]
    for name in plots.get("files", []):
        out.append(f"![{name}]({name})")
    out += [f"- {note}" for note in plots.get("notes", [])]
    out += ["", "## Tracing a number to its rows", ""] + _tracing(metrics)
    return "\n".join(out) + "\n"


def _tracing(metrics: Dict[str, Any]) -> List[str]:
    """How to recompute a figure of this report from its prediction rows (with the run's own first dataset)."""
    name, d = next(iter(metrics["datasets"].items()))
    mode = "rag" if "rag" in d["modes"] else next(iter(d["modes"]), "no_rag")
    head = [
        "Every figure above is computed from `predictions/*.parquet`: one row per test sample and mode with the "
        "prompt, the output, the mapped option, the reference, the per-row scores and the retrieved neighbours' "
        "ids, labels and similarities. For example:", "", "```python",
        "import json, pyarrow.dataset as ds, pyarrow.compute as pc", "from meddr_ray import metrics",
        f"t = ds.dataset('{metrics['eval_dir']}/predictions').to_table(",
        f"    filter=(pc.field('dataset') == '{name}') & (pc.field('mode') == '{mode}'))",
    ]  # fmt: skip
    if d.get("task") == "diagnosis":
        body = [
            f"s = metrics.classification_summary(t['true_index'].to_pylist(), t['pred_index'].to_pylist(), "
            f"{len(d.get('labels') or [])})",
            f"# s['accuracy'], s['macro_f1'] = metrics.json datasets.{name}.modes.{mode}; the rows of a confusion",
            "# cell: t.filter((pc.field('true_index') == i) & (pc.field('pred_index') == j))",
        ]  # fmt: skip
    else:
        summary = "vqa_summary" if d.get("task") == "vqa" else "report_summary"
        body = [f"s = metrics.{summary}(json.loads(x) for x in t['scores'].to_pylist())",
                f"# = metrics.json datasets.{name}.modes.{mode}"]  # fmt: skip
    tail = [
        "```", "",
        "Diagnosis accuracy is MultiMedEval's (torchmetrics' macro accuracy: the mean of the per-class recalls); "
        "the share of correct answers is `accuracy_micro` in metrics.json. VQA and report figures are means of the "
        "per-row `scores`. A voting row's `output` is `rag.vote` over the first `top_k` distinct labelled images of "
        "its `neighbour_ids` (diagnosis) or the top-1 retrieved report, `rag.vote_report` (report generation).", "",
    ]  # fmt: skip
    return head + body + tail


def _wordnet_text(status: Dict[str, Any]) -> str:
    return f"{'found' if status['available'] else 'missing'} ({status['detail']})"


def _task_sections(metrics: Dict[str, Any]) -> List[str]:
    titles = {"diagnosis": "Medical image diagnosis", "vqa": "Visual question answering", "report": "Report generation"}
    out: List[str] = []
    for task, title in titles.items():
        names = [n for n, d in metrics["datasets"].items() if d.get("task") == task]
        if not names:
            continue
        keys = [k for k in TABLE4_ROWS[task] if k not in metrics["unavailable"] or k == "meteor"]
        extra = ["accuracy_micro", "not_scored"] if task == "diagnosis" else []
        rows = []
        for name in names:
            d = metrics["datasets"][name]
            for mode, s in d["modes"].items():
                rows.append([name, MODE_TITLES[mode], _fmt(s.get("n", s.get("rows"))), str(d.get("failed", 0)),
                             *[_fmt(s.get(k)) for k in keys + extra]])  # fmt: skip
        out += [f"## {title}", "", _md_table(["dataset", "mode", "n", "failed",
                                              *[METRIC_NAMES.get(k, k) for k in keys + extra]], rows), ""]  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------- all


def figure_cases(ctx: RunContext) -> List[Dict[str, Any]]:
    """A few queries for the retrieval figure, spread over the datasets (the smallest ids of each, so the same
    run always shows the same ones), with their retrieved neighbours; only their rows are read."""
    n = ctx.cfg.evaluate.figure_examples
    if n <= 0 or ctx.manifest is None:
        return []
    mode = "rag" if "rag" in ctx.cfg.evaluate.modes else "voting"
    keys = _predictions(ctx.out_dir, ["id", "dataset"], pc.field("mode") == mode)
    by_dataset: Dict[str, List[str]] = {}
    for name in sorted(set(keys.column("dataset").to_pylist())):
        ids = keys.filter(pc.equal(keys.column("dataset"), name)).column("id")
        by_dataset[name] = sorted(ids.to_pylist())[:n]
    picked: List[str] = []
    while len(picked) < n and any(by_dataset.values()):
        for ids in by_dataset.values():
            if ids and len(picked) < n:
                picked.append(ids.pop(0))
    columns = ["id", "dataset", "split", "task", "source_file", "source_index", "reference", "output", "pred_label",
               "neighbour_ids", "neighbour_scores", "neighbour_labels"]  # fmt: skip
    rows = _predictions(ctx.out_dir, columns, (pc.field("mode") == mode) & pc.field("id").isin(picked)).to_pylist()
    order = {i: k for k, i in enumerate(picked)}
    return sorted(rows, key=lambda r: order[r["id"]])


def write_all(ctx: RunContext) -> Dict[str, Any]:
    """metrics.json, the plots (in a Ray task) and report.md; returns the metrics."""
    import ray

    datasets = dataset_metrics(ctx.cfg, ctx.out_dir)
    metrics = build_metrics(ctx, datasets)
    draw = ray.remote(num_cpus=1, max_retries=1)(figures.draw_all)
    plots = ray.get(draw.remote(metrics, figure_cases(ctx), ctx.cfg, ctx.out_dir, ctx.manifest))
    metrics["plots"] = plots
    storage.write_text(join_path(ctx.out_dir, METRICS_FILE), json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    storage.write_text(join_path(ctx.out_dir, REPORT_FILE), render_markdown(metrics, plots))
    return metrics
