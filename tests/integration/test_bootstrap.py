"""The bootstrap job on the shared local Ray cluster: every id once, resume, bad rows, a missing teacher."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meddr_ray.layout import FAILED_DIR
from meddr_ray.stages.bootstrap import SUMMARY_FILE, TeacherWriter, run_bootstrap
from meddr_ray.stages.parts import part_files
from meddr_ray.config import SourceConfig, load_config
from meddr_ray.data import DataError, sample_id, unwrap_data_error
from meddr_ray.model import ModelNotFoundError

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *overrides):
    return load_config("tiny", [f"run_dir={tmp_path}", "bootstrap.generation.max_new_tokens=8", *overrides])


def _ids(folder) -> list:
    files = part_files(str(folder))
    return [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def test_every_id_once_then_resume_writes_only_new_ids(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, "bootstrap.sources.0.limit=20", "bootstrap.pool.batch_size=6")
    out = run_bootstrap(cfg).path
    assert out == str(tmp_path / "bootstrap")
    expected = {sample_id("breastmnist", "train", i) for i in range(20)}
    ids = _ids(out)
    assert sorted(ids) == sorted(expected)  # every id, none twice

    summary = json.loads((tmp_path / "bootstrap" / SUMMARY_FILE).read_text())
    assert (summary["rows_in"], summary["written"], summary["skipped"], summary["failed"]) == (20, 20, 0, 0)
    assert sum(summary["quality"].values()) == 20  # every written row has one quality flag
    assert summary["quality_flagged"] == summary["quality"]["no_sections"] + summary["quality"]["empty"]
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0

    table = pq.read_table(part_files(out))
    row = table.slice(0, 1).to_pylist()[0]
    assert row["teacher"] == "tiny-llava" and row["prompt_version"] == cfg.bootstrap.prompt_version
    assert json.loads(row["generation"])["max_new_tokens"] == 8
    assert row["prompt"].startswith("You are a helpful medical assistant, and your task is report generation.")
    assert f"the diagnosis is {row['label']}." in row["prompt"]
    assert Image.open(io.BytesIO(row["image"])).size == (28, 28)
    assert set(table.column("quality").to_pylist()) <= {"ok", "partial", "no_sections", "empty"}

    # Resume with more rows: the 20 done are skipped, only the 8 new ones are generated.
    more = run_bootstrap(_cfg(tmp_path, "bootstrap.sources.0.limit=28", "bootstrap.pool.batch_size=6")).path
    ids = _ids(more)
    assert len(ids) == len(set(ids)) == 28
    summary = json.loads((tmp_path / "bootstrap" / SUMMARY_FILE).read_text())
    assert (summary["rows_in"], summary["written"], summary["skipped"], summary["total_reports"]) == (28, 8, 20, 28)


def test_another_teacher_cannot_add_to_the_same_folder(ray_cluster, tmp_path):
    run_bootstrap(_cfg(tmp_path, "bootstrap.sources.0.limit=4"))
    with pytest.raises(ValueError, match="prompt_version"):
        run_bootstrap(_cfg(tmp_path, "bootstrap.sources.0.limit=4", "bootstrap.prompt_version=other"))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_images_are_written_to_failed_and_the_job_goes_on(ray_cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good1.png").write_bytes(_png(1))
    (data / "good2.png").write_bytes(_png(2))
    (data / "truncated.png").write_bytes(_png(3)[:60])
    (data / "notes.png").write_bytes(b"this is a text file, not an image\n")
    (data / "labels.csv").write_text(
        "image,label\ngood1.png,benign\ntruncated.png,malignant\ngood2.png,malignant\nnotes.png,benign\n"
    )
    cfg = _cfg(tmp_path / "run", "data.on_error=skip")
    cfg.bootstrap.sources = [
        SourceConfig(name="folder", format="image_folder", path=str(data / "labels.csv"), modality="ultrasound")
    ]
    out = run_bootstrap(cfg).path

    assert sorted(i.split("#")[0] for i in _ids(out)) == ["folder/train/good1.png", "folder/train/good2.png"]
    failed = pq.read_table(part_files(os.path.join(out, FAILED_DIR))).to_pylist()
    by_index = {r["source_index"]: r for r in failed}
    assert sorted(by_index) == [1, 3]
    assert by_index[1]["id"].startswith("folder/train/truncated.png#")  # the id names the file, not a position
    assert "labels.csv row 1" in by_index[1]["error"]
    assert "labels.csv row 3" in by_index[3]["error"]
    assert all(r["source_file"].endswith("labels.csv") and r["dataset"] == "folder" for r in failed)
    summary = json.loads(Path(out, SUMMARY_FILE).read_text())
    assert (summary["rows_in"], summary["written"], summary["failed"]) == (4, 2, 2)

    # Re-run: failed ids are not retried (delete failed/ for that) and nothing is written twice.
    run_bootstrap(cfg)
    summary = json.loads(Path(out, SUMMARY_FILE).read_text())
    assert (summary["written"], summary["skipped"], summary["skipped_failed"], summary["failed"]) == (0, 2, 2, 0)
    assert len(pq.read_table(part_files(os.path.join(out, FAILED_DIR)))) == 2


def _folder_source(data: Path, names) -> SourceConfig:
    (data / "labels.csv").write_text("image,label\n" + "".join(f"{n},benign\n" for n in names))
    return SourceConfig(name="folder", format="image_folder", path=str(data / "labels.csv"), modality="ultrasound")


def test_a_resume_never_reads_the_images_of_finished_rows(ray_cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"done{i}.png").write_bytes(_png(i))
    cfg = _cfg(tmp_path / "run", "bootstrap.pool.batch_size=2")  # on_error: raise
    cfg.bootstrap.sources = [_folder_source(data, [f"done{i}.png" for i in range(3)])]
    out = run_bootstrap(cfg).path

    for i in range(3):  # damaged after they were done: a resume that read them would stop on the first
        (data / f"done{i}.png").write_bytes(b"no longer an image")
    (data / "new.png").write_bytes(_png(7))
    cfg.bootstrap.sources = [_folder_source(data, ["new.png"] + [f"done{i}.png" for i in range(3)])]
    run_bootstrap(cfg)
    summary = json.loads(Path(out, SUMMARY_FILE).read_text())
    assert (summary["rows_in"], summary["skipped"], summary["written"], summary["failed"]) == (4, 3, 1, 0)
    assert len(_ids(out)) == 4 and not part_files(os.path.join(out, FAILED_DIR))


def test_on_error_raise_stops_at_a_row_the_teacher_cannot_use(ray_cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(_png(1))
    cfg = _cfg(tmp_path / "run")  # on_error: raise
    src = _folder_source(data, ["a.png", "missing.png"])
    src.require_images = False  # the reader lets the row through with no image; the teacher cannot use it
    cfg.bootstrap.sources = [src]
    with pytest.raises(Exception) as info:
        run_bootstrap(cfg)
    err = unwrap_data_error(info.value)
    assert isinstance(err, DataError), info.value
    assert str(err) == f"{data / 'labels.csv'} row 1: no image"
    assert not part_files(str(tmp_path / "run" / "bootstrap" / FAILED_DIR))  # raised, not set aside

    cfg.data.on_error = "skip"  # the same row with skip: set aside and counted
    out = run_bootstrap(cfg).path
    assert len(part_files(os.path.join(out, FAILED_DIR))) == 1


def test_an_image_that_does_not_decode_in_the_actor_is_a_failed_row():
    """The actor's own check (images can be damaged between read and use): a DataError naming the row."""
    writer = TeacherWriter.__new__(TeacherWriter)  # only the decoding step; no model needed
    writer.limits = dict(max_bytes=1_000_000, max_pixels=100)  # 20 x 20 = 400 pixels: over the limit
    row = {"id": "x", "dataset": "d", "source_file": "/data/a.csv", "source_index": 5, "image": _png(1), "error": None}
    image, error = writer._decode(row)
    assert image is None and error.startswith("/data/a.csv row 5:") and "max_image_pixels" in error
    image, error = writer._decode(dict(row, image=b"\x89PNG\r\n\x1a\n broken"))
    assert image is None and "not a readable image" in error
    writer.limits = dict(max_bytes=1_000_000, max_pixels=1_000_000)
    image, error = writer._decode(row)
    assert error is None and image.size == (20, 20)


def test_missing_teacher_fails_before_any_ray_work(tmp_path):
    missing = tmp_path / "no-such-teacher"
    cfg = load_config("tiny", [f"run_dir={tmp_path}", f"teacher.path={missing}", "teacher.build=null"])
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        run_bootstrap(cfg)
    assert not (tmp_path / "bootstrap").exists()  # nothing was started or written

    # The command line: one clean line naming the path, and no Ray cluster started.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "meddr_ray.cli", "bootstrap", "--config", "tiny", f"run_dir={tmp_path}",
         f"teacher.path={missing}", "teacher.build=null"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"model checkpoint not found: {missing}" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert time.monotonic() - started < 60


def test_ids_are_unique_per_source_and_split(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.bootstrap.sources = cfg.bootstrap.sources * 2
    with pytest.raises(ValueError, match="already bootstrap.sources"):
        run_bootstrap(cfg)


def _descendants(root: int) -> dict:
    """pid -> command line of every live descendant of ``root`` (the Ray workers this test session started)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except OSError:
                continue
    found, frontier = {}, {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - set(found)
        for pid in frontier:
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return found


def test_a_killed_teacher_actor_is_restarted_and_no_id_is_lost_or_doubled(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, "bootstrap.sources.0.limit=64", "bootstrap.pool.batch_size=2",
               "bootstrap.generation.max_new_tokens=48", "bootstrap.pool.min_actors=1",
               "bootstrap.pool.max_actors=1")  # fmt: skip
    out = tmp_path / "bootstrap"
    killed = []

    def kill_the_actor_midway():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if len(part_files(str(out))) >= 2:
                for pid, cmd in _descendants(os.getpid()).items():
                    if "MapBatches(TeacherWriter)" in cmd:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_actor_midway, daemon=True)
    killer.start()
    run_bootstrap(cfg)
    killer.join(timeout=5)
    assert killed, "the actor was not found or the job ended before it could be killed"
    ids = _ids(out)
    assert sorted(ids) == sorted(sample_id("breastmnist", "train", i) for i in range(64))  # each id exactly once
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["written"] == 64
