"""DICOM images (``format: dicom``), rendered to 8-bit PNG in Ray tasks (see :func:`images.dicom_to_png`).

``src.path`` is one of:
- **a folder**: every ``*.dcm``/``*.dicom`` file below it (recursive), and every file without an extension
  that starts with the DICOM preamble (``DICM`` at byte 128: the driver reads those 132 bytes, nothing more).
  Files are sorted by path; the row id is ``<name>/<split>/<path relative to the folder>``, so a file added
  later leaves every other id as it was; ``source_index`` (the position in that order, for messages only) and
  ``source_file`` (the DICOM file) say where it came from. Such rows have no label: a folder says nothing about
  diagnoses.
- **one DICOM file**: a single row (id: the file's name).
- **a CSV**: the labelled case. It is read exactly like an ``image_folder`` CSV (``image_column``,
  ``label_column``, optional ``split``/``modality``, paths relative to ``image_root`` or the CSV's folder),
  but every listed file is decoded as DICOM, with or without a preamble.
Modality: ``src.modality`` if set, else the CSV's ``modality`` column, else the file's ``Modality`` tag.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

import pyarrow.fs as pafs

from meddr_ray import storage
from meddr_ray.config import DataConfig, SourceConfig
from meddr_ray.data.common import default_split, default_task, metadata_dataset, metadata_row
from meddr_ray.data.errors import DataError
from meddr_ray.data.image_folder import read_image_folder
from meddr_ray.data.images import is_dicom
from meddr_ray.data.schema import keyed_id

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


def _relative(path: str, base: str) -> str:
    """``path`` relative to the folder ``base`` (posix separators; URIs keep their scheme in both)."""
    if "://" not in path:
        return os.path.relpath(path, base).replace(os.sep, "/")
    prefix = base.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def dicom_rows(src: SourceConfig) -> List[Dict[str, Any]]:
    """Metadata rows of a DICOM folder or file (driver side: only listings and 132-byte preambles are read)."""
    files = list_dicom_files(src.path)
    if src.limit is not None:
        files = files[: max(0, src.limit)]
    base = src.path if len(files) != 1 or files[0] != src.path else os.path.dirname(src.path)
    split, task = default_split(src), default_task(src)
    rows = []
    for index, path in enumerate(files):
        relative = _relative(path, base)
        row = metadata_row(
            src,
            image_ref=path,  # absolute, from the listing (inside the folder): find_image uses it as it is
            where=f"{relative if '://' not in path else path} (file {index})",
            id=keyed_id(src.name, split, relative),
            split=split,
            source_index=index,
            source_file=path,
            modality=src.modality,
            task=task,
            label_set=list(src.label_names) if src.label_names else None,
        )
        rows.append(row)
    return rows


def read_dicom(src: SourceConfig, data_cfg: DataConfig, *, skip: Optional[Callable[[str], bool]] = None):
    """Ray Dataset of a DICOM folder, file or labels CSV; rows whose id ``skip`` is true for are left out before
    any pixel is read."""
    if src.path.lower().endswith(".csv"):
        return read_image_folder(src, data_cfg, dicom=True, skip=skip)
    return metadata_dataset(dicom_rows(src), src, data_cfg, dicom=True, skip=skip)
