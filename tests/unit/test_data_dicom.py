"""DICOM rendering (no Ray): rescale, window, MONOCHROME1, frames, colour, and clean errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from meddr_ray.data import DataError, dicom_to_png, is_dicom, load_image

WHERE = "scan.dcm (file 0)"


def make_dicom(arr=None, *, photometric="MONOCHROME2", modality="CT", preamble=True, **tags) -> bytes:
    """A small DICOM file written with pydicom; ``tags`` are set on the dataset (RescaleSlope=2, ...)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if modality:
        ds.Modality = modality
    if arr is not None:
        ds.set_pixel_data(arr, photometric, 8 if arr.dtype == np.uint8 else 16)
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


def render(data: bytes) -> np.ndarray:
    png, _ = dicom_to_png(data, WHERE)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    return np.asarray(img)


RAMP = np.array([[0, 250, 500, 750, 1000]], np.uint16)


def test_rescale_then_window_to_uint8():
    # Stored 0..1000 -> HU -1000..1000 (slope 2, intercept -1000); window [-1000, 1000].
    out = render(make_dicom(RAMP, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=2000))
    assert out.dtype == np.uint8
    assert out[0].tolist() == [0, 64, 128, 191, 255]


def test_window_clips_outside_values():
    out = render(make_dicom(RAMP, WindowCenter=500, WindowWidth=500))  # [250, 750]
    assert out[0].tolist() == [0, 0, 128, 255, 255]


def test_multivalued_window_uses_the_first():
    out = render(make_dicom(RAMP, WindowCenter=[500, 40], WindowWidth=[500, 80]))
    assert out[0].tolist() == [0, 0, 128, 255, 255]


def test_no_window_spreads_the_full_range():
    out = render(make_dicom(RAMP + 3000))
    assert out.min() == 0 and out.max() == 255 and out[0].tolist() == [0, 64, 128, 191, 255]


def test_monochrome1_is_inverted():
    mono2 = render(make_dicom(RAMP, WindowCenter=500, WindowWidth=1000))
    mono1 = render(make_dicom(RAMP, photometric="MONOCHROME1", WindowCenter=500, WindowWidth=1000))
    assert (mono1 == 255 - mono2).all()
    assert mono1[0, 0] == 255  # the lowest value shows white


def test_signed_pixels_and_constant_image():
    signed = np.array([[-1000, 0, 1000]], np.int16)
    assert render(make_dicom(signed))[0].tolist() == [0, 128, 255]
    assert render(make_dicom(np.full((4, 4), 7, np.uint16))).max() == 0


def test_multi_frame_takes_the_middle_frame():
    frames = np.stack([np.full((4, 6), v, np.uint16) for v in (0, 500, 1000)])
    out = render(make_dicom(frames, WindowCenter=500, WindowWidth=1000))
    assert out.shape == (4, 6) and (out == 128).all()


def test_rgb_is_kept():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 50
    png, modality = dicom_to_png(make_dicom(rgb, photometric="RGB", modality="XC"), WHERE)
    img = Image.open(io.BytesIO(png))
    assert img.mode == "RGB" and img.getpixel((1, 1)) == (200, 0, 50) and modality == "XC"


def test_modality_tag_is_returned():
    assert dicom_to_png(make_dicom(RAMP, modality="MR"), WHERE)[1] == "MR"
    assert dicom_to_png(make_dicom(RAMP, modality=None), WHERE)[1] is None


def test_no_pixel_data_is_a_clear_error():
    with pytest.raises(DataError, match=r"^scan\.dcm \(file 0\): DICOM file has no pixel data"):
        dicom_to_png(make_dicom(None), WHERE)


def test_garbage_and_truncated_pixels():
    with pytest.raises(DataError, match=r"scan\.dcm \(file 0\)"):
        dicom_to_png(b"\0" * 128 + b"DICM" + b"\xff" * 10, WHERE)
    data = make_dicom(np.zeros((64, 64), np.uint16))
    with pytest.raises(DataError, match=r"scan\.dcm \(file 0\): cannot decode DICOM pixel data"):
        dicom_to_png(data[:-2000], WHERE)


def test_max_pixels_applies_to_dicom():
    with pytest.raises(DataError, match="more than max_image_pixels=10"):
        dicom_to_png(make_dicom(np.zeros((4, 4), np.uint16)), WHERE, max_pixels=10)


def test_load_image_dispatches_dicom_by_preamble_or_flag():
    data = make_dicom(RAMP)
    assert is_dicom(data)
    png, modality = load_image(data, max_bytes=None, max_pixels=None, where=WHERE)
    assert Image.open(io.BytesIO(png)).format == "PNG" and modality == "CT"
    bare = make_dicom(RAMP, preamble=False)  # no preamble: only forced decoding knows it is DICOM
    assert not is_dicom(bare)
    with pytest.raises(DataError):
        load_image(bare, max_bytes=None, max_pixels=None, where=WHERE)
    assert load_image(bare, max_bytes=None, max_pixels=None, where=WHERE, dicom=True)[1] == "CT"
