"""The pipeline's train step starts over (``train.restart``) when what it trained on or its settings changed,
and resumes otherwise: a resume on changed data is refused by training itself, so the pipeline says which."""

from pathlib import Path

from meddr_ray.stages.registry import StageResult
from meddr_ray.stages import pipeline
from meddr_ray.config import load_config


class _Killed(BaseException):
    """A SIGKILL during the step."""


def _steps(monkeypatch):
    seen, kill = {}, set()

    def make(step):
        def run(cfg):
            out = Path(cfg.run_dir) / step
            out.mkdir(parents=True, exist_ok=True)
            seen[step] = cfg.train.restart
            if step in kill:
                kill.discard(step)
                raise _Killed(step)
            return StageResult(str(out))

        return run

    monkeypatch.setattr(pipeline, "init_ray", lambda cfg: None)
    monkeypatch.setattr(pipeline, "_resolve", make)
    return seen, kill


def test_train_restarts_only_when_its_input_or_settings_changed(tmp_path, monkeypatch):
    import pytest

    seen, kill = _steps(monkeypatch)
    run = f"run_dir={tmp_path / 'run'}"
    pipeline.run_pipeline(load_config("tiny", [run]))
    seen.clear()
    kill.add("train")
    with pytest.raises(_Killed):  # other training settings: it starts over, and is killed half-way
        pipeline.run_pipeline(load_config("tiny", [run, "train.learning_rate=0.5"]))
    assert seen["train"] is True
    seen.clear()
    pipeline.run_pipeline(load_config("tiny", [run, "train.learning_rate=0.5"]))  # the same again: it resumes
    assert seen == {"train": False, "index": False, "evaluate": False}
    seen.clear()
    pipeline.run_pipeline(load_config("tiny", [run, "train.learning_rate=0.5", "instruct.val_fraction=0.2"]))
    assert seen["instruct"] is False and seen["train"] is True  # a new mix: training starts over
    seen.clear()
    pipeline.run_pipeline(load_config("tiny", [run, "train.learning_rate=0.5", "instruct.val_fraction=0.2"]))
    assert seen == {}  # all reused
