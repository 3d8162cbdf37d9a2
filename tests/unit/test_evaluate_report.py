"""report.md and the summary line from a metrics.json (no Ray): which accuracy is which, and a dataset with no
answered row said so instead of left blank."""

from __future__ import annotations

from meddr_ray import metrics as mm
from meddr_ray.stages.evaluate.report import render_markdown, summary_line


def _metrics(datasets: dict) -> dict:
    return {
        "run_dir": "runs/x", "eval_dir": "runs/x/eval", "created": "now", "config_fingerprint": "f", "run_key": "k",
        "student": {"name": "tiny", "path": "/m", "adapter_dir": "/a", "note": None}, "index": None,
        "modes": ["no_rag"], "rag": {"top_k_diagnosis": 5, "top_k_vqa": 1, "top_k_report": 1},
        "wordnet": {"available": False, "detail": "-"}, "unavailable": {},
        "run": {"written": 0, "skipped": 0, "failed": 0, "seconds": 1.0, "rows_per_s": 0.0}, "datasets": datasets,
    }  # fmt: skip


def test_macro_and_micro_accuracy_are_labelled_apart():
    # unbalanced: 3 of class 0 right, 1 of class 1 wrong -> micro 0.75, macro (mean recall) 0.5
    s = mm.classification_summary([0, 0, 0, 1], [0, 0, 0, 0], 2)
    d = {"task": "diagnosis", "n": 4, "failed": 0, "splits": ["test"], "labels": ["a", "b"],
         "modes": {"no_rag": {**s, "not_scored": 0, "rows": 4}}}  # fmt: skip
    md = render_markdown(_metrics({"breast": d}), {})
    assert "| breast (n=4) | Accuracy (macro)↑ | - | 0.500 |" in md
    header = next(line for line in md.splitlines() if line.startswith("| dataset | mode |"))
    assert "Accuracy (macro)↑" in header and "Accuracy (micro)↑" in header
    assert "| breast | w/o RAG | 4 | 0 | 0.500 | 0.429 | 0.750 | 0 |" in md
    assert "mean of the per-class recalls" in md


def test_a_dataset_without_answered_rows_is_said_so():
    d = {"task": "diagnosis", "n": 0, "failed": 0, "splits": ["tset"], "modes": {}}
    m = _metrics({"breast": d})
    assert "breast (diagnosis): NO ROWS ANSWERED (none read: limit 0, or no row in splits ['tset']?)" in summary_line(m)
    assert "- **breast**: NO ROWS ANSWERED" in render_markdown(m, {})


def test_an_empty_evaluation_folder_gives_each_configured_dataset_its_task(tmp_path):
    from meddr_ray.config import load_config
    from meddr_ray.stages.evaluate.report import dataset_metrics

    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    d = dataset_metrics(cfg, str(tmp_path / "eval"))["breastmnist"]
    assert (d["task"], d["n"], d["failed"], d["modes"], d["labels"]) == ("diagnosis", 0, 0, {}, [])


def test_rows_set_aside_by_an_earlier_run_are_said_on_every_run():
    m = _metrics({})
    m["run"]["skipped_failed"] = 2
    assert "0 failed (+2 set aside by an earlier run: delete failed/ to retry them) in 1.0 s" in summary_line(m)


def test_rows_whose_reference_is_not_an_option_are_said_in_the_summary_line():
    s = mm.classification_summary([0, 1], [0, 0], 2)
    d = {"task": "diagnosis", "n": 3, "failed": 0, "splits": ["test"], "labels": ["a", "b"],
         "modes": {"no_rag": {**s, "not_scored": 1, "rows": 3}}}  # fmt: skip
    line = summary_line(_metrics({"breast": d}))
    assert "breast (diagnosis, n=3) accuracy: w/o RAG 0.500 (1 rows not scored: their reference is not one" in line
