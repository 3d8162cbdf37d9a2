"""The one-GPU preset (``gpu1``, benchmarks/gpu_smoke.sh): it loads and validates, asks for the GPU in every stage
that runs a model (and only there), uses the smol teacher and student, and fits one GPU; the smoke script parses
and runs those stages with it. No GPU is needed: this checks what the preset asks Ray for."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meddr_ray.config import available_presets, load_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "benchmarks" / "gpu_smoke.sh"


def test_gpu1_loads_validates_and_uses_the_smol_models():
    assert "gpu1" in available_presets()
    cfg = load_config("gpu1")
    assert cfg.preset == "gpu1"
    for role in (cfg.teacher, cfg.student):
        assert role.build == "smol" and role.dtype == "bfloat16" and role.device in ("auto", "cuda")
    # one checkpoint folder, so its build options must agree (one build, not two racing for the folder)
    assert cfg.teacher.path == cfg.student.path and cfg.teacher.build_options == cfg.student.build_options
    assert cfg.train.precision == "bf16"


def test_gpu1_asks_for_the_gpu_where_a_model_runs_and_fits_one_gpu():
    cfg = load_config("gpu1")
    # the model stages: teacher, encoder and student actors, the Ray Train worker, the Serve generator
    assert cfg.bootstrap.pool.num_gpus == 1 and cfg.bootstrap.pool.max_actors == 1
    assert cfg.index.pool.num_gpus == 1 and cfg.index.pool.max_actors == 1
    assert cfg.evaluate.pool.num_gpus == 1 and cfg.evaluate.pool.max_actors == 1
    assert cfg.train.use_gpu and cfg.train.num_workers == 1
    assert 0 < cfg.serve.generator.num_gpus <= 1
    assert cfg.serve.generator.num_gpus * cfg.serve.generator.max_replicas <= 1  # every replica fits the one GPU
    # what runs no model takes no GPU: Serve's ingress and retriever, and FAISS
    assert cfg.serve.ingress.num_gpus == 0 and cfg.serve.retriever.num_gpus == 0
    assert cfg.index.device == "cpu"


def test_the_cpu_presets_ask_for_no_gpu():
    """The contrast: what gpu1 changes is not already so in the CPU presets the tests run."""
    for preset in ("tiny", "demo"):
        cfg = load_config(preset)
        gpus = [cfg.bootstrap.pool.num_gpus, cfg.index.pool.num_gpus, cfg.evaluate.pool.num_gpus,
                cfg.serve.generator.num_gpus]
        assert gpus == [0, 0, 0, 0] and not cfg.train.use_gpu, preset


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_smoke_script_parses_and_runs_every_stage_on_gpu1():
    assert SMOKE.is_file(), f"{SMOKE} is missing"
    checked = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    text = SMOKE.read_text()
    assert "PRESET=${PRESET:-gpu1}" in text
    for command in ("bootstrap", "instruct", "train", "index", "evaluate", "serve"):
        assert re.search(rf"^stage {command}\b", text, re.M), f"the smoke script does not run {command}"
    for figure in ("tokens/s", "samples/s", "latency"):
        assert figure in text, f"the smoke script does not print {figure}"
    # its Python parts (heredocs) at least compile
    bodies = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert len(bodies) >= 3
    for body in bodies:
        compile(body, str(SMOKE), "exec")
