"""Driver-side metadata handling (no Ray): npz headers, MedMNIST tables, labels CSVs, record files."""

from __future__ import annotations

import io
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from meddr_ray.config import DataConfig, SourceConfig
from meddr_ray.data import MEDMNIST_INFO, DataError, medmnist_info
from meddr_ray.data import medmnist as mm
from meddr_ray.data.common import read_records
from meddr_ray.data.image_folder import labelled_rows
from meddr_ray.data.report_files import report_text


@pytest.mark.parametrize(
    "name,count,modality",
    [
        ("breastmnist", 2, "breast ultrasound"),
        ("pneumoniamnist", 2, "chest X-ray"),
        ("bloodmnist", 8, "blood cell microscopy"),
        ("organamnist", 11, "abdominal CT"),
        ("organcmnist", 11, "abdominal CT"),
        ("organsmnist", 11, "abdominal CT"),
        ("octmnist", 4, "retinal OCT"),
        ("dermamnist", 7, "dermatoscopy"),
        ("retinamnist", 5, "fundus photography"),
        ("pathmnist", 9, "colon pathology"),
        ("tissuemnist", 8, "kidney cortex microscopy"),
        ("chestmnist", 14, "chest X-ray"),
    ],
)
def test_medmnist_info(name, count, modality):
    info = MEDMNIST_INFO[name]
    assert len(info["labels"]) == count and len(set(info["labels"])) == count
    assert info["modality"] == modality
    assert info.get("multi_label", False) == (name == "chestmnist")


def test_medmnist_info_lookup():
    assert medmnist_info("BreastMNIST")["labels"] == ["malignant", "normal, benign"]
    assert medmnist_info("breastmnist_224") is MEDMNIST_INFO["breastmnist"]
    assert medmnist_info("unknown") is None


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_headers_and_chunk_arrays(tmp_path, save, monkeypatch):
    monkeypatch.setenv("MEDDR_RAY_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "x.npz")
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    save(path, train_images=images, train_labels=np.arange(5).reshape(5, 1))
    assert mm.npz_shapes(path, ["train_images", "train_labels"]) == {"train_images": (5, 4, 4), "train_labels": (5, 1)}
    assert (mm.read_rows(path, "train_images", 2, 4) == images[2:4]).all()
    assert (mm.read_rows(path, "train_labels", 4, 5) == [[4]]).all()
    assert mm.read_rows(path, "train_images", 5, 5).shape == (0, 4, 4)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_a_block_is_read_without_loading_the_whole_array(tmp_path, save, monkeypatch):
    """A worker's memory is bounded by its block: MedMNIST ships compressed npz files, which used to be inflated
    whole (and cached) in every worker process."""
    monkeypatch.setenv("MEDDR_RAY_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "big.npz")
    images = np.random.default_rng(0).integers(0, 255, (8000, 32, 32), dtype=np.uint8)  # 8.2 MB
    save(path, train_images=images, train_labels=np.zeros((8000, 1), np.uint8))
    kw = dict(path=path, mtime=os.stat(path).st_mtime_ns, src_name="breastmnist", names=["malignant", "benign"],
              multi=False, modality="breast ultrasound", task="diagnosis", on_error="raise")  # fmt: skip
    chunk = pa.table({"split": ["train"], "start": [6000], "end": [6004]})
    for _ in range(2):  # the first call of a compressed member also unpacks it to the node's disk cache
        tracemalloc.start()
        rows = mm._chunk_rows(chunk, **kw).to_pylist()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < images.nbytes / 4, f"reading 4 rows took {peak} bytes of a {images.nbytes}-byte array"
    assert [r["source_index"] for r in rows] == [6000, 6001, 6002, 6003]
    assert (np.asarray(Image.open(io.BytesIO(rows[2]["image"]))) == images[6002]).all()


def test_npz_missing_key_names_file_and_key(tmp_path):
    path = str(tmp_path / "broken.npz")
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"broken\.npz: missing array 'train_labels' \(the file has: train_images\)"):
        mm.npz_shapes(path, ["train_images", "train_labels"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        mm.npz_shapes(str(tmp_path / "junk.npz"), ["train_images"])


def test_label_decoding():
    names = ["a", "b", "c"]
    assert mm._label_names(np.array([2]), names, False, "w", "d") == ["c"]
    assert mm._label_names(np.array([1, 0, 1]), names, True, "w", "d") == ["a", "c"]
    assert mm._label_names(np.array([0, 0, 0]), names, True, "w", "d") == []
    with pytest.raises(DataError, match=r"^f\.npz split test row 9: label 3 is outside the 3 classes of d \(0\.\.2\)"):
        mm._label_names(np.array([3]), names, False, "f.npz split test row 9", "d")
    with pytest.raises(DataError, match="0/1"):
        mm._label_names(np.array([2, 0, 0]), names, True, "w", "d")


def _csv(tmp_path, text: str, **kw) -> SourceConfig:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return SourceConfig(name="csvset", format="image_folder", path=str(path), **kw)


def test_labels_csv_label_set_split_and_multilabel(tmp_path):
    src = _csv(tmp_path, "image,label,split\na.png,cat,train\nb.png,dog|cat,train\nc.png,bird,test\n")
    rows = labelled_rows(src, DataConfig())
    assert [r["labels"] for r in rows] == [["cat"], ["dog", "cat"]]
    assert rows[1]["label"] == "dog, cat" and rows[0]["label_set"] == ["bird", "cat", "dog"]
    assert [r["source_index"] for r in rows] == [0, 1]


def test_labels_csv_indices_into_label_names(tmp_path):
    src = _csv(tmp_path, "image,label\na.png,1\nb.png,benign\n", label_names=["malignant", "benign"])
    assert [r["label"] for r in labelled_rows(src, DataConfig())] == ["benign", "benign"]


def test_labels_csv_bad_label_raises_or_is_kept(tmp_path):
    src = _csv(tmp_path, "image,label\na.png,benign\nb.png,unknown\n", label_names=["malignant", "benign"])
    with pytest.raises(DataError, match=r"^labels\.csv row 1: label 'unknown' is not one of the label_names"):
        labelled_rows(src, DataConfig())
    rows = labelled_rows(src, DataConfig(on_error="skip"))
    assert len(rows) == 2 and rows[0]["error"] is None and "row 1" in rows[1]["error"]


def test_labels_csv_missing_column(tmp_path):
    src = _csv(tmp_path, "image_id,dx\na,nv\n")
    with pytest.raises(DataError, match=r"labels\.csv: no column 'image'"):
        labelled_rows(src, DataConfig())


def test_read_records_errors(tmp_path):
    (tmp_path / "a.json").write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="expected a list of JSON objects"):
        read_records(str(tmp_path / "a.json"))
    (tmp_path / "b.jsonl").write_text('{"ok": 1}\n{broken\n')
    with pytest.raises(DataError, match=r"b\.jsonl line 2: not valid JSON"):
        read_records(str(tmp_path / "b.jsonl"))
    with pytest.raises(DataError, match="cannot read"):
        read_records(str(tmp_path / "missing.csv"))
    # a binary file given as JSON / JSONL (a MedMNIST .npz under format: vqa_json) names the file
    for name in ("c.json", "d.jsonl"):
        (tmp_path / name).write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xff\xfe")
        with pytest.raises(DataError, match=rf"{name}: not a UTF-8 text file"):
            read_records(str(tmp_path / name))


def test_report_text_fallbacks():
    assert report_text({"text": " Normal. "}, "text") == "Normal."
    assert report_text({"report": "R"}, "text") == "R"
    assert report_text({"findings": "F.", "impression": "I."}, "text") == "F. I."
    assert report_text({"findings": "", "impression": None}, "text") is None


def test_where_names_file_split_row_and_column():
    from meddr_ray.data.errors import where

    assert where("/data/breast.csv", 3) == "breast.csv row 3"
    assert where("s3://bucket/b.npz", 0, split="test") == "b.npz split test row 0"
    assert where("b.csv", 3, "label") == "b.csv row 3, column 'label'"
    assert where("/data/folder/") == "folder"


def test_the_table_loop_filters_before_the_limit_and_keeps_bad_rows_with_skip(tmp_path):
    from meddr_ray.data.common import IMAGE_REF, WHERE, Record, table_rows

    records = [{"split": "test", "x": "a"}, {"x": "drop"}, {"x": "b"}, {"x": ""}, {"x": "c"}]
    src = SourceConfig(name="t", format="image_folder", path=str(tmp_path / "t.csv"), limit=2, id_column=None)

    def check(row, rec, where):
        if not rec["x"]:
            raise DataError(f"{where}: empty x")

    def run(on_error, limit):
        src.limit = limit
        return table_rows(src, DataConfig(on_error=on_error), records, id_fields=["x"],
                          take=lambda rec: Record(rec["x"] + ".png" if rec["x"] else None, "x", {"label": rec["x"]}),
                          check=check, keep=lambda rec: rec["x"] != "drop")  # fmt: skip

    rows = run("skip", 2)
    assert [(r["label"], r["source_index"], r[WHERE], r[IMAGE_REF]) for r in rows] == [
        ("b", 2, "t.csv row 2", "b.png"), ("", 3, "t.csv row 3", None)
    ]  # fmt: skip
    assert rows[1]["error"] == "t.csv row 3: empty x" and rows[0]["error"] is None
    with pytest.raises(DataError, match="t.csv row 3: empty x"):
        run("raise", None)
