"""The evaluate job on the shared local Ray cluster: the tiny student (base model, no adapter) and the session's
published BreastMNIST index answer a limited BreastMNIST test split without retrieval, with retrieval and by
voting; every figure of metrics.json is recomputed from the prediction files; resume, bad rows, missing inputs;
VQA (real SLAKE questions) and report generation (real IU-Xray reports) on images written here, since neither
image set is shipped.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meddr_ray import metrics
from meddr_ray.stages.parts import part_files
from meddr_ray.config import ConfigError, SourceConfig, load_config
from meddr_ray.data import sample_id, unwrap_data_error
from meddr_ray.stages.evaluate import run_evaluate
from meddr_ray.layout import FAILED_DIR, PREDICTIONS_DIR
from meddr_ray.retrieval.store import load_index
from meddr_ray.stages.index import run_index
from meddr_ray.retrieval.rag import Neighbor, rag_prompt, vote, vote_report

pytestmark = pytest.mark.integration

N = 24  # BreastMNIST test rows evaluated (of 156)


def _cfg(run_cfg, out: Path, *overrides: str):
    return load_config("tiny", [f"run_dir={run_cfg.run_dir}", f"evaluate.output_dir={out}", *overrides])


def _predictions(out) -> list:
    files = part_files(os.path.join(out, PREDICTIONS_DIR))
    return pads.dataset(files, format="parquet").to_table().to_pylist()


def _metrics(out) -> dict:
    return json.loads(Path(out, "metrics.json").read_text())


def _neighbours(values: dict, row: dict) -> list:
    """The row's stored neighbours as rag.Neighbor, their annotations read from the index values."""
    out = []
    for nid, score in zip(row["neighbour_ids"], row["neighbour_scores"]):
        v = values[nid]
        qa = tuple((x["question"], x["answer"]) for x in v["qa"] or ())
        out.append(Neighbor(nid, v["label"], v["report"], qa, score, v["dataset"], v["modality"]))
    return out


def _same(stored: dict, recomputed: dict) -> bool:
    """Per-row scores equal: numbers to float precision (they went through JSON), lists and texts exactly."""
    assert set(stored) == set(recomputed)
    for key, want in recomputed.items():
        if isinstance(want, float):
            assert stored[key] == pytest.approx(want), key
        else:
            assert stored[key] == want, key
    return True


def _values(cfg) -> dict:
    loaded = load_index(cfg.layout.index_dir)
    return {r["id"]: r for r in loaded.values.to_pylist()}


@pytest.fixture(scope="module")
def diagnosis(tiny_index_run, tmp_path_factory):
    cfg = _cfg(tiny_index_run, tmp_path_factory.mktemp("eval") / "eval", f"evaluate.sources.0.limit={N}")
    out = run_evaluate(cfg).path
    return cfg, out


def test_writes_predictions_metrics_report_and_plots(diagnosis, capsys):
    cfg, out = diagnosis
    assert out == cfg.evaluate.output_dir
    rows = _predictions(out)
    expected = {sample_id("breastmnist", "test", i) for i in range(N)}
    modes = ("no_rag", "rag", "voting")
    assert Counter((r["id"], r["mode"]) for r in rows) == {(i, m): 1 for i in expected for m in modes}
    m = _metrics(out)
    d = m["datasets"]["breastmnist"]
    assert (d["task"], d["n"], d["failed"], d["labels"]) == ("diagnosis", N, 0, ["malignant", "normal, benign"])
    assert set(d["modes"]) == {"no_rag", "rag", "voting"}
    for s in d["modes"].values():
        assert s["n"] == N and 0 <= s["accuracy"] <= 1 and 0 <= s["macro_f1"] <= 1
    assert m["student"]["base_model"] is True and "no trained adapter" in m["student"]["note"]
    assert m["index"]["version"] == load_index(cfg.layout.index_dir).version and m["index"]["count"] == 624
    assert m["config_fingerprint"] == cfg.fingerprint() and m["wordnet"]["available"] in (True, False)
    assert (m["run"]["written"], m["run"]["failed"], m["run"]["skipped"]) == (N, 0, 0)

    report = Path(out, "report.md").read_text()
    assert "| breastmnist (n=24) | Accuracy (macro)↑ |" in report and "Accuracy (micro)↑" in report
    assert "| 0.820 | 0.718 | 0.878 |" in report  # the paper's Breast-MNIST figures, labelled as the paper's
    assert "**base model**" in report
    for name in ("confusion_breastmnist.png", "modes.png", "retrieval_examples.png"):
        assert Path(out, name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in report
    assert m["plots"]["notes"] == []  # every query's and neighbour's image was found for the figure
    with Image.open(Path(out, "retrieval_examples.png")) as im:
        assert im.size[0] > 400 and im.size[1] > 4 * 150  # 4 queries x (1 + top-3) panels


def test_every_figure_recomputes_from_the_prediction_files(diagnosis):
    cfg, out = diagnosis
    rows = _predictions(out)
    m = _metrics(out)
    for mode, summary in m["datasets"]["breastmnist"]["modes"].items():
        part = [r for r in rows if r["mode"] == mode]
        # the mapping is recomputed from the stored text (voting: the voted label as it is)
        for r in part:
            options = r["options"]
            pred = options.index(r["output"]) if mode == "voting" else metrics.map_to_label(r["output"], options)
            assert r["pred_index"] == pred and r["true_index"] == options.index(r["reference"])
            assert r["correct"] == (pred == r["true_index"]) and r["pred_label"] == options[pred]
        again = metrics.classification_summary([r["true_index"] for r in part], [r["pred_index"] for r in part], 2)
        for key in ("accuracy", "macro_f1", "accuracy_micro", "n"):
            assert summary[key] == pytest.approx(again[key]), (mode, key)
        assert summary["confusion"] == again["confusion"]
        assert summary["accuracy_micro"] == pytest.approx(sum(r["correct"] for r in part) / N)
        assert sum(map(sum, summary["confusion"])) == N


def test_voting_and_rag_use_the_same_stored_neighbours(diagnosis):
    cfg, out = diagnosis
    values = _values(cfg)
    by_key = {(r["id"], r["mode"]): r for r in _predictions(out)}
    for (sid, mode), r in by_key.items():
        if mode != "voting":
            continue
        assert r["top_k"] == 5 and len(r["neighbour_ids"]) == 5  # max(top_k_diagnosis=5, figure_top_k=3)
        neighbours = _neighbours(values, r)
        assert r["neighbour_labels"] == [n.label for n in neighbours]
        assert r["neighbour_scores"] == sorted(r["neighbour_scores"], reverse=True)
        assert r["output"] == vote(neighbours[:5])  # the voting baseline over the stored neighbours
        rag, no_rag = by_key[(sid, "rag")], by_key[(sid, "no_rag")]
        assert rag["neighbour_ids"] == r["neighbour_ids"] == no_rag["neighbour_ids"]  # one retrieval per query
        kw = dict(modality="breast ultrasound", options=["malignant", "normal, benign"])
        assert rag["prompt"] == rag_prompt("diagnosis", neighbours[:5], cfg.rag, **kw)
        assert no_rag["prompt"] == rag_prompt("diagnosis", None, cfg.rag, **kw)
        assert "most similar images" in rag["prompt"] and "most similar images" not in no_rag["prompt"]
        assert len(set(r["neighbour_ids"])) == len(r["neighbour_ids"])  # five different images
        assert r["prompt"] is None and r["tokens"] == 0 and rag["tokens"] > 0


def test_resume_answers_each_id_once_and_a_changed_run_starts_over(tiny_index_run, tmp_path):
    out = tmp_path / "eval"
    small = ("evaluate.pool.batch_size=4", "evaluate.figure_examples=0")  # two files for the first 8 rows
    run_evaluate(_cfg(tiny_index_run, out, "evaluate.sources.0.limit=8", *small))
    # a batch that never finished (its file is gone) and more rows: only those are answered
    files = part_files(str(out / PREDICTIONS_DIR))
    lost = set(pq.read_table(files[0], columns=["id"]).column("id").to_pylist())
    os.remove(files[0])
    run_evaluate(_cfg(tiny_index_run, out, "evaluate.sources.0.limit=12", *small))
    run = _metrics(out)["run"]
    assert len(lost) == 4 and (run["rows_in"], run["skipped"], run["written"]) == (12, 4, 8)
    rows = _predictions(out)
    assert Counter((r["id"], r["mode"]) for r in rows) == {
        (sample_id("breastmnist", "test", i), m): 1 for i in range(12) for m in ("no_rag", "rag", "voting")
    }
    assert _metrics(out)["datasets"]["breastmnist"]["n"] == 12

    # other decoding settings: the old answers are not mixed in (error), or are replaced (restart)
    changed = ("evaluate.sources.0.limit=12", *small, "evaluate.generation.max_new_tokens=4")
    with pytest.raises(ConfigError, match="another student, adapter, index version or settings"):
        run_evaluate(_cfg(tiny_index_run, out, *changed, "evaluate.on_change=error"))
    run_evaluate(_cfg(tiny_index_run, out, *changed))
    rows = _predictions(out)
    assert len(rows) == 36 and len({r["run_key"] for r in rows}) == 1
    assert _metrics(out)["run"]["written"] == 12 and max(r["tokens"] for r in rows) <= 4


def _png(seed: int, size=(28, 28), colour: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (*size, 3) if colour else size, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_a_bad_image_is_set_aside_with_skip_and_stops_the_job_with_raise(tiny_index_run, tmp_path):
    data = tmp_path / "folder"
    data.mkdir()
    for i in (0, 1, 3):
        (data / f"case{i}.png").write_bytes(_png(i))
    (data / "case2.png").write_bytes(b"this is a text file, not an image\n")
    (data / "labels.csv").write_text(
        "image,label\ncase0.png,malignant\ncase1.png,benign\ncase2.png,malignant\ncase3.png,benign\n"
    )
    source = SourceConfig(name="folder", format="image_folder", path=str(data / "labels.csv"), splits=["test"],
                          modality="breast ultrasound")  # fmt: skip
    # a folder of images the index holds none of: retrieval over the whole index, not the folder's own dataset
    cfg = _cfg(tiny_index_run, tmp_path / "eval", "data.on_error=skip", "evaluate.figure_examples=1",
               "rag.same_dataset=false")  # fmt: skip
    cfg.evaluate.sources = [source]
    out = run_evaluate(cfg).path
    failed = pq.read_table(part_files(os.path.join(out, FAILED_DIR))).to_pylist()
    assert [(r["id"].split("#")[0], r["source_index"]) for r in failed] == [("folder/test/case2.png", 2)]
    assert "labels.csv row 2" in failed[0]["error"]
    assert sorted({r["id"].split("#")[0] for r in _predictions(out)}) == [f"folder/test/case{i}.png" for i in (0, 1, 3)]
    m = _metrics(out)
    assert (m["run"]["failed"], m["datasets"]["folder"]["failed"], m["datasets"]["folder"]["n"]) == (1, 1, 3)
    assert m["datasets"]["folder"]["labels"] == ["benign", "malignant"]

    # on_error=raise: the job stops with an error naming the file and row
    strict = _cfg(tiny_index_run, tmp_path / "strict", "rag.same_dataset=false")
    strict.evaluate.sources = [source]
    with pytest.raises(Exception) as info:
        run_evaluate(strict)
    assert "labels.csv row 2" in str(unwrap_data_error(info.value) or info.value)


def test_a_missing_index_or_required_adapter_is_an_error_naming_the_path(tiny_index_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / "index")):
        run_evaluate(load_config("tiny", [f"run_dir={tmp_path / 'none'}"]))
    adapter = Path(tiny_index_run.run_dir) / "adapter"
    with pytest.raises(FileNotFoundError, match=f"no trained adapter at {adapter}"):
        run_evaluate(_cfg(tiny_index_run, tmp_path / "eval", "evaluate.require_adapter=true"))
    assert not (tmp_path / "eval").exists()  # both fail before any Ray work


# ------------------------------------------------------------------------------------ VQA and reports


def _slake_train_images(shared_data: Path) -> set:
    english = [r for r in json.loads((shared_data / "slake" / "test.json").read_text()) if r["q_lang"] == "en"]
    return {r["img_name"] for r in english[:16]}


def _vqa_and_report_sources(shared_data: Path, root: Path):
    """SLAKE questions (16 to index, 12 to evaluate) and IU-Xray reports (10 / 8), with images written here."""
    root.mkdir()
    english = [r for r in json.loads((shared_data / "slake" / "test.json").read_text()) if r["q_lang"] == "en"]
    qa = [dict(r, split="train" if i < 16 else "test") for i, r in enumerate(english[:28])]
    (root / "slake.json").write_text(json.dumps(qa))
    lines = (shared_data / "iu_xray" / "test_reports.jsonl").read_text().splitlines()[:18]
    reports = [dict(json.loads(line), split="train" if i < 10 else "test") for i, line in enumerate(lines)]
    (root / "iu_xray.jsonl").write_text("\n".join(json.dumps(r) for r in reports) + "\n")
    for k, name in enumerate(sorted({r["img_name"] for r in qa} | {r["image"] for r in reports})):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(100 + k, (32, 32), colour=True))
    slake = SourceConfig(name="slake", format="vqa_json", path=str(root / "slake.json"), splits=["train"])
    iu = SourceConfig(name="iu_xray", format="reports", path=str(root / "iu_xray.jsonl"), splits=["train"],
                      modality="chest X-ray")  # fmt: skip
    return slake, iu


def test_vqa_and_report_generation(ray_cluster, shared_data, tmp_path):
    slake, iu = _vqa_and_report_sources(shared_data, tmp_path / "data")
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "evaluate.figure_examples=2"])
    cfg.index.sources = [slake, iu]  # the database: the training splits of the evaluated datasets (paper 4.5)
    run_index(cfg)
    cfg.evaluate.sources = [SourceConfig(**{**slake.__dict__, "splits": ["test"]}),
                            SourceConfig(**{**iu.__dict__, "splits": ["test"]})]  # fmt: skip
    out = run_evaluate(cfg).path
    m = _metrics(out)
    values = _values(cfg)
    rows = _predictions(out)

    vqa = m["datasets"]["slake"]
    assert (vqa["task"], vqa["n"], set(vqa["modes"])) == ("vqa", 12, {"no_rag", "rag"})  # no voting row for VQA
    for mode, summary in vqa["modes"].items():
        part = [r for r in rows if r["dataset"] == "slake" and r["mode"] == mode]
        for r in part:
            assert _same(json.loads(r["scores"]), metrics.vqa_scores(r["output"], r["reference"]))
        assert summary == pytest.approx(
            {**metrics.vqa_summary(json.loads(r["scores"]) for r in part), "rows": 12}
        )
        assert summary["n_closed"] + summary["n_open"] == 12 and summary["n_closed"] > 0
    # the database holds each SLAKE training image once, with all of its questions
    slake_cases = [v for v in values.values() if v["dataset"] == "slake"]
    assert len(slake_cases) == len(_slake_train_images(shared_data)) < 16
    assert sum(len(v["qa"]) for v in slake_cases) == 16 and all(v["label"] is None for v in slake_cases)
    rag_row = next(r for r in rows if r["dataset"] == "slake" and r["mode"] == "rag")
    found = _neighbours(values, rag_row)
    assert {n.dataset for n in found} == {"slake"}  # scoped to the query's own dataset (rag.same_dataset)
    assert rag_row["prompt"] == rag_prompt("vqa", found, cfg.rag, modality=rag_row["modality"],
                                           question=rag_row["question"])  # fmt: skip
    assert f"most similar image: Q: {found[0].qa[0][0]}" in rag_row["prompt"] or any(
        f"Q: {q} A: {a}" in rag_row["prompt"] for q, a in found[0].qa)  # fmt: skip

    report = m["datasets"]["iu_xray"]
    assert (report["task"], report["n"], set(report["modes"])) == ("report", 8, {"no_rag", "rag", "voting"})
    for mode, summary in report["modes"].items():
        part = [r for r in rows if r["dataset"] == "iu_xray" and r["mode"] == mode]
        for r in part:
            if mode == "voting":  # the paper's report voting: the top-1 retrieved report is the prediction
                found = _neighbours(values, r)
                assert {n.dataset for n in found} == {"iu_xray"} and r["output"] == vote_report(found)
                assert r["output"] == found[0].report
            assert _same(json.loads(r["scores"]), metrics.report_scores(r["output"] or "", r["reference"]))
        again = metrics.report_summary(json.loads(r["scores"]) for r in part)
        for key in ("bleu1", "bleu4", "rouge1", "rougeL", "meteor", "n"):
            assert summary[key] == pytest.approx(again[key]), (mode, key)
    assert {"f1_radgraph", "chexbert_similarity", "radcliq"} <= set(m["unavailable"])
    if m["wordnet"]["available"]:
        assert report["modes"]["voting"]["meteor"] is not None
    md = Path(out, "report.md").read_text()
    assert "| slake (n=12) | BLEU-1↑ | - |" in md and "0.774" in md  # the paper's Slake-VQA w/ RAG BLEU-1
    assert "| iu_xray (n=8) | F1-RadGraph↑ | unavailable |" in md and "0.352" in md
    assert m["plots"]["notes"] == [] and "retrieval_examples.png" in m["plots"]["files"]
