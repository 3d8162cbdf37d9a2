"""The paper preset's model family in CI: a tiny random-weight native InternVL (``InternVLForConditionalGeneration``,
built offline with ``build_options.architecture: internvl``) through bootstrap (as the teacher), instruct, train
(LoRA + DeepSpeed ZeRO-3 under Ray Train, a few steps) and index (its vision tower alone, with the trained adapter),
on the shared local Ray cluster. One run, small counts: the point is that every stage runs this architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meddr_ray.retrieval import store as fi
from meddr_ray.stages.bootstrap import SUMMARY_FILE, run_bootstrap
from meddr_ray.stages.parts import part_files
from meddr_ray.config import PACKAGE_DIR, cache_dir, load_config
from meddr_ray.stages.index import run_index
from meddr_ray.stages.instruct import run_instruct
from meddr_ray.model import load_model
from meddr_ray.model.vision_encoder import VisionEncoder, load_vision_encoder
from meddr_ray.stages.train.stage import run_train

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~1.5-3 min on 2 cores: four stages

NPZ = PACKAGE_DIR / "assets" / "breastmnist.npz"


def internvl(run_dir: Path):
    model = str(cache_dir() / "models" / "tiny-internvl")
    roles = [
        item
        for role in ("teacher", "student")
        for item in (f"{role}.name=tiny-internvl", f"{role}.path={model}", f"{role}.build_options.architecture=internvl")
    ]
    return load_config(
        "tiny",
        [
            f"run_dir={run_dir}",
            *roles,
            "bootstrap.sources.0.limit=4",
            "bootstrap.pool.batch_size=4",
            "bootstrap.generation.max_new_tokens=8",
            "instruct.sources.0.limit=16",
            "train.max_steps=3",
            "train.checkpoint_every=3",
            "index.sources.0.splits=[train]",
            "index.sources.0.limit=32",
            "index.num_shards=1",
        ],
    )


def test_a_tiny_internvl_runs_bootstrap_train_and_index(ray_cluster, tmp_path):
    cfg = internvl(tmp_path / "run")

    out = run_bootstrap(cfg).path
    summary = json.loads((Path(out) / SUMMARY_FILE).read_text())
    assert (summary["rows_in"], summary["written"], summary["failed"]) == (4, 4, 0)
    table = pq.read_table(part_files(out), columns=["teacher", "report"]).to_pydict()
    assert set(table["teacher"]) == {"tiny-internvl"}
    assert all(r.startswith("Findings:") for r in table["report"])  # the response prefix, then generated text
    assert summary["tokens"] > 0

    run_instruct(cfg)
    adapter = run_train(cfg).path
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] and "language_model" in str(config["target_modules"])

    version = run_index(cfg).path
    loaded = fi.load_index(str(Path(version).parent))
    assert loaded.index.ntotal == 32
    encoder = load_vision_encoder(cfg.student, adapter)
    assert isinstance(encoder, VisionEncoder)  # the adapter left the tower alone: the index read only the tower
    student = load_model(cfg.student, adapter)
    assert loaded.manifest["encoder_fingerprint"] == encoder.encoder_fingerprint() == student.encoder_fingerprint()
    image = Image.fromarray(np.load(NPZ)["train_images"][5]).convert("RGB")
    scores, found = loaded.index.search(student.embed([image]), 1)
    values = loaded.values.select(["source_index"]).to_pylist()
    assert values[int(found[0][0])]["source_index"] == 5 and scores[0][0] == pytest.approx(1.0, abs=1e-4)
