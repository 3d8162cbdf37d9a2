"""Images in a folder + a labels CSV (``format: image_folder``), e.g. HAM10000 or any classification set.

The CSV has one row per image: ``image_column`` (a path relative to ``image_root``, default the CSV's folder;
without an extension .jpg/.jpeg/.png/.dcm are tried, so HAM10000's ``image_id`` works as it is) and
``label_column`` (a class name, an index into ``label_names``, or ``|``-separated names for multi-label).
Optional columns: ``split`` (filtered by ``src.splits``) and ``modality``.

HAM10000: ``image_column: image_id``, ``label_column: dx``, ``image_root: <folder of the JPEGs>``.

The label set is ``label_names`` if given, else the sorted distinct labels of the whole CSV (all splits, so
train and test agree). Labels are checked on the driver; images are read in Ray tasks. Row ids: the ``id_column``
value, else ``<name>/<split>/<image path>#<hash of the row>`` (see :class:`~meddr_ray.data.common.RowIds`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from meddr_ray.config import DataConfig, SourceConfig
from meddr_ray.data.common import IMAGE_REF, Record, metadata_dataset, read_records, require_columns, table_rows
from meddr_ray.data.errors import DataError


def _parts(value: Optional[str]) -> List[str]:
    return [p.strip() for p in (value or "").split("|") if p.strip()]


def _resolve_label(part: str, label_set: List[str], explicit: bool, where: str) -> str:
    if part in label_set:
        return part
    if explicit and part.isdigit() and int(part) < len(label_set):  # an index into label_names
        return label_set[int(part)]
    raise DataError(f"{where}: label {part!r} is not one of the label_names {label_set}")


def labelled_rows(src: SourceConfig, data_cfg: DataConfig) -> List[Dict[str, Any]]:
    """Metadata rows of a labels CSV (shared with the DICOM reader's CSV mode)."""
    records = read_records(src.path)
    require_columns(src.path, records, [src.image_column, src.label_column])
    explicit = bool(src.label_names)
    label_set = list(src.label_names) if explicit else sorted({p for r in records for p in _parts(r[src.label_column])})

    def take(rec: Dict[str, Any]) -> Record:
        fields = {"modality": src.modality or rec.get("modality"), "label_set": label_set}
        return Record(rec.get(src.image_column), src.image_column, fields)

    def check(row: Dict[str, Any], rec: Dict[str, Any], where: str) -> None:
        if not row[IMAGE_REF] and src.require_images:
            raise DataError(f"{where}: no image file named in column {src.image_column!r}")
        parts = _parts(rec.get(src.label_column))
        if not parts:
            raise DataError(f"{where}: empty label in column {src.label_column!r}")
        row["labels"] = [_resolve_label(p, label_set, explicit, where) for p in parts]
        row["label"] = ", ".join(row["labels"])

    id_fields = [src.image_column, src.label_column, "split", "modality"]
    return table_rows(src, data_cfg, records, id_fields=id_fields, take=take, check=check)


def read_image_folder(
    src: SourceConfig,
    data_cfg: DataConfig,
    *,
    dicom: Optional[bool] = None,
    skip: Optional[Callable[[str], bool]] = None,
):
    """Ray Dataset of the labelled images a CSV lists (``dicom=True``: the files are DICOM, see dicom.py); rows
    whose id ``skip`` is true for are left out before any image is read."""
    return metadata_dataset(labelled_rows(src, data_cfg), src, data_cfg, dicom=dicom, skip=skip)
