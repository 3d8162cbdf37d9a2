"""Medical VQA from a JSON list of question records (``format: vqa_json``): SLAKE, VQA-RAD, PathVQA.

Fields per record (the first one present wins):
- image: ``src.image_column``, ``img_name`` (SLAKE), ``image_name`` (VQA-RAD), ``image`` (PathVQA and others);
- ``question``, ``answer`` (VQA-RAD has numeric answers: kept as text);
- modality: ``src.modality`` if set, else ``modality`` (SLAKE: CT/MRI/X-Ray), else ``image_organ`` (VQA-RAD);
- ``answer_type`` (OPEN/CLOSED, normalised to upper case); when absent (PathVQA) a yes/no answer is CLOSED
  and anything else OPEN, the usual convention for scoring closed questions separately;
- ``q_lang``: rows of another language than ``src.language`` are left out (SLAKE is English + Chinese);
- ``split``: filtered by ``src.splits``; without it every row is in the first configured split.
``.jsonl`` files (one record per line) are read as well.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from meddr_ray.config import DataConfig, SourceConfig
from meddr_ray.data.common import (
    IMAGE_REF,
    WHERE,
    check_on_error,
    default_split,
    default_task,
    fail,
    limit_reached,
    metadata_dataset,
    read_records,
    row_where,
)
from meddr_ray.data.errors import DataError
from meddr_ray.data.schema import make_row, sample_id

_IMAGE_FIELDS = ("img_name", "image_name", "image")


def _first_present(rec: Dict[str, Any], *fields: str) -> Optional[Any]:
    for name in fields:
        value = rec.get(name)
        if value not in (None, "", []):
            return value[0] if isinstance(value, list) else value
    return None


def _answer_type(rec: Dict[str, Any], answer: str) -> str:
    stated = rec.get("answer_type")
    if stated:
        return str(stated).strip().upper()
    return "CLOSED" if answer.strip().lower() in ("yes", "no") else "OPEN"


def read_vqa_json(src: SourceConfig, data_cfg: DataConfig):
    on_error = check_on_error(data_cfg)
    records = read_records(src.path)
    task, fallback_split = default_task(src), default_split(src)
    rows = []
    for index, rec in enumerate(records):
        if limit_reached(rows, src):
            break
        if src.language and "q_lang" in rec and rec["q_lang"] != src.language:
            continue
        split = rec.get("split") or fallback_split
        if split not in src.splits:
            continue
        where = row_where(src.path, index)
        question, answer = rec.get("question"), rec.get("answer")
        row = make_row(
            id=sample_id(src.name, split, index),
            dataset=src.name,
            split=split,
            source_index=index,
            source_file=src.path,
            modality=src.modality or _first_present(rec, "modality", "image_organ"),
            task=task,
            question=None if question is None else str(question).strip(),
            answer=None if answer is None else str(answer).strip(),
        )
        row[IMAGE_REF] = _first_present(rec, src.image_column, *_IMAGE_FIELDS)
        row[WHERE] = where
        try:
            if not row["question"] or row["answer"] is None:
                raise DataError(f"{where}: a VQA record needs 'question' and 'answer'")
            row["answer_type"] = _answer_type(rec, row["answer"])
            if row[IMAGE_REF] is None and src.require_images:
                fields = ", ".join(dict.fromkeys((src.image_column, *_IMAGE_FIELDS)))
                raise DataError(f"{where}: no image named (looked for {fields})")
        except DataError as exc:
            fail(row, str(exc), on_error)
        rows.append(row)
    return metadata_dataset(rows, src, data_cfg)
