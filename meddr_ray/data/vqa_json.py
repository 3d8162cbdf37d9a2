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
Row ids: the ``id_column`` value (set ``id_column: qid`` for SLAKE), else the image path and a hash of
the fields above, so questions added to the file leave every other id as it was.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from meddr_ray.config import DataConfig, SourceConfig
from meddr_ray.data.common import (
    IMAGE_REF,
    WHERE,
    RowIds,
    check_on_error,
    confine_image_ref,
    default_split,
    default_task,
    fail,
    limit_reached,
    metadata_dataset,
    read_records,
    row_where,
)
from meddr_ray.data.errors import DataError
from meddr_ray.data.schema import make_row

_IMAGE_FIELDS = ("img_name", "image_name", "image")


def _first_present(rec: Dict[str, Any], *fields: str) -> Optional[Any]:
    return _first_field(rec, *fields)[1]


def _first_field(rec: Dict[str, Any], *fields: str) -> Tuple[Optional[str], Optional[Any]]:
    """``(field, value)`` of the first field present (the first item of a list), or ``(None, None)``."""
    for name in fields:
        value = rec.get(name)
        if value not in (None, "", []):
            return name, (value[0] if isinstance(value, list) else value)
    return None, None


def _answer_type(rec: Dict[str, Any], answer: str) -> str:
    stated = rec.get("answer_type")
    if stated:
        return str(stated).strip().upper()
    return "CLOSED" if answer.strip().lower() in ("yes", "no") else "OPEN"


def vqa_rows(src: SourceConfig, data_cfg: DataConfig) -> List[Dict[str, Any]]:
    """Metadata rows of a VQA file (driver side: no image is read)."""
    on_error = check_on_error(data_cfg)
    records = read_records(src.path)
    task, fallback_split = default_task(src), default_split(src)
    image_fields = tuple(dict.fromkeys((src.image_column, *_IMAGE_FIELDS)))
    content = (*image_fields, "question", "answer", "answer_type", "split", "modality", "image_organ", "q_lang")
    row_id = RowIds(src, content)
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
        image_field, image = _first_field(rec, *image_fields)
        row = make_row(
            id=row_id(rec, split, image, where),
            dataset=src.name,
            split=split,
            source_index=index,
            source_file=src.path,
            modality=src.modality or _first_present(rec, "modality", "image_organ"),
            task=task,
            question=None if question is None else str(question).strip(),
            answer=None if answer is None else str(answer).strip(),
        )
        row[IMAGE_REF], row[WHERE] = None, where
        try:
            row[IMAGE_REF] = confine_image_ref(image, image_field, src, where)
            if not row["question"] or row["answer"] is None:
                raise DataError(f"{where}: a VQA record needs 'question' and 'answer'")
            row["answer_type"] = _answer_type(rec, row["answer"])
            if row[IMAGE_REF] is None and src.require_images:
                raise DataError(f"{where}: no image named (looked for {', '.join(image_fields)})")
        except DataError as exc:
            fail(row, str(exc), on_error)
        rows.append(row)
    return rows


def read_vqa_json(src: SourceConfig, data_cfg: DataConfig, *, skip: Optional[Callable[[str], bool]] = None):
    """Ray Dataset of a VQA file's questions; rows whose id ``skip`` is true for are left out before any image
    is read."""
    return metadata_dataset(vqa_rows(src, data_cfg), src, data_cfg, skip=skip)
