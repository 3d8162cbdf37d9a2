"""What both bootstrap backends write (:mod:`meddr_ray.stages.bootstrap`'s transformers actor and
:mod:`meddr_ray.stages.bootstrap_vllm`): the report row (:data:`REPORT_SCHEMA`) and the section 3.1 prompt the
teacher sees, so the stages after bootstrap cannot tell the backends apart."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict

import pyarrow as pa

from meddr_ray import prompts
from meddr_ray.config import GenerationConfig, ModelConfig
from meddr_ray.prompts import DEFAULT_MODALITY
from meddr_ray.report_sections import split_report

REPORT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # the sample's id, stable under inserts (data.schema)
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("source_index", pa.int64()),
        pa.field("modality", pa.string()),
        pa.field("label", pa.string()),  # ", "-joined diagnosis
        pa.field("labels", pa.list_(pa.string())),  # every label the teacher was told
        pa.field("label_set", pa.list_(pa.string())),
        pa.field("image", pa.binary()),  # encoded image, as read
        pa.field("prompt", pa.string()),  # the exact instruction the teacher saw
        pa.field("report", pa.string()),  # the teacher's whole text
        pa.field("findings", pa.string()),  # null when absent
        pa.field("impression", pa.string()),  # null when absent
        pa.field("quality", pa.string()),  # ok | partial | no_sections | empty (meddr_ray.report_sections)
        pa.field("teacher", pa.string()),  # teacher model name
        pa.field("teacher_path", pa.string()),  # teacher checkpoint directory
        pa.field("prompt_version", pa.string()),
        pa.field("generation", pa.string()),  # decoding settings, JSON
        pa.field("tokens", pa.int64()),  # generated tokens
    ]
)


def teacher_prompt(row: Dict[str, Any]) -> str:
    """The section 3.1 prompt of a sample: its modality and every one of its labels."""
    labels = [x for x in (row.get("labels") or []) if x] or [row.get("label") or ""]
    return prompts.bootstrap_prompt(row.get("modality") or DEFAULT_MODALITY, labels)


def report_row(
    sample: Dict[str, Any],
    prompt: str,
    generated: Dict[str, Any],
    *,
    teacher: ModelConfig,
    prompt_version: str,
    generation_json: str,
) -> Dict[str, Any]:
    """An output row (:data:`REPORT_SCHEMA`) from an input sample and the teacher's ``{"text", "tokens"}``."""
    text = generated.get("text") or ""
    parts = split_report(text)
    return {
        "id": sample["id"],
        "dataset": sample.get("dataset"),
        "split": sample.get("split"),
        "source_index": sample.get("source_index"),
        "modality": sample.get("modality"),
        "label": sample.get("label"),
        "labels": list(sample.get("labels") or []),
        "label_set": list(sample.get("label_set") or []),
        "image": sample.get("image"),
        "prompt": prompt,
        "report": text,
        "findings": parts.findings,
        "impression": parts.impression,
        "quality": parts.quality,
        "teacher": teacher.name,
        "teacher_path": teacher.path,
        "prompt_version": prompt_version,
        "generation": generation_json,
        "tokens": int(generated.get("tokens") or 0),
    }


def generation_json(gen: GenerationConfig) -> str:
    return json.dumps(dataclasses.asdict(gen), sort_keys=True)
