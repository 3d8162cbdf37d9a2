"""DICOM images (``format: dicom``), rendered to 8-bit PNG in Ray tasks (see :func:`images.dicom_to_png`).

``src.path`` is one of:
- **a folder**: every ``*.dcm``/``*.dicom`` file below it (recursive), and every file without an extension
  that starts with the DICOM preamble (``DICM`` at byte 128: the driver reads those 132 bytes, nothing more).
  Files are sorted by path; ``source_index`` is the position in that order and ``source_file`` the DICOM
  file. Such rows have no label: a folder says nothing about diagnoses.
- **one DICOM file**: a single row.
- **a CSV**: the labelled case. It is read exactly like an ``image_folder`` CSV (``image_column``,
  ``label_column``, optional ``split``/``modality``, paths relative to ``image_root`` or the CSV's folder),
  but every listed file is decoded as DICOM, with or without a preamble.
Modality: ``src.modality`` if set, else the CSV's ``modality`` column, else the file's ``Modality`` tag.
"""

from __future__ import annotations

import os
from typing import List

import pyarrow.fs as pafs

from meddr_ray import storage
from meddr_ray.config import DataConfig, SourceConfig
from meddr_ray.data.common import IMAGE_REF, WHERE, default_split, default_task, metadata_dataset
from meddr_ray.data.errors import DataError
from meddr_ray.data.image_folder import read_image_folder
from meddr_ray.data.images import is_dicom
from meddr_ray.data.schema import make_row, sample_id

_EXTENSIONS = (".dcm", ".dicom")


def _has_preamble(fs: pafs.FileSystem, path: str) -> bool:
    with fs.open_input_file(path) as f:
        return is_dicom(f.read(132))


def list_dicom_files(path: str) -> List[str]:
    """DICOM files under a folder (or the file itself), sorted."""
    fs, root = storage.resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type != pafs.FileType.Directory:
        raise DataError(f"{path}: no such DICOM file or folder")
    found = []
    for item in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        name = os.path.basename(item.path)
        if item.type != pafs.FileType.File or name.startswith("."):
            continue
        ext = os.path.splitext(name)[1].lower()
        if ext in _EXTENSIONS or (not ext and _has_preamble(fs, item.path)):
            found.append(item.path)
    if not found:
        raise DataError(f"{path}: no DICOM files found (*.dcm, *.dicom, or files with a DICM preamble)")
    prefix = path[: len(path) - len(root)] if "://" in path else ""  # give URIs their scheme back
    return sorted(prefix + p for p in found)


def read_dicom(src: SourceConfig, data_cfg: DataConfig):
    if src.path.lower().endswith(".csv"):
        return read_image_folder(src, data_cfg, dicom=True)
    files = list_dicom_files(src.path)
    if src.limit is not None:
        files = files[: max(0, src.limit)]
    base = src.path if len(files) != 1 or files[0] != src.path else os.path.dirname(src.path)
    split, task = default_split(src), default_task(src)
    rows = []
    for index, path in enumerate(files):
        row = make_row(
            id=sample_id(src.name, split, index),
            dataset=src.name,
            split=split,
            source_index=index,
            source_file=path,
            modality=src.modality,
            task=task,
            label_set=list(src.label_names) if src.label_names else None,
        )
        row[IMAGE_REF] = path  # absolute: find_image uses it as it is
        row[WHERE] = f"{os.path.relpath(path, base) if '://' not in path else path} (file {index})"
        rows.append(row)
    return metadata_dataset(rows, src, data_cfg, dicom=True)
