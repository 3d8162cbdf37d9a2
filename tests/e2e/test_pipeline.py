"""The whole recipe on the tiny preset, as `meddr-ray pipeline` runs it: every artifact of every stage."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddr_ray.config import load_config
from meddr_ray.instruct import published_mix_files
from meddr_ray.pipeline import run_pipeline


def _read(folder: Path, columns):
    """The stage's Parquet files (its folder also holds config.yaml, summary.json, failed/)."""
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in sorted(folder.glob("*.parquet")))


@pytest.mark.e2e
@pytest.mark.integration
def test_pipeline_writes_every_stage_and_resumes(ray_cluster, tmp_path):
    cfg = load_config(
        "tiny",
        [
            f"run_dir={tmp_path / 'run'}",
            "bootstrap.sources.0.limit=24",
            "instruct.sources.0.limit=48",
            "train.max_steps=4",
            "train.checkpoint_every=2",
            "evaluate.sources.0.limit=16",
        ],
    )
    run = Path(run_pipeline(cfg))
    summary = json.loads((run / "pipeline.json").read_text())
    assert set(summary["outputs"]) == {"bootstrap", "instruct", "train", "index", "evaluate"}
    assert not any(r["reused"] for r in summary["steps"].values())

    reports = _read(run / "bootstrap", ["id", "report"])
    assert reports.num_rows == 24 and len(set(reports.column("id").to_pylist())) == 24
    mix = pq.read_table(published_mix_files(str(run / "instruct")), columns=["task", "split"]).to_pylist()
    assert {r["task"] for r in mix} >= {"diagnosis", "guided_report"}
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "adapter" / "meddr.json").is_file()
    version = (run / "index" / "CURRENT").read_text().strip()
    manifest = json.loads((run / "index" / version / "manifest.json").read_text())
    assert manifest["count"] == 624  # BreastMNIST train + val
    assert (run / "config.yaml").is_file()

    assert (run / "eval" / "metrics.json").is_file()

    # A second run reuses every finished step, and writes nothing new.
    run_pipeline(cfg)
    again = json.loads((run / "pipeline.json").read_text())
    assert all(r["reused"] for r in again["steps"].values()) and again["outputs"] == summary["outputs"]
    assert _read(run / "bootstrap", ["id"]).num_rows == 24
    assert (run / "index" / "CURRENT").read_text().strip() == version

    # A changed evaluation setting re-runs the evaluation alone.
    run_pipeline(load_config("tiny", [f"run_dir={run}", "bootstrap.sources.0.limit=24", "instruct.sources.0.limit=48",
                                      "train.max_steps=4", "train.checkpoint_every=2", "evaluate.sources.0.limit=8"]))
    third = json.loads((run / "pipeline.json").read_text())["steps"]
    assert [s for s, r in third.items() if not r["reused"]] == ["evaluate"]
