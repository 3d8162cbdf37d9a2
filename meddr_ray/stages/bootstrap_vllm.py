"""The teacher on vLLM, through ``ray.data.llm`` (``bootstrap.backend: vllm``): for a paper-scale teacher on GPUs.

The default backend (``transformers``, :class:`meddr_ray.stages.bootstrap.TeacherWriter`) runs ``generate`` in a Ray
Data actor; it is the one tested on CPUs. A 40B teacher on a GPU cluster wants continuous batching, paged KV
cache and tensor parallelism instead, which is what vLLM's engine under ``ray.data.llm`` gives. Both backends
read the same samples, see the same section 3.1 prompt and write the same files (:mod:`.bootstrap_rows` rows in :mod:`.parts` files
named by a hash of their ids, bad rows in ``failed/``), so the stages after bootstrap cannot tell them apart.

The pipeline, all streaming (images never pass through the driver):
1. :func:`engine_inputs` (CPU tasks) decodes and checks each image, sets bad rows aside in ``failed/``, and turns
   the rest into OpenAI-format chat messages (image as a PNG data URL) with per-row sampling parameters;
2. ``ray.data.llm``'s vLLM processor (chat template, multimodal preparation, engine, detokenize);
3. :func:`write_reports` turns the engine's output into report rows, writes them and returns one row of counts.

Install: ``pip install -e '.[gpu]'`` (vLLM comes with ``ray[llm]``). Not available here: this machine has no
GPU and vLLM needs one; the pure parts (messages, sampling parameters, report rows, config checks) are tested.
"""

from __future__ import annotations

import base64
import importlib.util
from typing import Any, Dict, List

import pyarrow as pa

from meddr_ray.config import Config, ConfigError, GenerationConfig
from meddr_ray.data import DataError, decode_image, encode_png
from meddr_ray.data.errors import sample_where
from meddr_ray.layout import FAILED_DIR
from meddr_ray.report_sections import QUALITIES
from meddr_ray.stages.bootstrap_rows import REPORT_SCHEMA, generation_json, report_row, teacher_prompt
from meddr_ray.stages.parts import FAILED_SCHEMA, batch_seed, failed_row, write_table
from meddr_ray.storage import join_path

# Row columns the engine needs; every other column of the sample is carried through to the report row.
ENGINE_COLUMNS = ("messages", "sampling_params")


def check_vllm_config(cfg: Config) -> None:
    """Refuse, before any Ray work, the settings vLLM cannot honour (rather than silently ignoring them)."""
    gen = cfg.bootstrap.generation
    unsupported = {
        "bootstrap.generation.num_beams": gen.num_beams != 1,
        "bootstrap.generation.no_repeat_ngram_size": gen.no_repeat_ngram_size != 0,
        "bootstrap.generation.response_prefix": bool(gen.response_prefix),
        "bootstrap.impression_prefix": bool(cfg.bootstrap.impression_prefix),
    }
    named = [key for key, used in unsupported.items() if used]
    if named:
        raise ConfigError(
            f"bootstrap.backend=vllm does not support {', '.join(named)} (vLLM's sampler has no beam search or "
            f"n-gram ban here, and the chat template cannot continue a prefilled answer); unset them, or use "
            f"bootstrap.backend=transformers"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "bootstrap.backend=vllm needs vLLM on every GPU node: pip install -e '.[gpu]' (it installs "
            "ray[llm], which brings vLLM); bootstrap.backend=transformers needs nothing more"
        )


def sampling_params(gen: GenerationConfig, seed: int) -> Dict[str, Any]:
    """vLLM ``SamplingParams`` fields for ``gen``: greedy unless ``do_sample``; ``seed`` fixes a row's sample."""
    params: Dict[str, Any] = {
        "max_tokens": gen.max_new_tokens,
        "temperature": gen.temperature if gen.do_sample else 0.0,
        "top_p": gen.top_p if gen.do_sample else 1.0,
        "repetition_penalty": gen.repetition_penalty,
    }
    if gen.do_sample:
        params["seed"] = seed
    return params


def teacher_messages(prompt: str, png: bytes) -> List[Dict[str, Any]]:
    """One user turn in OpenAI chat format: the image (a PNG data URL, so no node needs the source files) and
    the section 3.1 prompt."""
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
        }
    ]


def engine_inputs(
    batch: pa.Table,
    *,
    generation: GenerationConfig,
    out_dir: str,
    seed: int,
    max_image_bytes,
    max_image_pixels,
    on_error: str = "skip",
) -> List[Dict[str, Any]]:
    """A batch of samples -> engine rows (Ray Data tasks); bad images go to ``failed/`` with their error, or,
    with ``on_error="raise"``, stop the job naming the file and row (as the transformers actor does)."""
    good, bad = [], []
    for row in batch.to_pylist():
        where = sample_where(row, full_path=True)
        try:
            if row.get("error"):
                raise DataError(row["error"])
            if not row.get("image"):
                raise DataError(f"{where}: no image")
            image = decode_image(row["image"], where=where, max_bytes=max_image_bytes, max_pixels=max_image_pixels)
        except DataError as exc:
            if on_error == "raise":
                raise
            bad.append(failed_row(row, str(exc)))
            continue
        prompt = teacher_prompt(row)
        row.update(
            teacher_prompt=prompt,
            messages=teacher_messages(prompt, encode_png(image)),
            sampling_params=sampling_params(generation, batch_seed(seed, [row["id"]])),
        )
        good.append(row)
    if bad:
        write_table(join_path(out_dir, FAILED_DIR), pa.Table.from_pylist(bad, schema=FAILED_SCHEMA))
    return good


def report_from_engine(row: Dict[str, Any], cfg: Config) -> Dict[str, Any]:
    """A :data:`REPORT_SCHEMA` row from the engine's output row (``generated_text``, ``num_generated_tokens``)."""
    generated = {"text": (row.get("generated_text") or "").strip(), "tokens": row.get("num_generated_tokens") or 0}
    return report_row(
        row,
        row["teacher_prompt"],
        generated,
        teacher=cfg.teacher,
        prompt_version=cfg.bootstrap.prompt_version,
        generation_json=generation_json(cfg.bootstrap.generation),
    )


def vllm_processor(cfg: Config, model_path: str):
    """``ray.data.llm``'s vLLM processor for the teacher: one engine per ``pool`` actor, ``pool.num_gpus`` GPUs
    each (tensor parallel across them), batches of ``pool.batch_size`` rows."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    pool = cfg.bootstrap.pool
    gpus = max(1, int(pool.num_gpus))
    engine_kwargs = {"tensor_parallel_size": gpus, "trust_remote_code": cfg.teacher.trust_remote_code}
    engine_kwargs.update(cfg.bootstrap.vllm_engine_kwargs)
    concurrency = pool.max_actors if pool.min_actors == pool.max_actors else (pool.min_actors, pool.max_actors)
    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs,
        concurrency=concurrency,
        batch_size=pool.batch_size,
        prepare_multimodal_stage=True,
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=True,
    )
    return build_processor(
        config,
        postprocess=lambda row: report_from_engine(row, cfg),
    )


def write_reports(batch: pa.Table, *, out_dir: str) -> Dict[str, List[Any]]:
    """Writes a batch of report rows as one part file (named by its ids, so a retried batch rewrites the same
    file) and returns one row of counts, as :class:`meddr_ray.stages.bootstrap.TeacherWriter` does."""
    rows = batch.select(REPORT_SCHEMA.names).to_pylist() if batch.num_rows else []
    if rows:
        write_table(out_dir, pa.Table.from_pylist(rows, schema=REPORT_SCHEMA))
    stats: Dict[str, List[Any]] = {"written": [len(rows)], "tokens": [sum(r["tokens"] for r in rows)]}
    for q in QUALITIES:
        stats[f"quality_{q}"] = [sum(r["quality"] == q for r in rows)]
    return stats


def vllm_report_stats(cfg: Config, ds, out_dir: str, model_path: str):
    """The vLLM pipeline over ``ds`` (samples still to do): a dataset of count rows, one per written part."""
    pool = cfg.bootstrap.pool
    engine_rows = ds.map_batches(
        engine_inputs,
        fn_kwargs=dict(
            generation=cfg.bootstrap.generation,
            out_dir=out_dir,
            seed=cfg.seed,
            max_image_bytes=cfg.data.max_image_bytes,
            max_image_pixels=cfg.data.max_image_pixels,
            on_error=cfg.data.on_error,
        ),
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        num_cpus=0.5,
    )
    reports = vllm_processor(cfg, model_path)(engine_rows)
    return reports.map_batches(
        write_reports,
        fn_kwargs=dict(out_dir=out_dir),
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        num_cpus=0.25,
    )
