"""The paper's Table 4 (retrieval-augmented diagnosis) on BreastMNIST and PneumoniaMNIST, side by side in one run.

For each dataset the whole recipe runs on the ``pneumonia`` preset (tiny student, 200 LoRA steps on 2 CPU workers;
BreastMNIST swaps the sources for the copy shipped in the package), then the rows of Table 4 come from the same
evaluation: the majority class of the retrieval database (train + val labels), voting over the top-5 retrieved
cases, the student without retrieval and with it; accuracy (MultiMedEval's: mean per-class recall) and macro-F1,
with the paper's MedDr figures beside them.

    python benchmarks/table4.py                          # both datasets, about 15 min on 2 cores
    python benchmarks/table4.py --datasets breastmnist --steps 40

The runs go to ``runs/table4/<dataset>`` and are reused when run again (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from meddr_ray import metrics as mm  # noqa: E402
from meddr_ray.config import load_config  # noqa: E402
from meddr_ray.stages.evaluate.report import paper_entry  # noqa: E402
from meddr_ray.retrieval.store import current_version  # noqa: E402
from meddr_ray.stages.pipeline import run_pipeline  # noqa: E402

SOURCES = ("bootstrap", "instruct", "index", "evaluate")
BREAST = "${pkg:assets/breastmnist.npz}"


def overrides(dataset: str, root: Path, steps: int) -> list:
    out = [f"run_dir={root / dataset}", f"train.max_steps={steps}"]
    if dataset == "breastmnist":
        out += [f"{section}.sources.0.{key}={value}" for section in SOURCES
                for key, value in (("name", "breastmnist"), ("path", BREAST))]  # fmt: skip
    return out


def majority_row(cfg, options: list, y_true: list) -> dict:
    """Predict the most frequent label of the retrieval database (the training cases) for every test image."""
    index_dir = cfg.layout.index_dir
    values = pq.read_table(Path(index_dir, current_version(index_dir), "values.parquet"), columns=["label"])
    counts = Counter(x for x in values.column("label").to_pylist() if x)
    label = counts.most_common(1)[0][0]
    summary = mm.classification_summary(y_true, [options.index(label)] * len(y_true), len(options))
    return {"label": label, **{k: summary[k] for k in ("accuracy", "macro_f1", "accuracy_micro")}}


def evaluate_dataset(dataset: str, root: Path, steps: int, fresh: bool, extra: list = ()) -> dict:
    cfg = load_config("pneumonia", overrides(dataset, root, steps) + list(extra))
    started = time.time()
    run_pipeline(cfg, fresh=fresh)
    pipeline = json.loads(Path(cfg.layout.pipeline_summary).read_text())
    eval_dir = pipeline["outputs"]["evaluate"]
    metrics = json.loads(Path(eval_dir, "metrics.json").read_text())
    d = metrics["datasets"][dataset]
    parts = sorted(Path(eval_dir, "predictions").glob("part-*.parquet"))
    preds = pa.concat_tables(pq.read_table(f, columns=["mode", "true_index", "options"]) for f in parts)
    rows = preds.filter(pc.equal(preds.column("mode"), "no_rag"))
    options = rows.column("options")[0].as_py()
    y_true = rows.column("true_index").to_pylist()
    return {
        "dataset": dataset,
        "n": d["n"],
        "modes": {m: {k: d["modes"][m].get(k) for k in ("accuracy", "macro_f1", "accuracy_micro")} for m in d["modes"]},
        "majority": majority_row(cfg, options, y_true),
        "train": {s: pipeline["steps"][s].get("seconds") for s in pipeline["steps"]},
        "seconds": round(time.time() - started, 1),
        "eval_dir": eval_dir,
    }


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_table(results: list) -> None:
    head = ["dataset", "metric", "majority", "voting", "w/o RAG", "w/ RAG", "paper voting", "paper w/o", "paper w/"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        paper = (paper_entry(r["dataset"]) or (None, {}))[1]
        for i, key in enumerate(("accuracy", "macro_f1", "accuracy_micro")):
            ours = [fmt(r["majority"][key])] + [fmt(r["modes"].get(m, {}).get(key)) for m in ("voting", "no_rag", "rag")]
            theirs = [fmt(v) for v in paper.get(key, (None, None, None))]
            name = f"{r['dataset']} (n={r['n']})" if i == 0 else ""
            metric = {"accuracy": "accuracy (MultiMedEval)", "macro_f1": "macro-F1",
                      "accuracy_micro": "share correct"}[key]  # fmt: skip
            lines.append("| " + " | ".join([name, metric, *ours, *theirs]) + " |")
    print("\n".join(lines))
    for r in results:
        print(f"{r['dataset']}: majority label {r['majority']['label']!r}; {r['seconds']} s "
              f"(steps: {json.dumps(r['train'])}); predictions in {r['eval_dir']}/predictions")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist"])
    parser.add_argument("--steps", type=int, default=200, help="LoRA optimizer steps per dataset")
    parser.add_argument("--root", default="runs/table4", help="folder of the runs")
    parser.add_argument("--fresh", action="store_true", help="delete the runs first")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a further config override for every dataset (repeatable), e.g. train.lora.r=16")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    results = [evaluate_dataset(d, Path(args.root).resolve(), args.steps, args.fresh, args.extra)
               for d in args.datasets]  # fmt: skip
    print_table(results)
    Path(args.root, "table4.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
