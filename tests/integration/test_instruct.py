"""The instruction mix on the shared local Ray cluster: templates per task, set-aside rows, weights, caps and a
deterministic split; a rebuild is published whole (see also test_instruct_publish.py); counts and caps stream."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meddr_ray import prompts
from meddr_ray.stages.bootstrap import run_bootstrap
from meddr_ray.config import SourceConfig, load_config
from meddr_ray.layout import FAILED_DIR
from meddr_ray.stages.instruct import SUMMARY_FILE, published_mix, run_instruct
from meddr_ray.storage import list_files

pytestmark = pytest.mark.integration


def _mix(folder: Path):
    return pq.read_table(published_mix(str(folder)).files).to_pylist()


def _version(folder: Path) -> Path:
    """The folder of the published version (its summary, set-aside rows, config)."""
    return Path(published_mix(str(folder)).path)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _vqa_and_reports(folder: Path):
    """A small VQA JSON and a report JSONL with real image files, and one bad row in each."""
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(_png(i))
    (folder / "broken.png").write_bytes(b"not a png")
    qa = [
        {"img_name": "img0.png", "question": "Is there a mass?", "answer": "Yes", "modality": "CT", "q_lang": "en"},
        {"img_name": "img1.png", "question": "Which organ?", "answer": "Liver", "modality": "MRI", "q_lang": "en"},
        {"img_name": "broken.png", "question": "Normal?", "answer": "No", "modality": "CT", "q_lang": "en"},
    ]
    (folder / "vqa.json").write_text(json.dumps(qa))
    reports = [
        {"id": "r0", "image": ["img2.png"], "text": "Findings: the lungs are clear. Impression: normal chest."},
        {"id": "r1", "image": ["img0.png"], "text": ""},  # no report text: set aside
    ]
    (folder / "reports.jsonl").write_text("\n".join(json.dumps(r) for r in reports) + "\n")
    return [
        SourceConfig(name="myvqa", format="vqa_json", path=str(folder / "vqa.json")),
        SourceConfig(name="myreports", format="reports", path=str(folder / "reports.jsonl"), modality="chest X-ray"),
    ]


def test_the_mix_has_every_task_with_its_template(ray_cluster, tmp_path):
    over = [f"run_dir={tmp_path}", "bootstrap.sources.0.limit=12", "bootstrap.generation.max_new_tokens=6",
            "instruct.sources.0.limit=40", "instruct.descriptions=true", "data.on_error=skip",
            "instruct.val_fraction=0.25", "instruct.bootstrap_quality=[ok,partial,no_sections]"]  # fmt: skip
    cfg = load_config("tiny", over)
    run_bootstrap(cfg)
    extra = _vqa_and_reports(tmp_path / "data")
    cfg.instruct.sources = cfg.instruct.sources + extra
    out = Path(run_instruct(cfg).path)
    rows = _mix(out)
    tasks = Counter(r["task"] for r in rows)
    assert tasks == {"guided_report": 12, "diagnosis": 40, "vqa": 2, "report": 1, "description": 1}
    assert len({r["id"] for r in rows}) == len(rows)

    for r in rows:
        assert r["image"] and r["split"] in ("train", "val")
        if r["task"] == "guided_report":
            assert r["prompt"] == prompts.guided_report_prompt("breast ultrasound")
            assert r["label"] not in r["prompt"] and "the diagnosis is" not in r["prompt"]  # the diagnosis is not given
        elif r["task"] == "diagnosis":
            assert r["prompt"] == prompts.diagnosis_prompt("breast ultrasound", ["malignant", "normal, benign"])
            assert r["answer"] == r["label"] in ("malignant", "normal, benign")
        elif r["task"] == "vqa":
            assert r["prompt"].endswith(" Is there a mass?") or r["prompt"].endswith(" Which organ?")
        elif r["task"] == "report":
            assert r["prompt"] == prompts.report_prompt("chest X-ray")
            assert r["answer"].startswith("Findings: the lungs are clear.")
        else:
            assert (r["prompt"], r["answer"]) == (prompts.description_prompt(), "the lungs are clear.")
    # the bootstrapped report of an image and its diagnosis sample fall in the same split
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_source.values())

    failed = pq.read_table(list_files(str(_version(out) / FAILED_DIR), ".parquet")).to_pylist()
    reasons = sorted((r["dataset"], r["error"]) for r in failed)
    assert [d for d, _ in reasons] == ["myreports", "myvqa"]
    assert "reports.jsonl row 1: no report text" in reasons[0][1]
    assert "vqa.json row 2" in reasons[1][1]

    summary = json.loads((_version(out) / SUMMARY_FILE).read_text())
    assert summary["rows"] == len(rows) and summary["set_aside"] == 2
    assert summary["train"] + summary["val"] == len(rows) and summary["val"] > 0
    table = {(t["task"], t["dataset"]): t["total"] for t in summary["by_task_dataset"]}
    assert table[("diagnosis", "breastmnist")] == 40 and table[("guided_report", "breastmnist")] == 12


def test_rebuild_is_deterministic_and_weights_and_caps_apply(ray_cluster, tmp_path):
    over = [f"run_dir={tmp_path}", "bootstrap.sources.0.limit=16", "bootstrap.generation.max_new_tokens=6",
            "instruct.sources.0.limit=30", "instruct.val_fraction=0.3",
            "instruct.bootstrap_quality=[ok,partial,no_sections]"]  # fmt: skip
    cfg = load_config("tiny", over)
    run_bootstrap(cfg)
    out = Path(run_instruct(cfg).path)
    first = {r["id"]: (r["split"], r["prompt"], r["answer"]) for r in _mix(out)}
    assert len(first) == 16 + 30
    first_mix = published_mix(str(out))

    again = {r["id"]: (r["split"], r["prompt"], r["answer"]) for r in _mix(Path(run_instruct(cfg).path))}
    assert again == first  # the same config gives the same mix, same split
    again_mix = published_mix(str(out))
    # a new version of the same rows: the same fingerprint, so training checkpoints made on it stay resumable
    assert again_mix.version != first_mix.version and again_mix.fingerprint == first_mix.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bootstrap", "instruct"]  # no temporary folder left
    assert len(list(out.glob("mix-*"))) == 1  # the version it replaced is removed once nothing names it

    weighted = load_config("tiny", over + ["instruct.sources.0.weight=2.0", "instruct.bootstrap_cap=5"])
    rows = _mix(Path(run_instruct(weighted).path))
    tasks = Counter(r["task"] for r in rows)
    assert tasks == {"diagnosis": 60, "guided_report": 5}
    # the first copy of each diagnosis sample is the row of the unweighted mix, in the same split
    for r in rows:
        if r["id"] in first:
            assert first[r["id"]][0] == r["split"]
    assert sum(r["id"] in first for r in rows if r["task"] == "diagnosis") == 30
    summary = json.loads((_version(out) / SUMMARY_FILE).read_text())
    assert summary["capped"]["bootstrap"] == 11
    assert published_mix(str(out)).fingerprint != first_mix.fingerprint  # other rows, another fingerprint


def test_counts_and_caps_without_holding_the_rendered_rows(ray_cluster, tmp_path, monkeypatch):
    """The rendered rows (images included) are streamed from the readers to the files: never materialized in
    the object store nor pulled to the driver, which sees the caps' rank numbers only (one batch at a time)."""
    import ray.data

    def refused(name):
        real = getattr(ray.data.Dataset, name)

        def call(self, *args, **kwargs):
            if type(self._logical_plan.dag).__name__ == "Write":  # Ray keeps the write tasks' small results
                return real(self, *args, **kwargs)
            raise AssertionError(f"Dataset.{name} holds every row of a dataset at once")

        return call

    for name in ("materialize", "to_arrow_refs", "to_pandas_refs", "to_numpy_refs", "take_all", "to_pandas"):
        monkeypatch.setattr(ray.data.Dataset, name, refused(name))
    seen = set()
    iter_batches = ray.data.Dataset.iter_batches

    def watched(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            seen.update(batch.keys() if isinstance(batch, dict) else batch.column_names)
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", watched)
    extra = _vqa_and_reports(tmp_path / "data")
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "instruct.use_bootstrap=false", "instruct.sources.0.limit=40",
                               "instruct.sources.0.weight=1.5", "instruct.sources.0.cap=25", "data.on_error=skip"])
    cfg.instruct.sources = cfg.instruct.sources + extra
    out = Path(run_instruct(cfg).path)
    assert "image" not in seen

    mix = published_mix(str(out))
    rows = pq.read_table(mix.files, columns=["id", "task", "dataset"]).to_pylist()
    diagnosis = [r["id"] for r in rows if r["task"] == "diagnosis"]
    assert len(diagnosis) == 25 and Counter(r["task"] for r in rows)["vqa"] == 2
    summary = json.loads((Path(mix.path) / SUMMARY_FILE).read_text())
    assert summary["capped"]["breastmnist"] > 0 and summary["set_aside"] == 2 and summary["rows"] == len(rows)
