"""Decode, validate and re-encode images (PNG/JPEG/any PIL format, and DICOM) with clean errors.

Every failure is a :class:`DataError` whose message starts with ``where`` (``"breast.csv row 3"``), so a bad
file deep inside a Ray task can be traced back to its source row. Nothing here knows about Ray.
"""

from __future__ import annotations

import io
import warnings
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

from meddr_ray.data.errors import DataError

# Encodings kept as they are: every consumer (PIL, the processors of the models) reads them.
_KEEP_FORMATS = ("PNG", "JPEG")
# PIL modes that ``convert("RGB")`` clips instead of scaling (16-bit and float medical images).
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _check_bytes(data: bytes, max_bytes: Optional[int], where: str) -> None:
    if not data:
        raise DataError(f"{where}: image is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise DataError(f"{where}: image is {len(data):,} bytes, more than max_image_bytes={max_bytes:,}")


def _check_pixels(width: int, height: int, max_pixels: Optional[int], where: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise DataError(
            f"{where}: image is {width}x{height} = {width * height:,} pixels, more than max_image_pixels={max_pixels:,}"
        )


def _open_checked(data: bytes, *, max_bytes: Optional[int], max_pixels: Optional[int], where: str) -> Image.Image:
    """Open and fully decode ``data``; the size checks run on the header, before any pixel is decoded."""
    _check_bytes(data, max_bytes, where)
    # PIL has its own process-wide bomb guard (a warning above MAX_IMAGE_PIXELS, an error above twice that).
    # Our max_pixels is the guard we mean; PIL's must not be stricter, and its warning must become an error.
    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixels(img.width, img.height, max_pixels, where)
            img.load()  # decode every pixel now: a truncated file fails here, not in a model later
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{where}: refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(f"{where}: not a readable image ({type(exc).__name__}: {exc})") from None
    return img


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric array linearly onto 0..255 (min -> 0, max -> 255); uint8 and bool pass through."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    arr = arr.astype(np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi <= lo:  # a constant image carries no contrast to keep
        return np.zeros(arr.shape, np.uint8)
    return np.round((np.nan_to_num(arr, nan=lo) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_MODES:
        img = Image.fromarray(to_uint8(np.asarray(img)), mode="L")
    return img.convert("RGB")


def decode_image(data: bytes, *, max_bytes: Optional[int], max_pixels: Optional[int], where: str) -> Image.Image:
    """Decode encoded image bytes into a fully loaded RGB image, or raise :class:`DataError`."""
    return _to_rgb(_open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels, where=where))


def encode_png(array_or_image: Union[np.ndarray, Image.Image]) -> bytes:
    """PNG bytes of an image or an array: (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA.

    Arrays that are not uint8 are scaled to 0..255 (see :func:`to_uint8`).
    """
    if isinstance(array_or_image, Image.Image):
        img = array_or_image
    else:
        arr = np.asarray(array_or_image)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
            raise ValueError(f"cannot encode an array of shape {arr.shape} as an image")
        img = Image.fromarray(np.ascontiguousarray(to_uint8(arr)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def validate_image_bytes(data: bytes, *, max_bytes: Optional[int], max_pixels: Optional[int], where: str) -> bytes:
    """Check that ``data`` decodes completely; return bytes every consumer can read.

    Valid 8-bit PNG and JPEG are returned unchanged (no re-encoding cost, no JPEG generation loss); other
    formats (BMP, TIFF, GIF, ...) and 16-bit/float images are re-encoded as 8-bit PNG.
    """
    img = _open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels, where=where)
    if img.format in _KEEP_FORMATS and img.mode not in _WIDE_MODES:
        return data
    if img.mode in _WIDE_MODES:
        return encode_png(to_uint8(np.asarray(img)))
    return encode_png(img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB"))


# ------------------------------------------------------------------------------------------------ DICOM


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then ``DICM``."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _first(value) -> float:
    """WindowCenter/Width may be multi-valued (several presets); the first is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _grey_to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield units) -> the VOI window -> 0..255, dark = low."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds).astype(np.float64)  # RescaleSlope/Intercept or a Modality LUT
    if "VOILUTSequence" in ds:
        out = to_uint8(apply_voi_lut(values, ds))  # a non-linear VOI LUT: use it, then spread its range
    elif "WindowCenter" in ds and "WindowWidth" in ds and _first(ds.WindowWidth) > 0:
        # Linear window done here rather than with apply_windowing, which maps onto the stored bit range
        # (e.g. 0..4095) that we would then have to undo.
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        lo = center - width / 2.0
        out = np.round(np.clip((values - lo) / width, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        out = to_uint8(values)  # no window stored: the full range of the image
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: high values are displayed dark
    return out


def dicom_to_png(data: bytes, where: str, *, max_pixels: Optional[int] = None) -> Tuple[bytes, Optional[str]]:
    """Render a DICOM file as an 8-bit PNG the way a viewer shows it by default; also return its Modality tag.

    Grey images get rescale slope/intercept, the stored VOI window (or the full range), MONOCHROME1 inversion;
    colour images are kept (YBR is converted to RGB); of a multi-frame image the middle frame is taken.
    """
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise DataError(f"{where}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{where}: DICOM file has no pixel data (a structured report or a header-only file?)")
    modality = str(ds.get("Modality", "") or "").strip() or None
    try:
        _check_pixels(int(ds.Columns), int(ds.Rows), max_pixels, where)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        arr = pixel_array(ds, index=frames // 2) if frames > 1 else pixel_array(ds)
        if int(ds.get("SamplesPerPixel", 1)) == 1:
            out = _grey_to_uint8(arr, ds)
        else:
            out = to_uint8(arr)  # pydicom already returns RGB for YBR photometric interpretations
        return encode_png(out), modality
    except DataError:
        raise
    except Exception as exc:  # unsupported compression, inconsistent tags, ...
        raise DataError(f"{where}: cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None


def load_image(
    data: bytes, *, max_bytes: Optional[int], max_pixels: Optional[int], where: str, dicom: Optional[bool] = None
) -> Tuple[bytes, Optional[str]]:
    """Validated image bytes (PNG/JPEG as they are, DICOM rendered to PNG) and the DICOM Modality, if any.

    ``dicom=None`` sniffs the DICM preamble; True forces DICOM (files without a preamble).
    """
    if dicom or (dicom is None and is_dicom(data)):
        _check_bytes(data, max_bytes, where)
        return dicom_to_png(data, where, max_pixels=max_pixels)
    return validate_image_bytes(data, max_bytes=max_bytes, max_pixels=max_pixels, where=where), None
