"""``meddr-ray train --config tiny`` end to end: ZeRO-3 on 2 CPU workers, a PEFT adapter out, then the Ray job
script ``jobs/finetune.py`` re-run with a larger ``train.max_steps`` continues from the checkpoint, not from 0.

Each command is a separate process with its own local Ray cluster, as a user would run them; each runs in its
own session so a timeout can kill the whole process group (driver, Ray daemons, workers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meddr_ray.config import load_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _run(args, timeout=600) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args[:4])} timed out after {timeout} s:\n{out[-4000:]}")
    finally:
        try:  # the local Ray cluster the command started must not outlive it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{' '.join(args)} exited with {proc.returncode}:\n{out[-6000:]}"
    return out


def test_cli_trains_with_zero3_and_the_job_resumes_it(tmp_path):
    run = [f"run_dir={tmp_path}"]
    _run([sys.executable, "-m", "meddr_ray.cli", "instruct", "--config", "tiny", *run, "instruct.use_bootstrap=false"])

    out = _run([sys.executable, "-m", "meddr_ray.cli", "train", "--config", "tiny", *run])
    assert "2 workers, ZeRO-3, fp32" in out
    assert "trainable parameters:" in out
    assert f"train: wrote {tmp_path / 'adapter'}" in out
    adapter = tmp_path / "adapter"
    meta = json.loads((adapter / "meddr.json").read_text())
    cfg = load_config("tiny", run)
    assert meta["final_metrics"]["step"] == cfg.train.max_steps == 20
    assert meta["plan"]["accumulation"] == 2 and meta["plan"]["world_size"] == 2
    assert meta["config_fingerprint"] == cfg.fingerprint()

    # the adapter is PEFT format on the base model, and the library's loader accepts it
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from meddr_ray.config import GenerationConfig
    from meddr_ray.model import load_model

    peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(cfg.student.path), adapter)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    tuned = load_model(cfg.student, adapter_dir=str(adapter))
    from PIL import Image

    answer = tuned.generate([Image.new("RGB", (28, 28))], ["diagnose"], GenerationConfig(max_new_tokens=4))
    assert answer and isinstance(answer[0]["text"], str)

    # the Ray job script, same run, more steps: it continues from the checkpoint of step 20
    out = _run([sys.executable, "jobs/finetune.py", "--config", "tiny", *run, "train.max_steps=26", "train.merge_lora=true"])
    assert "resuming at step 20" in out
    meta = json.loads((adapter / "meddr.json").read_text())
    events = meta["events"]
    assert [(e["resumed"], e["start_step"]) for e in events] == [(False, 0), (True, 20)]
    assert events[1].get("data_position", "verified") == "verified"
    steps = [h["step"] for h in meta["history"] if "loss" in h]
    # one history across both runs: no step twice (a restart from 0 would repeat 5, 10, ...), none missing
    assert steps == sorted(set(steps)) and steps[-1] == 26
    assert {5, 10, 15, 20, 25} <= set(steps)

    # train.merge_lora: the base model with the adapter merged in, a plain checkpoint that loads without peft
    from meddr_ray.config import ModelConfig

    merged = load_model(ModelConfig(name="merged", path=str(tmp_path / "merged")))
    again = load_model(cfg.student, adapter_dir=str(adapter))
    image = Image.new("RGB", (28, 28), color=(90, 90, 90))
    assert merged.embed([image])[0].tolist() == pytest.approx(again.embed([image])[0].tolist(), abs=1e-5)
    gen = GenerationConfig(max_new_tokens=4)
    assert merged.generate([image], ["diagnose"], gen) == again.generate([image], ["diagnose"], gen)
