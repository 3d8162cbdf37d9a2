"""Report generation data (``format: reports``): IU X-ray JSONL, MIMIC-CXR-style CSV (chosen by extension).

Fields per record:
- image: ``src.image_column`` (default ``image``); a list of views (IU X-ray) -> the first one;
- report: ``src.text_column`` (default ``text``); if that column is absent or empty, ``report``; else
  ``findings`` and ``impression`` joined with a space (MIMIC-CXR sections, R2Gen style);
- ``split``: filtered by ``src.splits``; without it every row is in the first configured split;
- modality: ``src.modality`` or a ``modality`` column; otherwise none (the report prompt then names none).
Row ids: the ``id_column`` value, else the image path and a hash of the fields above (stable under inserts).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from meddr_ray.config import DataConfig, SourceConfig
from meddr_ray.data.common import IMAGE_REF, Record, metadata_dataset, read_records, table_rows
from meddr_ray.data.errors import DataError


def _text(value: Any) -> Optional[str]:
    text = "" if value is None else str(value).strip()
    return text or None


def report_text(rec: Dict[str, Any], text_column: str) -> Optional[str]:
    text = _text(rec.get(text_column)) or _text(rec.get("report"))
    if text:
        return text
    sections = [t for t in (_text(rec.get("findings")), _text(rec.get("impression"))) if t]
    return " ".join(sections) or None


def report_rows(src: SourceConfig, data_cfg: DataConfig) -> List[Dict[str, Any]]:
    """Metadata rows of a reports file (driver side: no image is read)."""

    def take(rec: Dict[str, Any]) -> Record:
        image = rec.get(src.image_column)
        image = (image[0] if image else None) if isinstance(image, list) else _text(image)
        fields = {"modality": src.modality or _text(rec.get("modality")), "report": report_text(rec, src.text_column)}
        return Record(image, src.image_column, fields)

    def check(row: Dict[str, Any], rec: Dict[str, Any], where: str) -> None:
        if row["report"] is None:
            looked = f"{src.text_column!r}, 'report', 'findings'/'impression'"
            raise DataError(f"{where}: no report text (looked for {looked})")
        if row[IMAGE_REF] is None and src.require_images:
            raise DataError(f"{where}: no image named in column {src.image_column!r}")

    id_fields = (src.image_column, src.text_column, "report", "findings", "impression", "split", "modality")
    return table_rows(src, data_cfg, read_records(src.path), id_fields=id_fields, take=take, check=check)


def read_reports(src: SourceConfig, data_cfg: DataConfig, *, skip: Optional[Callable[[str], bool]] = None):
    """Ray Dataset of a reports file; rows whose id ``skip`` is true for are left out before any image is read."""
    return metadata_dataset(report_rows(src, data_cfg), src, data_cfg, skip=skip)
