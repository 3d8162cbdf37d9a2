"""RunLayout: the one place that names the artifacts of a run."""

from meddr_ray.config import load_config
from meddr_ray.layout import RunLayout


def test_every_artifact_lives_under_the_run_folder_by_default(tmp_path):
    run = tmp_path / "run"
    layout = load_config("tiny", [f"run_dir={run}"]).layout
    assert layout.bootstrap_dir == str(run / "bootstrap")
    assert layout.failed_dir("bootstrap") == str(run / "bootstrap" / "failed")
    assert layout.instruct_dir == str(run / "instruct")
    assert layout.checkpoints_root == str(run / "train")
    assert layout.adapter_dir == str(run / "adapter")
    assert layout.merged_dir == str(run / "merged")
    assert layout.index_dir == str(run / "index")
    assert layout.index_failed_file("v0002") == str(run / "index" / "failed" / "v0002.parquet")
    assert layout.evaluate_dir == str(run / "eval")  # evaluate's folder is not named after the stage
    assert layout.predictions_dir == str(run / "eval" / "predictions")
    assert layout.pipeline_summary == str(run / "pipeline.json")


def test_a_sections_output_dir_and_the_train_paths_override_the_defaults(tmp_path):
    cfg = load_config("tiny", [
        f"run_dir={tmp_path / 'run'}", f"index.output_dir={tmp_path / 'shared-index'}",
        f"evaluate.output_dir={tmp_path / 'ev'}", f"train.adapter_dir={tmp_path / 'ad'}",
        f"train.storage_path={tmp_path / 'ckpt'}",
    ])  # fmt: skip
    layout = cfg.layout
    assert layout.index_dir == str(tmp_path / "shared-index")
    assert layout.predictions_dir == str(tmp_path / "ev" / "predictions")
    assert layout.adapter_dir == str(tmp_path / "ad")
    assert layout.checkpoints_root == str(tmp_path / "ckpt")
    assert layout.bootstrap_dir == str(tmp_path / "run" / "bootstrap")  # the others stay in the run


def test_object_store_runs_join_with_slashes():
    layout = RunLayout("s3://bucket/runs/a", {})
    assert layout.index_failed_file("v0001") == "s3://bucket/runs/a/index/failed/v0001.parquet"
    assert layout.adapter_dir == "s3://bucket/runs/a/adapter"
