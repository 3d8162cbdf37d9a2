"""Which pipeline steps a re-run may reuse: each step's fingerprint covers its config and every step before it."""

from meddr_ray.stages.registry import StageResult
from meddr_ray.config import load_config
from meddr_ray.stages.pipeline import STEPS, step_fingerprints


def _changed(*overrides):
    base = step_fingerprints(load_config("tiny"))
    other = step_fingerprints(load_config("tiny", list(overrides)))
    return [s for s in STEPS if base[s] != other[s]]


def test_fingerprints_are_stable_for_the_same_config():
    assert step_fingerprints(load_config("tiny")) == step_fingerprints(load_config("tiny"))


def test_fingerprints_do_not_depend_on_where_the_package_lives(monkeypatch, tmp_path):
    """Each `ray job submit` unpacks the checkout into a folder named by its contents: a pipeline resubmitted after
    any edit must still reuse its finished steps (the job-submission test found every step redone)."""
    from meddr_ray import config as config_module

    here = step_fingerprints(load_config("tiny"))
    monkeypatch.setattr(config_module, "PACKAGE_DIR", tmp_path / "_ray_pkg_0123" / "meddr_ray")
    moved = load_config("tiny")
    assert moved.bootstrap.sources[0].path.startswith(str(tmp_path))  # the shipped data, from the other place
    assert step_fingerprints(moved) == here
    assert _changed("bootstrap.sources.0.limit=3") == STEPS  # a real change still counts


def test_a_change_invalidates_its_step_and_every_later_one_only():
    assert _changed("bootstrap.generation.max_new_tokens=7") == STEPS
    assert _changed("teacher.dtype=bfloat16") == STEPS
    assert _changed("train.max_steps=3") == ["train", "index", "evaluate"]
    assert _changed("index.num_shards=3") == ["index", "evaluate"]
    assert _changed("rag.top_k_diagnosis=3") == ["evaluate"]


def test_training_with_retrieved_labels_builds_the_index_first():
    """train.rag_context_fraction: training reads the index, so it comes first and feeds training."""
    from meddr_ray.stages.pipeline import steps_for

    rag = "train.rag_context_fraction=0.5"
    assert [s[0] for s in steps_for(load_config("tiny", [rag]))] == [
        "bootstrap", "instruct", "index", "train", "evaluate"]  # fmt: skip
    assert [s[0] for s in steps_for(load_config("tiny"))] == STEPS
    base = step_fingerprints(load_config("tiny", [rag]))

    def changed(*more):
        other = step_fingerprints(load_config("tiny", [rag, *more]))
        return [s for s in ("bootstrap", "instruct", "index", "train", "evaluate") if base[s] != other[s]]

    assert changed("index.num_shards=3") == ["index", "train", "evaluate"]
    assert changed("student.dtype=bfloat16") == ["index", "train", "evaluate"]
    assert changed("rag.top_k_diagnosis=3") == ["train", "evaluate"]  # the training prompts quote top-k labels
    assert changed("train.learning_rate=0.1") == ["train", "evaluate"]


def test_settings_that_do_not_shape_artifacts_change_nothing():
    assert _changed("serve.port=9000") == []
    assert _changed("ray.num_cpus=2") == []


# ------------------------------------------------------------------------ pipeline.json across interrupted runs

import fcntl  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from meddr_ray.stages import pipeline  # noqa: E402
from meddr_ray.storage import RunBusyError, run_lock  # noqa: E402


class _Killed(BaseException):
    """Stands for a SIGKILL during a step: nothing after the raise runs (not even `except Exception`)."""


@pytest.fixture
def fake_steps(monkeypatch):
    """Every step a function that writes its folder and records that it ran; `fake_steps.kill = step` makes that
    step die half-way (its folder written, its function not returned)."""
    ran = []

    def make(step):
        def run(cfg):
            out = Path(cfg.run_dir) / step
            out.mkdir(parents=True, exist_ok=True)
            ran.append(step)
            if getattr(run_step, "kill", None) == step:
                raise _Killed(step)
            return StageResult(str(out))

        return run

    def run_step():
        return ran

    monkeypatch.setattr(pipeline, "init_ray", lambda cfg: None)
    monkeypatch.setattr(pipeline, "_resolve", make)
    run_step.ran = ran
    return run_step


def _summary(run: Path) -> dict:
    return json.loads((run / "pipeline.json").read_text())


def test_a_step_killed_half_way_is_never_recorded_as_finished(tmp_path, fake_steps):
    run = tmp_path / "run"
    cfg = load_config("tiny", [f"run_dir={run}"])
    pipeline.run_pipeline(cfg)
    assert list(_summary(run)["steps"]) == STEPS

    # an evaluation with another setting dies half-way through rewriting eval/
    fake_steps.kill = "evaluate"
    with pytest.raises(_Killed):
        pipeline.run_pipeline(load_config("tiny", [f"run_dir={run}", "rag.top_k_diagnosis=3"]))
    assert list(_summary(run)["steps"]) == STEPS[:-1]  # the old evaluate record is gone

    # back to the first config: its evaluation is not reused, since eval/ no longer holds what it recorded
    fake_steps.kill = None
    fake_steps.ran.clear()
    pipeline.run_pipeline(cfg)
    assert fake_steps.ran == ["evaluate"] and list(_summary(run)["steps"]) == STEPS


def test_a_killed_step_drops_the_records_of_every_later_step(tmp_path, fake_steps):
    run = tmp_path / "run"
    pipeline.run_pipeline(load_config("tiny", [f"run_dir={run}"]))
    fake_steps.kill = "train"
    with pytest.raises(_Killed):
        pipeline.run_pipeline(load_config("tiny", [f"run_dir={run}", "train.max_steps=3"]))
    assert list(_summary(run)["steps"]) == ["bootstrap", "instruct"]


@pytest.mark.parametrize("text", ["{not json", "[]", '{"steps": []}', '{"steps": {"train": 3}}', '"x"'])
def test_an_unreadable_pipeline_json_reuses_nothing_and_is_rewritten(tmp_path, fake_steps, text, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.json").write_text(text)
    pipeline.run_pipeline(load_config("tiny", [f"run_dir={run}"]))
    assert fake_steps.ran == STEPS and list(_summary(run)["steps"]) == STEPS
    assert "ignoring unreadable" in capsys.readouterr().out


def test_one_run_at_a_time_per_run_folder(tmp_path, fake_steps):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / pipeline.LOCK_FILE, "a") as other:  # another process's pipeline or demo
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = f"{run} is in use by another meddr-ray pipeline, demo or evaluation"
        with pytest.raises(RunBusyError, match=busy):
            pipeline.run_pipeline(load_config("tiny", [f"run_dir={run}"]))
    assert fake_steps.ran == []
    # released: a run goes ahead, and the demo's own hold around the pipeline does not block it (re-entrant)
    with run_lock(str(run)):
        pipeline.run_pipeline(load_config("tiny", [f"run_dir={run}"]))
    assert fake_steps.ran == STEPS
    with open(run / pipeline.LOCK_FILE, "a") as after:  # and nothing holds it once the run is over
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_fresh_empties_the_run_folder_but_keeps_holding_it(tmp_path, fake_steps):
    run = tmp_path / "run"
    pipeline.run_pipeline(load_config("tiny", [f"run_dir={run}"]))
    (run / "stray.txt").write_text("x")
    with run_lock(str(run)):
        pipeline.run_pipeline(load_config("tiny", [f"run_dir={run}"]), fresh=True)
        assert not (run / "stray.txt").exists() and (run / pipeline.LOCK_FILE).exists()
        with open(run / pipeline.LOCK_FILE, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert all(not r["reused"] for r in _summary(run)["steps"].values()) and os.path.isdir(run / "evaluate")


def test_a_busy_run_folder_is_a_one_line_cli_error(tmp_path, fake_steps, capsys):
    from meddr_ray import cli

    run = tmp_path / "run"
    run.mkdir()
    with open(run / pipeline.LOCK_FILE, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main(["pipeline", "--config", "tiny", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meddr-ray: error: ") and "in use by another" in err and len(err.splitlines()) == 1


def test_a_step_whose_output_changed_since_is_run_again(tmp_path, fake_steps):
    run = tmp_path / "run"
    cfg = load_config("tiny", [f"run_dir={run}"])
    pipeline.run_pipeline(cfg)
    # e.g. `meddr-ray evaluate` with other settings in the same folder, killed after replacing some predictions
    (run / "evaluate" / "part-1.parquet").write_bytes(b"x")
    fake_steps.ran.clear()
    pipeline.run_pipeline(cfg)
    assert fake_steps.ran == ["evaluate"]
    # as it left it (a lock or a killed writer's temporary file aside): reused
    (run / "evaluate" / ".lock").write_text("pid 1")
    (run / "evaluate" / "x.parquet.tmp-1234").write_text("half")
    fake_steps.ran.clear()
    pipeline.run_pipeline(cfg)
    assert fake_steps.ran == []
    # a removed output is no finished step either
    import shutil

    shutil.rmtree(run / "index")
    pipeline.run_pipeline(cfg)
    assert fake_steps.ran == ["index", "evaluate"]
