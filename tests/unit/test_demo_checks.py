"""The demo's checks before its minutes of work: a taken Serve port and a missing request source stop it at once,
with one line naming the key or file (no Ray, no model)."""

from __future__ import annotations

import socket

import pytest

from meddr_ray import cli, demo
from meddr_ray.config import load_config


@pytest.fixture
def no_pipeline(monkeypatch):
    ran = []
    monkeypatch.setattr(demo, "run_pipeline", lambda cfg, fresh=False: ran.append(cfg.run_dir))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ran


def test_a_taken_serve_port_stops_the_demo_before_the_pipeline(tmp_path, no_pipeline, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        code = cli.main(["demo", "--config", "tiny", f"run_dir={tmp_path / 'run'}", f"serve.port={port}"])
    err = capsys.readouterr().err
    assert code == 2 and no_pipeline == []
    assert f"key 'serve.port': 127.0.0.1:{port} is taken" in err and len(err.splitlines()) == 1


def test_a_free_port_passes():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.check_port_free(load_config("tiny", [f"serve.port={port}"]))


@pytest.mark.parametrize("override, message", [
    ("evaluate.sources=[]", "key 'evaluate.sources': the demo evaluates and serves a test image from it"),
    ("evaluate.sources.0.path=/nonexistent/breast.npz", "no file or folder at /nonexistent/breast.npz"),
])  # fmt: skip
def test_a_missing_request_source_stops_the_demo_before_the_pipeline(tmp_path, no_pipeline, capsys, override,
                                                                        message):  # fmt: skip
    code = cli.main(["demo", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "serve.port=0", override])
    err = capsys.readouterr().err
    assert code == 2 and no_pipeline == [] and message in err and len(err.splitlines()) == 1
