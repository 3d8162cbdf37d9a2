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
    on_error = check_on_error(data_cfg)
    records = read_records(src.path)
    task, fallback_split = default_task(src), default_split(src)
    content = (src.image_column, src.text_column, "report", "findings", "impression", "split", "modality")
    row_id = RowIds(src, content)
    rows = []
    for index, rec in enumerate(records):
        if limit_reached(rows, src):
            break
        split = rec.get("split") or fallback_split
        if split not in src.splits:
            continue
        where = row_where(src.path, index)
        image = rec.get(src.image_column)
        image = (image[0] if image else None) if isinstance(image, list) else _text(image)
        row = make_row(
            id=row_id(rec, split, image, where),
            dataset=src.name,
            split=split,
            source_index=index,
            source_file=src.path,
            modality=src.modality or _text(rec.get("modality")),
            task=task,
            report=report_text(rec, src.text_column),
        )
        row[IMAGE_REF], row[WHERE] = None, where
        try:
            row[IMAGE_REF] = confine_image_ref(image, src.image_column, src, where)
            if row["report"] is None:
                looked = f"{src.text_column!r}, 'report', 'findings'/'impression'"
                raise DataError(f"{where}: no report text (looked for {looked})")
            if row[IMAGE_REF] is None and src.require_images:
                raise DataError(f"{where}: no image named in column {src.image_column!r}")
        except DataError as exc:
            fail(row, str(exc), on_error)
        rows.append(row)
    return rows


def read_reports(src: SourceConfig, data_cfg: DataConfig, *, skip: Optional[Callable[[str], bool]] = None):
    """Ray Dataset of a reports file; rows whose id ``skip`` is true for are left out before any image is read."""
    return metadata_dataset(report_rows(src, data_cfg), src, data_cfg, skip=skip)
