"""Row ids that survive inserts, and image paths confined to the source's image root (driver side, no Ray)."""

from __future__ import annotations

import json

import pytest

from meddr_ray.config import DataConfig, SourceConfig
from meddr_ray.data import DataError
from meddr_ray.data.image_folder import labelled_rows


def _csv(tmp_path, text: str, **kw) -> SourceConfig:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return SourceConfig(name="csvset", format="image_folder", path=str(path), **kw)


def _ids_by_image(rows) -> dict:
    return {r["id"]: r for r in rows}


# ------------------------------------------------------------------------------------------ stable ids


def test_csv_ids_survive_a_row_inserted_before_them(tmp_path):
    src = _csv(tmp_path, "image,label\na.png,cat\nc.png,dog\nd.png,cat\n")
    before = [r["id"] for r in labelled_rows(src, DataConfig())]
    _csv(tmp_path, "image,label\na.png,cat\nb.png,cat\nc.png,dog\nd.png,cat\n")  # b.png inserted second
    after = [r["id"] for r in labelled_rows(src, DataConfig())]
    assert [after[0], after[2], after[3]] == before  # every row keeps its id
    assert after[1] not in before and len(set(after)) == 4
    assert before[1].startswith("csvset/train/c.png#")  # readable: dataset / split / image path + row hash


def test_an_id_column_is_the_id_and_must_be_unique(tmp_path):
    src = _csv(tmp_path, "id,image,label\nP7,a.png,cat\nP9,a.png,dog\n")
    assert [r["id"] for r in labelled_rows(src, DataConfig())] == ["csvset/train/P7", "csvset/train/P9"]
    src = _csv(tmp_path, "id,image,label\nP7,a.png,cat\nP7,b.png,dog\n")
    with pytest.raises(DataError, match=r"^labels\.csv row 1: id 'P7' in column 'id' is also labels\.csv row 0"):
        labelled_rows(src, DataConfig(on_error="skip"))  # a metadata error: skipping would hide a real sample
    src.id_column = None  # derive ids from the rows instead
    assert len({r["id"] for r in labelled_rows(src, DataConfig())}) == 2


def test_identical_rows_get_distinct_ids_and_edited_rows_new_ones(tmp_path):
    src = _csv(tmp_path, "image,label\na.png,cat\na.png,cat\na.png,dog\n")
    ids = [r["id"] for r in labelled_rows(src, DataConfig())]
    assert len(set(ids)) == 3 and ids[1] == ids[0] + "~2"
    _csv(tmp_path, "image,label\na.png,cat\na.png,cat\na.png,bird\n")
    edited = [r["id"] for r in labelled_rows(src, DataConfig())]
    assert edited[:2] == ids[:2] and edited[2] != ids[2]  # a changed label is a new sample


def test_vqa_and_report_ids_survive_inserts(tmp_path):
    from meddr_ray.data.report_files import report_rows
    from meddr_ray.data.vqa_json import vqa_rows

    q = [{"img_name": "x/1.jpg", "question": f"Q{i}?", "answer": "yes"} for i in range(3)]
    (tmp_path / "q.json").write_text(json.dumps(q))
    src = SourceConfig(name="slake", format="vqa_json", path=str(tmp_path / "q.json"), require_images=False)
    before = [r["id"] for r in vqa_rows(src, DataConfig())]
    (tmp_path / "q.json").write_text(json.dumps([q[0], {**q[0], "question": "new?"}, q[1], q[2]]))
    after = [r["id"] for r in vqa_rows(src, DataConfig())]
    assert [after[0], after[2], after[3]] == before and len(set(after)) == 4

    (tmp_path / "r.jsonl").write_text('{"image": ["a.png"], "text": "A."}\n{"image": ["b.png"], "text": "B."}\n')
    src = SourceConfig(name="iu", format="reports", path=str(tmp_path / "r.jsonl"), require_images=False)
    before = [r["id"] for r in report_rows(src, DataConfig())]
    (tmp_path / "r.jsonl").write_text('{"image": ["z.png"], "text": "Z."}\n' + (tmp_path / "r.jsonl").read_text())
    assert [r["id"] for r in report_rows(src, DataConfig())][1:] == before


def test_dicom_folder_ids_are_relative_paths(tmp_path):
    from meddr_ray.data.dicom import dicom_rows

    root = tmp_path / "study"
    (root / "s1").mkdir(parents=True)
    for name in ("s1/a.dcm", "s1/c.dcm"):
        (root / name).write_bytes(b"not read on the driver")
    src = SourceConfig(name="scans", format="dicom", path=str(root))
    before = [r["id"] for r in dicom_rows(src)]
    assert before == ["scans/train/s1/a.dcm", "scans/train/s1/c.dcm"]
    (root / "s1/b.dcm").write_bytes(b"inserted between the two")
    after = [r["id"] for r in dicom_rows(src)]
    assert after == ["scans/train/s1/a.dcm", "scans/train/s1/b.dcm", "scans/train/s1/c.dcm"]
    assert [r["source_index"] for r in dicom_rows(src)] == [0, 1, 2]  # the position stays, for messages only


# ------------------------------------------------------------------------------------------ confined paths


@pytest.mark.parametrize(
    "ref,why",
    [
        ("/etc/passwd", "is absolute"),
        ("../secret/x.png", "leaves it with '..'"),
        ("imgs/../../x.png", "leaves it with '..'"),
        ("s3://other-bucket/x.png", "is a URI"),
        ("file:///etc/passwd", "is a URI"),
    ],
)
def test_image_paths_outside_the_image_root_are_refused(tmp_path, ref, why):
    src = _csv(tmp_path, f"image,label\nok.png,cat\n{ref},dog\n")
    with pytest.raises(DataError) as info:
        labelled_rows(src, DataConfig())
    msg = str(info.value)
    assert msg.startswith(f"labels.csv row 1: image {ref!r} in column 'image' {why}")
    assert f"outside the image root {tmp_path}" in msg and "allow_paths_outside_root" in msg
    rows = labelled_rows(src, DataConfig(on_error="skip"))
    assert rows[0]["error"] is None and rows[1]["error"] == msg and rows[1]["image_ref"] is None
    src.allow_paths_outside_root = True
    assert labelled_rows(src, DataConfig())[1]["image_ref"] == ref


def test_vqa_and_report_paths_are_confined_and_name_their_field(tmp_path):
    from meddr_ray.data.report_files import report_rows
    from meddr_ray.data.vqa_json import vqa_rows

    (tmp_path / "q.json").write_text(json.dumps([{"image_name": "../../x.jpg", "question": "Q?", "answer": "no"}]))
    src = SourceConfig(name="rad", format="vqa_json", path=str(tmp_path / "q.json"))
    with pytest.raises(DataError, match=r"^q\.json row 0: image '\.\./\.\./x\.jpg' in column 'image_name' leaves"):
        vqa_rows(src, DataConfig())
    (tmp_path / "r.csv").write_text("path,report\n/abs/x.dcm,Normal.\n")
    src = SourceConfig(name="mimic", format="reports", path=str(tmp_path / "r.csv"), image_column="path")
    with pytest.raises(DataError, match=r"^r\.csv row 0: image '/abs/x\.dcm' in column 'path' is absolute"):
        report_rows(src, DataConfig())
