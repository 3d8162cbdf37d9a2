"""Image decoding and validation (no Ray): every bad input is a DataError that names where it came from."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from meddr_ray.data import DataError, decode_image, encode_png, load_image, unwrap_data_error, validate_image_bytes

WHERE = "x.csv row 3"
LIMITS = dict(max_bytes=1_000_000, max_pixels=1_000_000, where=WHERE)


def _png(arr: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def _gradient(h=32, w=40) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))


def test_png_and_jpeg_are_kept_byte_for_byte():
    png, jpeg = _png(_gradient()), _jpeg()
    assert validate_image_bytes(png, **LIMITS) is png
    assert validate_image_bytes(jpeg, **LIMITS) is jpeg


def test_decode_returns_loaded_rgb():
    img = decode_image(_png(_gradient()), **LIMITS)
    assert img.mode == "RGB" and img.size == (40, 32)
    assert np.asarray(img)[0, -1].tolist() == [255, 255, 255]


def test_truncated_png_fails_with_where():
    data = _png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(DataError, match=r"^x\.csv row 3: not a readable image"):
        decode_image(data[: len(data) // 2], **LIMITS)
    with pytest.raises(DataError, match="x.csv row 3"):
        validate_image_bytes(data[: len(data) // 2], **LIMITS)


def test_bytes_that_are_no_image():
    with pytest.raises(DataError, match=r"x\.csv row 3: not a readable image"):
        decode_image(b"this is a text file, not a picture", **LIMITS)
    with pytest.raises(DataError, match="empty"):
        decode_image(b"", **LIMITS)


def test_max_bytes_refused_before_decoding():
    data = _png(_gradient())
    with pytest.raises(DataError, match=r"x\.csv row 3: image is [\d,]+ bytes, more than max_image_bytes=10"):
        decode_image(data, max_bytes=10, max_pixels=None, where=WHERE)


def test_max_pixels_refused():
    with pytest.raises(DataError, match=r"40x32 = 1,280 pixels, more than max_image_pixels=1,000"):
        validate_image_bytes(_png(_gradient()), max_bytes=None, max_pixels=1000, where=WHERE)


@pytest.mark.parametrize("side", [40, 100])  # PIL warns above MAX_IMAGE_PIXELS and errors above twice that
def test_pil_decompression_bomb_is_a_clean_error(monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _png(np.zeros((side, side), np.uint8))
    with pytest.raises(DataError, match=r"x\.csv row 3: refused as a decompression bomb"):
        decode_image(data, max_bytes=None, max_pixels=None, where=WHERE)


def test_sixteen_bit_png_is_rescaled_not_clipped():
    arr = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    data = _png(arr)
    out = validate_image_bytes(data, **LIMITS)
    assert out != data
    img = Image.open(io.BytesIO(out))
    assert img.mode == "L" and np.asarray(img).min() == 0 and np.asarray(img).max() == 255
    rgb = np.asarray(decode_image(data, **LIMITS))
    assert rgb.min() == 0 and rgb.max() == 255  # convert("RGB") alone would clip almost everything to 255


def test_other_formats_are_reencoded_as_png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="BMP")
    out = validate_image_bytes(buf.getvalue(), **LIMITS)
    img = Image.open(io.BytesIO(out))
    assert img.format == "PNG" and img.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "arr,mode",
    [
        (np.zeros((28, 28), np.uint8), "L"),
        (np.zeros((28, 28, 1), np.uint8), "L"),
        (np.zeros((28, 28, 3), np.uint8), "RGB"),
        (np.zeros((28, 28, 4), np.uint8), "RGBA"),
    ],
)
def test_encode_png_shapes(arr, mode):
    img = Image.open(io.BytesIO(encode_png(arr)))
    assert img.format == "PNG" and img.mode == mode and img.size == (28, 28)


def test_encode_png_scales_other_dtypes():
    img = Image.open(io.BytesIO(encode_png(np.array([[-5.0, 0.0], [5.0, 15.0]]))))
    assert np.asarray(img).tolist() == [[0, 64], [128, 255]]
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((2, 3, 5)))


def test_load_image_sniffs_formats():
    png = _png(_gradient())
    assert load_image(png, **LIMITS) == (png, None)


def test_unwrap_data_error():
    err = DataError("a.csv row 1: bad")
    assert unwrap_data_error(err) is err
    try:
        try:
            raise err
        except DataError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert unwrap_data_error(outer) is err
    text_only = RuntimeError("Traceback ...\nmeddr_ray.data.errors.DataError: b.json row 7: no image\n")
    assert str(unwrap_data_error(text_only)) == "b.json row 7: no image"
    assert unwrap_data_error(RuntimeError("other")) is None
