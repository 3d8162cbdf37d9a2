import subprocess
import sys

import pytest

from meddr_ray import cli
from meddr_ray.stages.registry import Stage


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "meddr_ray.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_stage():
    out = run_cli("--help").stdout
    for stage in ["bootstrap", "instruct", "train", "index", "evaluate", "serve", "pipeline", "demo", "config"]:
        assert stage in out


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_config_show_prints_the_resolved_config(preset):
    res = run_cli("config", "show", "--config", preset, "train.seed=7")
    assert res.returncode == 0, res.stderr
    assert f"preset: {preset}" in res.stdout and "seed: 7" in res.stdout


def test_config_show_bad_key_fails_with_its_name():
    res = run_cli("config", "show", "--config", "tiny", "train.num_wrkers=2")
    assert res.returncode == 2
    assert "train.num_wrkers" in res.stderr


def test_a_stage_that_is_not_built_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "bootstrap", Stage("bootstrap", "meddr_ray._no_such_module:run", "x"))
    assert cli.main(["bootstrap", "--config", "tiny"]) == cli.EXIT_NOT_BUILT
    assert "not built yet" in capsys.readouterr().err
