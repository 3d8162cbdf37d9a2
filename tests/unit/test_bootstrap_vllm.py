"""The vLLM teacher backend's own parts (bootstrap.backend=vllm): what can run without a GPU and without vLLM.

The engine itself needs a GPU; what is checked here is everything around it: the settings it cannot honour are
refused, the rows it gets carry the section 3.1 prompt and the image, its output becomes the same report rows as
the transformers backend writes, and the processor is wired as configured.
"""

import base64
import importlib.util
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meddr_ray.config import ConfigError, GenerationConfig, load_config
from meddr_ray.data import encode_png
from meddr_ray.layout import FAILED_DIR
from meddr_ray.stages import bootstrap, bootstrap_rows, bootstrap_vllm, parts


def _png(size=(20, 16), colour=90) -> bytes:
    return encode_png(Image.new("L", size, colour))


def _sample(i: int, image: bytes, **more):
    row = {
        "id": f"s{i}",
        "dataset": "breastmnist",
        "split": "train",
        "source_file": "breastmnist.npz",
        "source_index": i,
        "modality": "breast ultrasound",
        "label": "malignant",
        "labels": ["malignant"],
        "label_set": ["malignant", "normal, benign"],
        "image": image,
        "error": None,
    }
    row.update(more)
    return row


def test_settings_vllm_cannot_honour_are_refused_by_name():
    cfg = load_config("tiny", ["bootstrap.backend=vllm", "bootstrap.generation.num_beams=2"])
    with pytest.raises(ConfigError, match=r"bootstrap\.generation\.num_beams.*backend=transformers"):
        bootstrap_vllm.check_vllm_config(cfg)
    cfg = load_config("tiny", ["bootstrap.backend=vllm", "bootstrap.impression_prefix='Impression:'"])
    with pytest.raises(ConfigError, match=r"bootstrap\.impression_prefix"):
        bootstrap_vllm.check_vllm_config(cfg)


def test_without_vllm_installed_the_error_says_how_to_install_it():
    cfg = load_config(
        "tiny",
        ["bootstrap.backend=vllm", "bootstrap.generation.response_prefix=", "bootstrap.impression_prefix=null"],
    )
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"pip install -e '\.\[gpu\]'"):
            bootstrap_vllm.check_vllm_config(cfg)
    else:
        bootstrap_vllm.check_vllm_config(cfg)  # a GPU node with the extra: nothing to refuse


def test_an_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match=r"bootstrap\.backend"):
        load_config("tiny", ["bootstrap.backend=tgi"])


def test_sampling_parameters_are_greedy_unless_sampling():
    greedy = bootstrap_vllm.sampling_params(GenerationConfig(max_new_tokens=40, temperature=0.7), seed=3)
    assert greedy == {"max_tokens": 40, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}
    sampled = bootstrap_vllm.sampling_params(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9), seed=3)
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["seed"] == 3


def test_engine_rows_carry_the_prompt_and_the_image_and_bad_images_are_set_aside(tmp_path):
    good = _png()
    batch = pa.Table.from_pylist([_sample(0, good), _sample(1, b"not an image"), _sample(2, None)])
    rows = bootstrap_vllm.engine_inputs(
        batch, generation=GenerationConfig(), out_dir=str(tmp_path), seed=0, max_image_bytes=None,
        max_image_pixels=None,
    )
    assert [r["id"] for r in rows] == ["s0"]
    (turn,) = rows[0]["messages"]
    image_part, text_part = turn["content"]
    assert text_part == {"type": "text", "text": bootstrap_rows.teacher_prompt(_sample(0, good))}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (20, 16) and decoded.mode == "RGB"
    failed = pq.read_table(str(tmp_path / FAILED_DIR)).to_pylist()
    assert sorted(r["id"] for r in failed) == ["s1", "s2"]
    assert all("breastmnist.npz row" in r["error"] for r in failed)


def test_engine_output_becomes_the_same_report_rows_the_transformers_backend_writes(tmp_path):
    cfg = load_config("tiny")
    sample = _sample(0, _png())
    prompt = bootstrap_rows.teacher_prompt(sample)
    engine_row = {**sample, "teacher_prompt": prompt, "generated_text": " Findings: a mass.\nImpression: likely "
                  "malignant.", "num_generated_tokens": 12}
    row = bootstrap_vllm.report_from_engine(engine_row, cfg)
    want = bootstrap_rows.report_row(
        sample, prompt, {"text": "Findings: a mass.\nImpression: likely malignant.", "tokens": 12},
        teacher=cfg.teacher, prompt_version=cfg.bootstrap.prompt_version,
        generation_json=bootstrap_rows.generation_json(cfg.bootstrap.generation),
    )
    assert row == want and row["quality"] == "ok"
    stats = bootstrap_vllm.write_reports(pa.Table.from_pylist([row]), out_dir=str(tmp_path))
    assert stats["written"] == [1] and stats["tokens"] == [12] and stats["quality_ok"] == [1]
    written = pq.read_table(parts.part_files(str(tmp_path))[0])
    assert written.schema.equals(bootstrap_rows.REPORT_SCHEMA) and written.column("id").to_pylist() == ["s0"]
    assert json.loads(written.column("generation")[0].as_py()) == json.loads(bootstrap_rows.generation_json(
        cfg.bootstrap.generation))


def test_the_processor_runs_the_multimodal_stages_on_the_configured_gpus(ray_cluster):
    cfg = load_config("tiny", ["bootstrap.backend=vllm", "bootstrap.pool.num_gpus=4",
                               "bootstrap.vllm_engine_kwargs={max_model_len: 4096}"])
    processor = bootstrap_vllm.vllm_processor(cfg, "/models/teacher")
    names = processor.list_stage_names()
    assert names[0].startswith("PrepareMultimodal") and "vLLMEngineStage" in names
    engine = processor.get_stage_by_name("vLLMEngineStage")
    kwargs = engine.fn_constructor_kwargs["engine_kwargs"]
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["max_model_len"] == 4096


def test_with_on_error_raise_a_bad_image_stops_the_job_naming_its_row(tmp_path):
    from meddr_ray.data import DataError

    batch = pa.Table.from_pylist([_sample(0, _png()), _sample(7, b"not an image")])
    with pytest.raises(DataError, match=r"breastmnist\.npz row 7"):
        bootstrap_vllm.engine_inputs(
            batch, generation=GenerationConfig(), out_dir=str(tmp_path), seed=0, max_image_bytes=None,
            max_image_pixels=None, on_error="raise",
        )
    assert not (tmp_path / FAILED_DIR).exists()  # nothing set aside: the row stopped the job


def test_the_job_refuses_the_vllm_backend_before_any_work(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "bootstrap.backend=vllm"])  # tiny: response_prefix
    with pytest.raises(ConfigError, match=r"bootstrap\.generation\.response_prefix"):
        bootstrap.run_bootstrap(cfg)
    assert not (tmp_path / "run").exists()
