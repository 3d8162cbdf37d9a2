"""Instruction tuning on Ray Train + DeepSpeed ZeRO-3 (2 CPU workers): it learns, and it survives a killed worker.

One run serves both claims (a run costs a minute or two on 2 cores): BreastMNIST diagnosis instructions from
``run_instruct``, 100 optimizer steps, a checkpoint every 20. Once the checkpoint of step 20 is registered, the
test SIGKILLs the process of training rank 1. Ray Train restarts the worker group, which resumes from the latest
checkpoint; the run must finish, its step count must continue from that checkpoint, the validation loss must
fall far below its starting value, and the adapter it writes must load with peft and give that same loss.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from meddr_ray.config import load_config
from meddr_ray.stages.instruct import published_mix_files, run_instruct
from meddr_ray.model.collate import IGNORE_INDEX, InstructionCollator
from meddr_ray.stages.train.stage import run_train

pytestmark = [pytest.mark.integration]

STEPS = 100
EVERY = 20


@pytest.fixture(scope="module")
def instruct_dir(ray_cluster, tmp_path_factory):
    """The instruction mix of the whole BreastMNIST training split (546 images, about 10 % to validation)."""
    base = tmp_path_factory.mktemp("train-data")
    cfg = load_config(
        "tiny",
        [f"run_dir={base}", "instruct.use_bootstrap=false", "instruct.sources.0.limit=null"],
    )
    return run_instruct(cfg).path


def _wait_for(predicate, timeout: float, what: str, thread: threading.Thread):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if not thread.is_alive():
            pytest.fail(f"the training run ended before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _registered(experiment: Path, checkpoint_name: str) -> bool:
    """Ray Train has recorded the checkpoint in its run snapshot (so a restart will resume from it)."""
    snapshot = experiment / "checkpoint_manager_snapshot.json"
    try:
        return checkpoint_name in snapshot.read_text()
    except OSError:
        return False


def _adapter_val_loss(model_path: str, adapter: str, instruct: str) -> tuple:
    """Token-weighted validation loss of the base model with and without the saved adapter (peft)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    files = published_mix_files(instruct)
    table = pq.read_table(files, columns=["id", "image", "prompt", "answer", "split"]).to_pydict()
    rows = [i for i, split in enumerate(table["split"]) if split == "val"]
    processor = AutoProcessor.from_pretrained(model_path)
    collate = InstructionCollator(processor, max_length=128)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_path), adapter).eval()
    sums = {"adapter": [0.0, 0], "base": [0.0, 0]}
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        batch = collate({k: [table[k][i] for i in chunk] for k in ("id", "image", "prompt", "answer")})
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        with torch.no_grad():
            sums["adapter"][0] += float(model(**batch).loss) * n
            with model.disable_adapter():
                sums["base"][0] += float(model(**batch).loss) * n
        sums["adapter"][1] += n
        sums["base"][1] += n
    return sums["adapter"][0] / sums["adapter"][1], sums["base"][0] / sums["base"][1]


@pytest.mark.slow
def test_learns_and_survives_a_killed_worker(instruct_dir, tmp_path):
    cfg = load_config(
        "tiny",
        [
            f"run_dir={tmp_path}",
            f"instruct.output_dir={instruct_dir}",
            f"train.max_steps={STEPS}",
            f"train.checkpoint_every={EVERY}",
            "train.max_failures=2",
        ],
    )
    experiment = tmp_path / "train" / cfg.train.name
    outcome: dict = {}

    def train():
        try:
            outcome["adapter"] = run_train(cfg).path
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    first = f"checkpoint_step{EVERY:07d}"
    _wait_for(lambda: _registered(experiment, first), 600, f"{first} to be registered", thread)
    info = json.loads((experiment / "workers" / "rank-1.json").read_text())
    assert info["attempt"] == 1
    os.kill(info["pid"], signal.SIGKILL)  # a training worker dies mid-run
    killed_at = time.time()
    thread.join(timeout=900)
    assert not thread.is_alive(), "the training run did not finish within 15 minutes of the kill"
    assert "error" not in outcome, f"training failed: {outcome.get('error')!r}"

    adapter = Path(outcome["adapter"])
    assert adapter == tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    meta = json.loads((adapter / "meddr.json").read_text())

    # ---- the worker group was restarted in new processes and resumed from a checkpoint, not from step 0
    restarted = json.loads((experiment / "workers" / "rank-1.json").read_text())
    assert restarted["attempt"] == 2 and restarted["pid"] != info["pid"]
    events = meta["events"]
    assert [e["resumed"] for e in events] == [False, True], events
    resumed_at = events[1]["start_step"]
    assert resumed_at >= EVERY and resumed_at % EVERY == 0, events
    assert events[1]["time"] > killed_at
    assert events[1].get("data_position", "verified") == "verified"  # (absent: it resumed at an epoch start)
    steps = [h["step"] for h in meta["history"] if "loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no step trained twice, none missing at the end
    assert set(range(cfg.train.log_every, STEPS + 1, cfg.train.log_every)) <= set(steps)
    assert meta["final_metrics"]["step"] == STEPS

    # ---- learning: the validation loss falls far below where it started
    first_val, last_val = meta["final_metrics"]["val_loss_first"], meta["final_metrics"]["val_loss"]
    assert first_val > 5.0  # a random tiny model: near log(vocabulary)
    assert last_val < 0.5 * first_val and last_val < 1.0, (first_val, last_val)
    assert meta["base_model"]["path"] == str(cfg.student.path)
    assert meta["data"]["rows"]["train"] > 400 and meta["config_fingerprint"] == cfg.fingerprint()

    # ---- the PEFT adapter is what was trained: loaded onto the base model it gives the reported loss
    with_adapter, base = _adapter_val_loss(meta["base_model"]["path"], str(adapter), instruct_dir)
    assert with_adapter == pytest.approx(last_val, rel=0.05)
    assert base == pytest.approx(first_val, rel=0.05)

    # ---- Ray Train kept only the last checkpoints
    kept = sorted(p.name for p in experiment.glob("checkpoint_step*"))
    assert len(kept) <= cfg.train.keep_checkpoints and kept[-1] == f"checkpoint_step{STEPS:07d}"
