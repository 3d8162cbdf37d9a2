"""Kill the bootstrap driver with SIGKILL midway, run it again: every input id is written exactly once. And a
file inserted into a source between two runs: the second run writes that file's report and nothing else.

The job runs as `python -m meddr_ray.cli bootstrap` in its own session (``start_new_session``), so the driver
and the local Ray cluster its ``ray.init`` starts (GCS, raylet, workers, dashboard) form one process group
that the test kills as a whole; the test then checks that no process of that run is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Set

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meddr_ray.stages.bootstrap import SUMMARY_FILE, run_bootstrap
from meddr_ray.stages.parts import part_files
from meddr_ray.config import SourceConfig, load_config
from meddr_ray.data import sample_id

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
LIMIT = 256


def _processes() -> Dict[int, tuple]:
    """pid -> (ppid, process group, session) of every live process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z":  # a zombie is dead already, it only waits to be reaped
            out[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return out


def _family(root: int) -> Set[int]:
    """``root``, its descendants, and everything in its session (Ray may re-parent its daemons)."""
    procs = _processes()
    family = {pid for pid, (_, _, sid) in procs.items() if sid == root} | {root}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _, _) in procs.items() if ppid in family} - family
        family |= kids
        grew = bool(kids)
    return family & set(procs)


def _kill_and_check_gone(proc: subprocess.Popen, family: Set[int]) -> None:
    """SIGKILL the run: its process group and every process of its family (Ray workers whose raylet was killed
    exit on their own only once they notice, which on a loaded 2-core machine can take longer than a test should
    wait); fail, naming them, if any of them outlives that."""
    family = (family | _family(proc.pid)) - {proc.pid}
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = (family | _family(proc.pid)) & set(_processes())
        alive.discard(proc.pid)
        if not alive:
            return
        time.sleep(0.25)
    names = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for p in alive}
    pytest.fail(f"processes of the killed run are still alive after SIGKILL: {names}")


def _ids(folder: Path) -> list:
    return [i for f in part_files(str(folder)) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def test_sigkill_midway_then_resume_writes_every_id_exactly_once(tmp_path):
    out = tmp_path / "bootstrap"
    cmd = [
        sys.executable, "-m", "meddr_ray.cli", "bootstrap", "--config", "tiny", f"run_dir={tmp_path}",
        f"bootstrap.sources.0.limit={LIMIT}", "bootstrap.pool.batch_size=2",
        "bootstrap.generation.max_new_tokens=48",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster, not the tests'
    env["MEDDR_RAY_CACHE"] = os.environ["MEDDR_RAY_CACHE"]

    log1 = open(tmp_path / "run1.log", "wb")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    family: Set[int] = set()
    try:
        deadline = time.monotonic() + 400
        while not part_files(str(out)):  # kill at the first finished batch: the rest is still to do
            if first.poll() is not None:
                pytest.fail(f"the run ended (rc {first.returncode}) before it could be killed:\n"
                            f"{(tmp_path / 'run1.log').read_text()[-3000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail("no output after 400 s:\n" + (tmp_path / "run1.log").read_text()[-3000:])
            time.sleep(0.05)
        family = _family(first.pid)
    finally:
        _kill_and_check_gone(first, family)
        log1.close()

    partial = _ids(out)
    assert len(partial) == len(set(partial)), "a killed run wrote an id twice"
    assert 0 < len(partial) < LIMIT, f"the kill came too late to test a resume ({len(partial)} of {LIMIT} done)"
    assert not (out / SUMMARY_FILE).exists()  # the killed run never got to its summary

    log2 = open(tmp_path / "run2.log", "wb")
    second = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log2, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = second.wait(timeout=600)
        family = _family(second.pid)
    finally:
        _kill_and_check_gone(second, family)
        log2.close()
    assert rc == 0, (tmp_path / "run2.log").read_text()[-3000:]

    ids = _ids(out)
    expected = [sample_id("breastmnist", "train", i) for i in range(LIMIT)]
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert sorted(ids) == sorted(expected), "an id is missing"
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["skipped"] == len(partial)
    assert summary["written"] == LIMIT - len(partial)
    assert "bootstrap: rows in 256" in (tmp_path / "run2.log").read_text()


def _write_png(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20), dtype=np.uint8)).save(path, "PNG")


def test_a_file_inserted_between_runs_regenerates_nothing_already_done(ray_cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(("case_a.png", "case_c.png", "case_d.png")):
        _write_png(data / name, i)
    csv = data / "labels.csv"
    csv.write_text("image,label\ncase_a.png,benign\ncase_c.png,malignant\ncase_d.png,benign\n")
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "bootstrap.generation.max_new_tokens=8",
                               "bootstrap.pool.batch_size=2"])  # fmt: skip
    cfg.bootstrap.sources = [SourceConfig(name="folder", format="image_folder", path=str(csv), modality="ultrasound")]
    out = Path(run_bootstrap(cfg).path)
    first = {f: pq.read_table(f, columns=["id"]).column("id").to_pylist() for f in part_files(str(out))}

    _write_png(data / "case_b.png", 9)  # a new file, listed between the first two
    csv.write_text("image,label\ncase_a.png,benign\ncase_b.png,benign\ncase_c.png,malignant\ncase_d.png,benign\n")
    run_bootstrap(cfg)

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert (summary["rows_in"], summary["skipped"], summary["written"]) == (4, 3, 1)
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == 4, "a report was written twice"
    assert sorted(i.split("#")[0] for i in ids) == [f"folder/train/case_{c}.png" for c in "abcd"]
    for f, before in first.items():  # the first run's files are untouched
        assert pq.read_table(f, columns=["id"]).column("id").to_pylist() == before
