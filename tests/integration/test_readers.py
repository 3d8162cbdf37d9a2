"""Every source reader on a local Ray cluster: real data from ../shared/data, and small files written here.

For every bad input: with ``on_error: raise`` the error names the file and the row; with ``skip`` the bad row
is still there, with ``error`` set and no image (counted, never dropped).
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from meddr_ray.config import DataConfig, SourceConfig
from meddr_ray.data import (
    NO_FINDING,
    SAMPLE_SCHEMA,
    DataError,
    read_source,
    sample_id,
    split_errors,
    unwrap_data_error,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------ helpers


def read(src: SourceConfig, **data_kw):
    return read_source(src, DataConfig(**data_kw)).take_all()


def read_error(src: SourceConfig, **data_kw) -> str:
    """The DataError message a read raises (on the driver, or inside a Ray task and unwrapped)."""
    with pytest.raises(Exception) as info:
        read(src, **data_kw)
    err = unwrap_data_error(info.value)
    assert isinstance(err, DataError), info.value
    return str(err)


def skipped(src: SourceConfig):
    """Rows read with on_error=skip, and those with an error (checked against split_errors)."""
    ds = read_source(src, DataConfig(on_error="skip"))
    rows = ds.take_all()
    good, bad = split_errors(ds)
    errors = [r for r in rows if r["error"] is not None]
    assert (good.count(), bad.count()) == (len(rows) - len(errors), len(errors))
    assert all(r["image"] is None for r in errors)
    return rows, errors


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def dicom_bytes(arr=None, *, modality="CT", preamble=True) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, generate_uid(), modality
    if arr is not None:
        ds.set_pixel_data(arr, "MONOCHROME2", 16)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


RAMP = np.tile(np.arange(0, 1000, 40, dtype=np.uint16), (8, 1))


def npz_source(path, name="breastmnist", **kw) -> SourceConfig:
    return SourceConfig(name=name, format="medmnist", path=str(path), **kw)


def csv_source(tmp_path, text: str, **kw) -> SourceConfig:
    (tmp_path / "labels.csv").write_text(text)
    return SourceConfig(name="csvset", format="image_folder", path=str(tmp_path / "labels.csv"), **kw)


# ------------------------------------------------------------------------------------------ MedMNIST


def test_breastmnist_all_splits(ray_cluster, shared_data):
    src = npz_source(shared_data / "medmnist/breastmnist.npz", splits=["train", "val", "test"])
    ds = read_source(src, DataConfig(rows_per_block=200))
    rows = ds.take_all()
    assert ds.schema().base_schema == SAMPLE_SCHEMA
    assert Counter(r["split"] for r in rows) == {"train": 546, "val": 78, "test": 156}
    assert {r["label"] for r in rows} == {"malignant", "normal, benign"}
    first = next(r for r in rows if r["split"] == "train" and r["source_index"] == 0)
    assert first["id"] == sample_id("breastmnist", "train", 0)
    assert first["label_set"] == ["malignant", "normal, benign"] and first["labels"] == [first["label"]]
    assert (first["modality"], first["task"], first["error"]) == ("breast ultrasound", "diagnosis", None)
    assert len({r["id"] for r in rows}) == len(rows)
    assert decoded(first["image"]).size == (28, 28)


def test_pneumoniamnist_n1_labels(ray_cluster, shared_data):
    rows = read(npz_source(shared_data / "medmnist/pneumoniamnist.npz", name="pneumoniamnist", splits=["val"]))
    assert len(rows) == 524
    assert Counter(r["label"] for r in rows).keys() == {"normal", "pneumonia"}
    assert rows[0]["modality"] == "chest X-ray"


def test_medmnist_limit_spans_splits(ray_cluster, shared_data):
    src = npz_source(shared_data / "medmnist/breastmnist.npz", splits=["train", "val"], limit=550)
    assert read_source(src, DataConfig()).count() == 550


def test_chestmnist_multilabel(ray_cluster, tmp_path):
    labels = np.zeros((3, 14), np.uint8)
    labels[1, [0, 1]] = 1  # atelectasis, cardiomegaly
    labels[2, 13] = 1  # hernia
    np.savez_compressed(tmp_path / "chestmnist.npz", test_images=np.zeros((3, 28, 28), np.uint8), test_labels=labels)
    rows = read(npz_source(tmp_path / "chestmnist.npz", name="chestmnist", splits=["test"]))
    assert [r["labels"] for r in rows] == [[], ["atelectasis", "cardiomegaly"], ["hernia"]]
    assert [r["label"] for r in rows] == [NO_FINDING, "atelectasis, cardiomegaly", "hernia"]
    assert len(rows[0]["label_set"]) == 14


def test_rgb_npz(ray_cluster, tmp_path):
    images = np.zeros((2, 28, 28, 3), np.uint8)
    images[..., 0] = 255
    np.savez(tmp_path / "bloodmnist.npz", train_images=images, train_labels=np.array([[7], [0]]))
    rows = read(npz_source(tmp_path / "bloodmnist.npz", name="bloodmnist"))
    assert [r["label"] for r in rows] == ["platelet", "basophil"]
    img = decoded(rows[0]["image"])
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (255, 0, 0)


def test_npz_missing_keys(ray_cluster, tmp_path):
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    msg = read_error(npz_source(tmp_path / "partial.npz"))
    assert msg.startswith("partial.npz: missing array 'train_labels'")
    msg = read_error(npz_source(tmp_path / "partial.npz", splits=["val"]))
    assert msg.startswith("partial.npz: missing array 'val_images'")


def test_npz_label_out_of_range(ray_cluster, tmp_path):
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.array([0, 1, 2, 1]))
    src = npz_source(tmp_path / "bad.npz")
    assert read_error(src).startswith("bad.npz split train row 2: label 2 is outside the 2 classes of breastmnist")
    rows, errors = skipped(src)
    assert len(rows) == 4 and [r["source_index"] for r in errors] == [2]
    assert "bad.npz split train row 2" in errors[0]["error"]


# ------------------------------------------------------------------------------------------ VQA


def test_slake_english_questions(ray_cluster, shared_data):
    src = SourceConfig(
        name="slake", format="vqa_json", path=str(shared_data / "slake/test.json"), splits=["test"],
        require_images=False,
    )  # fmt: skip
    rows = read(src)
    assert len(rows) == 1061
    assert Counter(r["answer_type"] for r in rows) == {"OPEN": 645, "CLOSED": 416}
    assert all(r["task"] == "vqa" and r["question"] and r["answer"] and r["modality"] for r in rows)
    assert all(r["image"] is None and r["error"] is None for r in rows)
    assert len({r["id"] for r in rows}) == 1061


def test_slake_without_images_is_an_error_by_default(ray_cluster, shared_data):
    src = SourceConfig(name="slake", format="vqa_json", path=str(shared_data / "slake/test.json"), splits=["test"])
    msg = read_error(src)
    assert msg == f"test.json row 0: image 'xmlab102/source.jpg' not found under {shared_data / 'slake'}"


def test_vqa_rad_and_pathvqa_style_json(ray_cluster, tmp_path):
    (tmp_path / "synpic1.jpg").write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8), "JPEG"))
    records = [
        {"qid": 1, "image_name": "synpic1.jpg", "image_organ": "HEAD", "question": "How many lesions?",
         "answer": 3, "answer_type": "CLOSED ", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "image_organ": "HEAD", "question": "Is this a CT?",
         "answer": "No", "answer_type": "closed"},
    ]  # fmt: skip
    (tmp_path / "vqa_rad.json").write_text(json.dumps(records))
    rows = read(SourceConfig(name="vqa_rad", format="vqa_json", path=str(tmp_path / "vqa_rad.json")))
    got = [(r["answer"], r["answer_type"], r["modality"]) for r in rows]
    assert got == [("3", "CLOSED", "HEAD"), ("No", "CLOSED", "HEAD")]
    assert rows[0]["image"] == (tmp_path / "synpic1.jpg").read_bytes()  # a valid JPEG is kept as it is

    path_records = [
        {"image": "synpic1", "question": "Is there necrosis?", "answer": "yes", "split": "test"},
        {"image": "synpic1", "question": "What stain is used?", "answer": "H&E", "split": "test"},
        {"image": "synpic1", "question": "train only", "answer": "x", "split": "train"},
    ]
    (tmp_path / "pathvqa.json").write_text(json.dumps(path_records))
    src = SourceConfig(name="pathvqa", format="vqa_json", path=str(tmp_path / "pathvqa.json"), splits=["test"])
    rows = read(src, rows_per_block=1)
    got = [(r["answer_type"], r["split"], r["source_index"]) for r in rows]
    assert got == [("CLOSED", "test", 0), ("OPEN", "test", 1)]
    assert all(r["image"] for r in rows)  # "synpic1" found as synpic1.jpg


# ------------------------------------------------------------------------------------------ reports


def test_iu_xray_reports(ray_cluster, shared_data):
    src = SourceConfig(
        name="iu_xray", format="reports", path=str(shared_data / "iu_xray/test_reports.jsonl"),
        splits=["test"], require_images=False,
    )  # fmt: skip
    rows = read(src)
    assert len(rows) == 1180
    assert len({r["report"] for r in rows}) == 398
    assert all(r["task"] == "report" and r["split"] == "test" for r in rows)
    assert all(r["image"] is None and r["error"] is None for r in rows)


def test_mimic_style_csv(ray_cluster, tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files/s1.dcm").write_bytes(dicom_bytes(RAMP, modality="DX"))
    (tmp_path / "files/s2.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    (tmp_path / "mimic.csv").write_text(
        "study_id,split,image_path,findings,impression\n"
        "1,train,files/s1.dcm,Lungs are clear.,No acute process.\n"
        "2,test,files/s2.png,,Cardiomegaly.\n"
        "3,train,files/s2.png,,\n"
    )
    src = SourceConfig(name="mimic", format="reports", path=str(tmp_path / "mimic.csv"), image_column="image_path")
    assert read_error(src) == "mimic.csv row 2: no report text (looked for 'text', 'report', 'findings'/'impression')"
    rows, errors = skipped(src)
    assert [r["source_index"] for r in rows] == [0, 2] and [r["source_index"] for r in errors] == [2]
    assert rows[0]["report"] == "Lungs are clear. No acute process."
    assert rows[0]["modality"] == "DX" and decoded(rows[0]["image"]).format == "PNG"  # DICOM rendered to PNG


# ------------------------------------------------------------------------------------------ image folder


def test_example_jpegs_ham10000_style(ray_cluster, shared_data, tmp_path):
    examples = shared_data / "examples"
    csv = "image_id,dx\n" + "".join(f"test{i},{'nv' if i % 2 else 'mel'}\n" for i in range(1, 6))
    src = csv_source(tmp_path, csv, image_column="image_id", label_column="dx", image_root=str(examples))
    rows = read(src)
    assert [r["label"] for r in rows] == ["nv", "mel", "nv", "mel", "nv"]
    assert rows[0]["label_set"] == ["mel", "nv"]
    for i, row in enumerate(rows, start=1):
        assert row["image"] == (examples / f"test{i}.jpg").read_bytes()
        assert decoded(row["image"]).format == "JPEG"


def test_csv_naming_a_missing_file(ray_cluster, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    src = csv_source(tmp_path, "image,label\na.png,benign\nmissing.png,malignant\n")
    assert read_error(src) == f"labels.csv row 1: image 'missing.png' not found under {tmp_path}"
    rows, errors = skipped(src)
    assert len(rows) == 2 and [r["source_index"] for r in errors] == [1]
    src.require_images = False
    rows = read(src)
    assert rows[1]["image"] is None and rows[1]["error"] is None and rows[0]["image"]


def test_csv_label_outside_label_set(ray_cluster, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    src = csv_source(tmp_path, "image,label\na.png,benign\na.png,cancer\n", label_names=["malignant", "benign"])
    assert read_error(src).startswith("labels.csv row 1: label 'cancer' is not one of the label_names")
    rows, errors = skipped(src)
    assert len(rows) == 2 and [r["source_index"] for r in errors] == [1]


def test_truncated_png_in_folder(ray_cluster, tmp_path):
    good = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    src = csv_source(tmp_path, "image,label\ngood.png,a\ncut.png,b\n")
    assert read_error(src).startswith("labels.csv row 1: not a readable image")
    rows, errors = skipped(src)
    assert len(rows) == 2 and [r["source_index"] for r in errors] == [1]
    assert rows[0]["image"] == good


# ------------------------------------------------------------------------------------------ DICOM


def test_dicom_folder(ray_cluster, tmp_path):
    root = tmp_path / "study"
    (root / "a/b").mkdir(parents=True)
    (root / "a/1.dcm").write_bytes(dicom_bytes(RAMP, modality="CT"))
    (root / "a/b/2.DCM").write_bytes(dicom_bytes(RAMP, modality="MR"))
    (root / "IM0001").write_bytes(dicom_bytes(RAMP, modality="CR"))  # no extension, DICM preamble
    (root / "README").write_text("not a DICOM file")  # no extension, no preamble: not listed
    (root / "zz_nopix.dcm").write_bytes(dicom_bytes(None))
    src = SourceConfig(name="scans", format="dicom", path=str(root))
    assert read_error(src).startswith("zz_nopix.dcm (file 3): DICOM file has no pixel data")
    rows, errors = skipped(src)
    names = ("IM0001", "a/1.dcm", "a/b/2.DCM", "zz_nopix.dcm")
    assert [r["source_file"] for r in rows] == [str(root / p) for p in names]
    assert [r["modality"] for r in rows[:3]] == ["CR", "CT", "MR"] and len(errors) == 1
    assert all(decoded(r["image"]).size == (25, 8) for r in rows[:3])
    one = read(SourceConfig(name="scans", format="dicom", path=str(root / "a/1.dcm"), modality="head CT"))
    assert len(one) == 1 and one[0]["modality"] == "head CT"  # the config wins over the tag


def test_dicom_labels_csv(ray_cluster, tmp_path):
    (tmp_path / "p1").write_bytes(dicom_bytes(RAMP, preamble=False))  # no preamble: decoded as DICOM anyway
    (tmp_path / "p2.dcm").write_bytes(dicom_bytes(RAMP))
    (tmp_path / "cases.csv").write_text("file,finding,split\np1,nodule,test\np2.dcm,normal,test\np2.dcm,normal,train\n")
    src = SourceConfig(
        name="ct", format="dicom", path=str(tmp_path / "cases.csv"), image_column="file", label_column="finding",
        splits=["test"],
    )  # fmt: skip
    rows = read(src)
    assert [(r["label"], r["modality"]) for r in rows] == [("nodule", "CT"), ("normal", "CT")]
    assert all(decoded(r["image"]).format == "PNG" for r in rows)


def test_dicom_folder_ids_survive_a_file_inserted_between_reads(ray_cluster, tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    for name in ("a.dcm", "c.dcm"):
        (root / name).write_bytes(dicom_bytes(RAMP))
    src = SourceConfig(name="scans", format="dicom", path=str(root))
    before = {r["source_file"]: r["id"] for r in read(src)}
    (root / "b.dcm").write_bytes(dicom_bytes(RAMP))  # sorts between the two
    after = {r["source_file"]: r["id"] for r in read(src)}
    assert {f: after[f] for f in before} == before and len(set(after.values())) == 3
    assert after[str(root / "b.dcm")] == "scans/train/b.dcm"


def test_skipped_ids_are_left_out_before_their_images_are_read(ray_cluster, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    (tmp_path / "gone.png").write_bytes(b"damaged after the first run")
    src = csv_source(tmp_path, "image,label\na.png,x\ngone.png,y\n")
    gone = [r["id"] for r in read(src, on_error="skip") if r["error"]]
    rows = read_source(src, DataConfig(on_error="raise"), skip=set(gone).__contains__).take_all()
    assert [r["source_index"] for r in rows] == [0]  # the damaged image was never opened: no error raised

    npz = npz_source(tmp_path / "m.npz", limit=7)
    np.savez_compressed(tmp_path / "m.npz", train_images=np.zeros((9, 4, 4), np.uint8), train_labels=np.zeros((9, 1)))
    done = {sample_id("breastmnist", "train", i) for i in (0, 1, 4)}
    rows = read_source(npz, DataConfig(rows_per_block=2), skip=done.__contains__).take_all()
    assert sorted(r["source_index"] for r in rows) == [2, 3, 5, 6]


def test_empty_sources_keep_the_schema(ray_cluster, tmp_path, shared_data):
    empty_csv = csv_source(tmp_path, "image,label\n")
    no_rows = npz_source(shared_data / "medmnist/breastmnist.npz", limit=0)
    for src in (empty_csv, no_rows):
        ds = read_source(src, DataConfig())
        assert ds.count() == 0 and ds.schema().base_schema == SAMPLE_SCHEMA
