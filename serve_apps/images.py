"""Image intake: a request's ``image`` field (base64 or a ``data:`` URL) -> checked PNG/JPEG bytes, or an
:class:`~serve_apps.errors.ApiError` that names the field.

Decoding and rendering are :mod:`meddr_ray.data.images` (the same code the pipeline reads datasets with); this
module adds what a public endpoint needs on top: base64 and data URLs, only PNG / JPEG / DICOM, and size checks
that run on the header, before a single pixel is decoded (a 50 000 x 50 000 PNG of zeros is a few kilobytes).
Status codes: 400 not base64, 413 over a byte or pixel limit, 422 not a readable PNG / JPEG / DICOM.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Optional

from PIL import Image

from meddr_ray.data.errors import DataError
from meddr_ray.data.images import decode_image, is_dicom, load_image
from serve_apps.errors import ApiError

ACCEPTED = "a PNG, JPEG or DICOM image"
_PIL_FORMATS = ["PNG", "JPEG"]  # the decoders a request may reach (fewer parsers exposed to the internet)


@dataclass(frozen=True)
class IntakeImage:
    """A request's image after every check: what the generator decodes, and what may be logged about it."""

    data: bytes
    """PNG or JPEG bytes (16-bit and DICOM images rendered to 8-bit PNG)."""
    width: int
    height: int
    received_bytes: int
    """Size of the image as sent (after base64)."""
    modality: Optional[str] = None
    """A DICOM's Modality tag (``CT``, ``MR``), else None."""


def read_image(value: str, *, field: str, max_bytes: int, max_pixels: int) -> IntakeImage:
    """Checked image bytes from a base64 string or a ``data:...;base64,`` URL."""
    payload = _base64_payload(value, field)
    if len(payload) // 4 * 3 > max_bytes + 3:  # refuse before decoding megabytes of base64
        raise ApiError(413, f"field '{field}': the image is larger than {max_bytes:,} bytes", param=field)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"field '{field}' is not valid base64", param=field) from None
    if not data:
        raise ApiError(400, f"field '{field}' holds an empty image", param=field)
    if len(data) > max_bytes:
        raise ApiError(413, f"field '{field}': the image is {len(data):,} bytes, more than {max_bytes:,}", param=field)
    width, height = _declared_size(data, field)
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"field '{field}': the image is {width}x{height} = {width * height:,} pixels, more than {max_pixels:,}",
            param=field,
        )
    try:
        checked, modality = load_image(data, max_bytes=max_bytes, max_pixels=max_pixels, where=f"field '{field}'")
    except DataError as exc:  # truncated, corrupt, DICOM without pixels...: the message names the field
        raise ApiError(422, str(exc), param=field) from None
    return IntakeImage(checked, width, height, len(data), modality)


def model_image(data: bytes) -> Image.Image:
    """The RGB image the model sees, from bytes :func:`read_image` accepted (so no limits apply again)."""
    return decode_image(data, max_bytes=None, max_pixels=None, where="image")


def _base64_payload(value: str, field: str) -> str:
    head = value[:16].lower()
    if head.startswith(("http://", "https://", "file:")):
        raise ApiError(
            400, f"field '{field}': image URLs are not fetched; send the image as base64 or a data: URL", param=field
        )
    if head.startswith("data:"):
        meta, comma, payload = value.partition(",")
        if not comma or not meta.lower().endswith(";base64"):
            raise ApiError(400, f"field '{field}': a data URL must be base64 (data:image/png;base64,...)", param=field)
        return payload
    return value


def _declared_size(data: bytes, field: str) -> tuple:
    """Width and height from the file's header, without decoding pixels; 422 if it is no accepted image."""
    if is_dicom(data):
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            return int(ds.Columns), int(ds.Rows)
        except Exception:  # no size in the header: load_image says what is wrong with the file
            return 0, 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
                return img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        message = f"field '{field}': refused as a decompression bomb (too many pixels)"
        raise ApiError(413, message, param=field) from None
    except Exception:  # PIL raises several types for what it cannot identify
        raise ApiError(422, f"field '{field}' is not {ACCEPTED}", param=field) from None
