"""`meddr-ray demo` as `make demo` runs it, with the tiny preset and small counts: the whole recipe on a local Ray
cluster the command starts, one served request over HTTP, the summary, and nothing left running afterwards.

The command runs in its own session (``start_new_session``) so that every process of its Ray cluster can be found
afterwards; the test fails, naming them, if any outlives the command, and ends them in any case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

SMALL = [
    "bootstrap.sources.0.limit=16",
    "instruct.sources.0.limit=48",
    "train.max_steps=4",
    "train.checkpoint_every=4",
    "evaluate.sources.0.limit=24",
    "serve.port=8127",  # not the default: a developer's own `meddr-ray serve` may hold 8000
]


def _session_members(sid: int) -> list:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[3]) == sid:
                members.append(int(entry))
    return members


def _demo(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # the demo starts and stops its own local cluster
    proc = subprocess.Popen(
        [sys.executable, "-m", "meddr_ray.cli", "demo", "--config", "tiny", f"run_dir={run_dir}", *SMALL, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        deadline = time.time() + 30
        while _session_members(proc.pid) and time.time() < deadline:
            time.sleep(1)  # ray.shutdown() lets its daemons exit on their own
        left = _session_members(proc.pid)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"the demo left processes running: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_demo_runs_the_recipe_serves_one_request_and_reuses_it(tmp_path):
    run = tmp_path / "demo"
    first = _demo(run)
    assert first.returncode == 0, first.stdout[-4000:]
    out = first.stdout
    # every step ran and said so, then the served answer and the table
    for step in ("bootstrap", "instruct", "train", "index", "evaluate"):
        assert f"{step}: done in" in out, step
    assert "Table 4" in out and "breastmnist" in out and "Accuracy" in out
    assert "Served answer: POST http://127.0.0.1:8127/v1/diagnose" in out
    served = out[out.index("Served answer") :]
    diagnosis = served.split("diagnosis: ", 1)[1].split()[0]
    assert diagnosis in ("malignant", "normal,"), served[:400]  # BreastMNIST's labels ("normal, benign")
    assert served.count(" breastmnist  id ") == 5  # the top-5 evidence, each with its dataset and id
    assert (run / "eval" / "metrics.json").is_file() and (run / "eval" / "report.md").is_file()
    assert list((run / "eval").glob("*.png"))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["datasets"]["breastmnist"]["modes"]) == {"no_rag", "rag", "voting"}

    # run again: every step is reused, and the demo still serves and prints its table
    second = _demo(run)
    assert second.returncode == 0, second.stdout[-4000:]
    assert second.stdout.count(": reused (finished") == 5 and "Served answer" in second.stdout
