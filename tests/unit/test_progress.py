"""progress.report: the one way library code tells a person what it does."""

import logging

import pytest

from meddr_ray import progress


@pytest.fixture(autouse=True)
def fresh_progress_logger(monkeypatch):
    """Each test starts as a fresh process would: nothing configured, no handler of ours."""
    root = logging.getLogger(progress.ROOT)
    saved = (list(root.handlers), root.level, root.propagate)
    root.handlers.clear()
    monkeypatch.setattr(progress, "_configured", False)
    yield
    root.handlers[:], root.level, root.propagate = saved


def test_a_report_is_one_line_named_by_its_stage_on_the_current_stdout(capsys):
    progress.report("train", "resuming at step 8 (epoch 1)")
    progress.report("index", "building 2 flat shards")
    assert capsys.readouterr().out == "[train] resuming at step 8 (epoch 1)\n[index] building 2 flat shards\n"


def test_quiet_keeps_progress_off_stdout_and_module_logs_are_not_progress(capsys):
    progress.configure(quiet=True)
    progress.report("train", "step 5/20")
    logging.getLogger("meddr_ray.stages.bootstrap").warning("a diagnostic, for logging to route")
    assert "step 5/20" not in capsys.readouterr().out
    progress.configure(quiet=False)
    progress.report("train", "step 10/20")
    assert capsys.readouterr().out == "[train] step 10/20\n"


def test_an_application_handler_receives_the_reports_instead(capsys):
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.getMessage()))

    progress.configure(stdout=False)
    logging.getLogger(progress.ROOT).addHandler(Collect())
    progress.report("evaluate", "batch done")
    assert seen == [("meddr_ray.progress.evaluate", "batch done")]
    assert capsys.readouterr().out == ""  # the application chose where progress goes: no second handler
