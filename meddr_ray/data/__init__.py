"""Samples from every source format, in one Arrow schema, as Ray Datasets.

``read_source(src, data_cfg)`` is the one entry point the stages use. The driver reads only metadata (CSV,
JSON, npz headers, folder listings); images are read, validated and encoded inside Ray tasks. Bad rows follow
``data_cfg.on_error``: ``raise`` stops with a :class:`DataError` naming file and row (use
:func:`unwrap_data_error` on what Ray raises), ``skip`` keeps the row with ``image=None`` and ``error`` set,
for :func:`split_errors` to set aside and count. Reader modules import Ray lazily, so the image helpers here
are usable (by the model code, the server) without it.
"""

from __future__ import annotations

from meddr_ray.data.errors import DataError, unwrap_data_error
from meddr_ray.data.images import decode_image, dicom_to_png, encode_png, is_dicom, load_image, validate_image_bytes
from meddr_ray.data.medmnist import MEDMNIST_INFO, NO_FINDING, medmnist_info
from meddr_ray.data.schema import COLUMNS, SAMPLE_SCHEMA, keyed_id, make_row, rows_to_table, sample_id

__all__ = [
    "COLUMNS", "DataError", "MEDMNIST_INFO", "NO_FINDING", "SAMPLE_SCHEMA", "decode_image", "dicom_to_png",
    "encode_png", "is_dicom", "keyed_id", "load_image", "make_row", "medmnist_info", "read_source", "rows_to_table",
    "sample_id", "split_errors", "unwrap_data_error", "validate_image_bytes",
]  # fmt: skip


def read_source(src, data_cfg, skip=None):
    """A Ray Dataset in :data:`SAMPLE_SCHEMA` for one :class:`~meddr_ray.config.SourceConfig`.

    ``skip``: a predicate on row ids, called on the driver for every row before any image is read; rows it is
    true for are left out (a resumed stage skips its finished rows without reading their images).
    """
    from meddr_ray.data import dicom, image_folder, medmnist, report_files, vqa_json

    readers = {
        "medmnist": medmnist.read_medmnist,
        "image_folder": image_folder.read_image_folder,
        "vqa_json": vqa_json.read_vqa_json,
        "reports": report_files.read_reports,
        "dicom": dicom.read_dicom,
    }
    if src.format not in readers:
        raise ValueError(f"source {src.name!r}: unknown format {src.format!r} (one of {', '.join(readers)})")
    return readers[src.format](src, data_cfg, skip=skip)


def split_errors(ds):
    """``(good, bad)`` Datasets: rows without and with an ``error``."""
    from meddr_ray.data.common import split_errors as _split

    return _split(ds)
