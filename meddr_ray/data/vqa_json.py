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
from meddr_ray.data.common import IMAGE_REF, Record, metadata_dataset, read_records, table_rows
from meddr_ray.data.errors import DataError

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


def _stripped(value: Any) -> Optional[str]:
    return None if value is None else str(value).strip()


def vqa_rows(src: SourceConfig, data_cfg: DataConfig) -> List[Dict[str, Any]]:
    """Metadata rows of a VQA file (driver side: no image is read)."""
    image_fields = tuple(dict.fromkeys((src.image_column, *_IMAGE_FIELDS)))

    def in_language(rec: Dict[str, Any]) -> bool:
        return not (src.language and "q_lang" in rec and rec["q_lang"] != src.language)

    def take(rec: Dict[str, Any]) -> Record:
        image_field, image = _first_field(rec, *image_fields)
        fields = {
            "modality": src.modality or _first_present(rec, "modality", "image_organ"),
            "question": _stripped(rec.get("question")),
            "answer": _stripped(rec.get("answer")),
        }
        return Record(image, image_field, fields)

    def check(row: Dict[str, Any], rec: Dict[str, Any], where: str) -> None:
        if not row["question"] or row["answer"] is None:
            raise DataError(f"{where}: a VQA record needs 'question' and 'answer'")
        row["answer_type"] = _answer_type(rec, row["answer"])
        if row[IMAGE_REF] is None and src.require_images:
            raise DataError(f"{where}: no image named (looked for {', '.join(image_fields)})")

    id_fields = (*image_fields, "question", "answer", "answer_type", "split", "modality", "image_organ", "q_lang")
    records = read_records(src.path)
    return table_rows(src, data_cfg, records, id_fields=id_fields, take=take, check=check, keep=in_language)


def read_vqa_json(src: SourceConfig, data_cfg: DataConfig, *, skip: Optional[Callable[[str], bool]] = None):
    """Ray Dataset of a VQA file's questions; rows whose id ``skip`` is true for are left out before any image
    is read."""
    return metadata_dataset(vqa_rows(src, data_cfg), src, data_cfg, skip=skip)
