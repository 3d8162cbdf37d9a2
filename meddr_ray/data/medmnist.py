"""MedMNIST ``.npz`` files (``format: medmnist``), streamed: the driver never loads an image array.

The driver reads only the ``.npy`` headers inside the zip (shapes, dtypes) and makes a small dataset of
``(split, start, end)`` chunks of ``rows_per_block`` rows. Each Ray task reads only its chunk's rows
(:func:`read_rows`), so a worker's memory is bounded by its block, never by the array: an uncompressed member
(``np.savez``) is read in place (a seek to the rows); a compressed one (``np.savez_compressed``, as MedMNIST
ships) cannot be sought, so the first task on a node streams it once into an uncompressed ``.npy`` under
``$MEDDR_RAY_CACHE/npz-members/`` (bounded memory, one file per array, keyed by the npz's path, size and mtime)
and every task then seeks in that file. Nothing is cached in a worker process.

Row ids are :func:`~meddr_ray.data.schema.sample_id` of the row's position: a MedMNIST release is a fixed array
whose position is the official index, so ids do not shift (unlike folders and tables, keyed by path or content).

Labels are ``(N,)`` or ``(N, 1)`` class indices, or ``(N, C)`` 0/1 vectors for multi-label sets (ChestMNIST).
A multi-label sample with no positive class gets ``labels = []`` (the exact positive set, for multi-label
metrics) and ``label = "no finding"`` (:data:`NO_FINDING`, the text a model should answer, as in
ChestX-ray14's "No Finding").
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import struct
import zipfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from meddr_ray import storage
from meddr_ray.config import DataConfig, SourceConfig, cache_dir
from meddr_ray.data.common import check_on_error, default_task, fail
from meddr_ray.data.errors import DataError, where
from meddr_ray.data.images import encode_png
from meddr_ray.data.schema import SAMPLE_SCHEMA, make_row, rows_to_table, sample_id

NO_FINDING = "no finding"

_ORGANS = [
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
]  # fmt: skip

# Label names exactly as in MedMNIST v2's INFO (medmnist/info.py); modality as a prompt would name it.
MEDMNIST_INFO: Dict[str, Dict[str, Any]] = {
    "pathmnist": {
        "modality": "colon pathology",
        "labels": [
            "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
            "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium",
        ],
    },
    "chestmnist": {
        "modality": "chest X-ray",
        "multi_label": True,
        "labels": [
            "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
            "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia",
        ],
    },
    "dermamnist": {
        "modality": "dermatoscopy",
        "labels": [
            "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
            "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions",
        ],
    },
    "octmnist": {
        "modality": "retinal OCT",
        "labels": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    },
    "pneumoniamnist": {"modality": "chest X-ray", "labels": ["normal", "pneumonia"]},
    # The official names are the bare diabetic-retinopathy grades 0-4; set label_names for wordier ones.
    "retinamnist": {"modality": "fundus photography", "labels": ["0", "1", "2", "3", "4"]},
    "breastmnist": {"modality": "breast ultrasound", "labels": ["malignant", "normal, benign"]},
    "bloodmnist": {
        "modality": "blood cell microscopy",
        "labels": [
            "basophil", "eosinophil", "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte", "monocyte", "neutrophil", "platelet",
        ],
    },
    "tissuemnist": {
        "modality": "kidney cortex microscopy",
        "labels": [
            "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
            "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ],
    },
    "organamnist": {"modality": "abdominal CT", "labels": _ORGANS},
    "organcmnist": {"modality": "abdominal CT", "labels": _ORGANS},
    "organsmnist": {"modality": "abdominal CT", "labels": _ORGANS},
}  # fmt: skip


def medmnist_info(name: str) -> Optional[Dict[str, Any]]:
    """Metadata of a MedMNIST dataset by name (``breastmnist``; size suffixes as in ``breastmnist_224`` too)."""
    return MEDMNIST_INFO.get(re.sub(r"_\d+$", "", name.strip().lower()))


# ------------------------------------------------------------------------------------- npz internals


def _open(path: str):
    if "://" in path:  # a pyarrow file is seekable, which is all zipfile needs
        fs, p = storage.resolve(path)
        return fs.open_input_file(p)
    return open(path, "rb")


def _mtime(path: str) -> int:
    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    if info.type.name != "File":
        raise DataError(f"{path}: no such .npz file")
    return info.mtime_ns or 0


def _read_header(fp) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    return np.lib.format.read_array_header_2_0(fp)


def _member(zf: zipfile.ZipFile, key: str, name: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(f"{key}.npy")
    except KeyError:
        have = ", ".join(sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy")))
        raise DataError(f"{name}: missing array {key!r} (the file has: {have or 'no arrays'})") from None


def npz_shapes(path: str, keys: List[str]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of arrays in an npz from their headers alone (a few hundred bytes each)."""
    name = os.path.basename(path)
    try:
        with _open(path) as f, zipfile.ZipFile(f) as zf:
            shapes = {}
            for key in keys:
                with zf.open(_member(zf, key, name)) as fp:
                    shapes[key] = tuple(_read_header(fp)[0])
            return shapes
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataError(f"{name}: not a readable .npz file ({exc})") from None


def _rows_at(f, offset: int, shape: Tuple[int, ...], dtype: np.dtype, start: int, end: int, what: str) -> np.ndarray:
    """Rows ``start:end`` of a C-order array whose data begins at byte ``offset`` of the open file ``f``."""
    row_shape = tuple(shape[1:])
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    start, end = max(0, start), min(int(shape[0]), end)
    count = max(0, end - start)
    f.seek(offset + start * row_bytes)
    data = f.read(count * row_bytes)
    if len(data) != count * row_bytes:
        raise DataError(f"{what} rows {start}..{end}: the file ends early ({len(data)} of {count * row_bytes} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape((count, *row_shape))


def _check_layout(fortran: bool, dtype: np.dtype, name: str, key: str) -> None:
    if fortran:
        raise DataError(f"{name}: array {key!r} is stored in Fortran order; save it in C order to read it by rows")
    if dtype.hasobject:
        raise DataError(f"{name}: array {key!r} holds Python objects; MedMNIST arrays are plain numbers")


def _unpacked_member(path: str, mtime: int, size: int, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """A local, uncompressed ``.npy`` copy of a compressed npz member, made once per node (a file lock keeps the
    node's other workers waiting instead of unpacking it again) by streaming it in 256 KiB pieces."""
    key = hashlib.sha1(f"{path}\x1f{size}\x1f{mtime}\x1f{info.filename}".encode()).hexdigest()[:24]
    folder = cache_dir() / "npz-members"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{key}.npy"
    if target.exists():
        return str(target)
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():  # another worker may have made it while this one waited
            tmp = folder / f"{key}.npy.tmp-{os.getpid()}"
            with zf.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 18)
            os.replace(tmp, target)
    return str(target)


def read_rows(path: str, key: str, start: int, end: int, mtime: Optional[int] = None) -> np.ndarray:
    """Rows ``start:end`` of the array ``key`` of an npz, reading only those rows (see the module docstring)."""
    name = os.path.basename(path)
    mtime = _mtime(path) if mtime is None else mtime
    try:
        with _open(path) as f, zipfile.ZipFile(f) as zf:
            info = _member(zf, key, name)
            if info.compress_type == zipfile.ZIP_STORED:
                with zf.open(info) as fp:
                    shape, fortran, dtype = _read_header(fp)
                    header_len = fp.tell()
                _check_layout(fortran, dtype, name, key)
                f.seek(info.header_offset)
                name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])  # the member's local file header
                offset = info.header_offset + 30 + name_len + extra_len + header_len
                return _rows_at(f, offset, shape, dtype, start, end, f"{name}: {key}")
            size = f.size() if hasattr(f, "size") else os.fstat(f.fileno()).st_size
            local = _unpacked_member(path, mtime, size, zf, info)
        with open(local, "rb") as fp:
            shape, fortran, dtype = _read_header(fp)
            _check_layout(fortran, dtype, name, key)
            return _rows_at(fp, fp.tell(), shape, dtype, start, end, f"{name}: {key}")
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataError(f"{name}: cannot read rows {start}..{end} of {key!r} ({exc})") from None


# ------------------------------------------------------------------------------------------- rows


def _label_names(raw: np.ndarray, names: List[str], multi: bool, where: str, dataset: str) -> List[str]:
    values = np.asarray(raw).reshape(-1)
    if multi:
        if not np.isin(values, (0, 1)).all():
            raise DataError(f"{where}: multi-label vector must be 0/1, got {values.tolist()}")
        return [names[j] for j in np.flatnonzero(values)]
    value = float(values[0])
    if not value.is_integer() or not 0 <= value < len(names):
        raise DataError(
            f"{where}: label {values[0]} is outside the {len(names)} classes of {dataset} (0..{len(names) - 1})"
        )
    return [names[int(value)]]


def _chunk_rows(batch, *, path, mtime, src_name, names, multi, modality, task, on_error):
    """Ray task: the rows of some (split, start, end) chunks of the npz."""
    out = []
    for chunk in batch.to_pylist():
        split, start, end = chunk["split"], chunk["start"], chunk["end"]
        images = read_rows(path, f"{split}_images", start, end, mtime)
        labels = read_rows(path, f"{split}_labels", start, end, mtime)
        for k, index in enumerate(range(start, end)):
            row = make_row(
                id=sample_id(src_name, split, index),
                dataset=src_name,
                split=split,
                source_index=index,
                source_file=path,
                modality=modality,
                task=task,
                label_set=names,
            )
            here = where(path, index, split=split)
            try:
                row["labels"] = _label_names(labels[k], names, multi, here, src_name)
                row["label"] = ", ".join(row["labels"]) or NO_FINDING
                row["image"] = encode_png(images[k])
            except DataError as exc:
                fail(row, str(exc), on_error)
            out.append(row)
    return rows_to_table(out)


def _todo_runs(count: int, is_done: Callable[[int], bool]) -> Iterator[Tuple[int, int]]:
    """``(start, end)`` runs of consecutive indices in ``range(count)`` that are not done."""
    start = None
    for index in range(count):
        if is_done(index):
            if start is not None:
                yield start, index
            start = None
        elif start is None:
            start = index
    if start is not None:
        yield start, count


def read_medmnist(src: SourceConfig, data_cfg: DataConfig, *, skip: Optional[Callable[[str], bool]] = None):
    """Ray Dataset of an npz's splits; rows whose id ``skip`` is true for are left out of the chunks, so their
    pixels are never read (the driver computes the ids of every row: a hash each, no array is opened)."""
    import ray

    on_error = check_on_error(data_cfg)
    name = os.path.basename(src.path)
    info = medmnist_info(src.name) or medmnist_info(os.path.splitext(name)[0]) or {}
    names = list(src.label_names or info.get("labels") or [])
    if not names:
        raise DataError(f"{name}: {src.name!r} is not a known MedMNIST dataset; set label_names for it")
    mtime = _mtime(src.path)
    shapes = npz_shapes(src.path, [f"{s}_{kind}" for s in src.splits for kind in ("images", "labels")])

    multi = bool(info.get("multi_label"))
    chunks, remaining = [], src.limit
    for split in src.splits:
        image_shape, label_shape = shapes[f"{split}_images"], shapes[f"{split}_labels"]
        if len(image_shape) not in (3, 4) or (len(image_shape) == 4 and image_shape[3] not in (1, 3)):
            raise DataError(f"{name}: {split}_images has shape {image_shape}; expected (N, H, W) or (N, H, W, 3)")
        if label_shape[:1] != image_shape[:1] or len(label_shape) > 2:
            raise DataError(f"{name}: {split}_labels has shape {label_shape} for {image_shape[0]} images")
        if len(label_shape) == 2 and label_shape[1] > 1:
            multi = True
            if label_shape[1] != len(names):
                raise DataError(f"{name}: {split}_labels has {label_shape[1]} columns for {len(names)} label names")
        count = image_shape[0] if remaining is None else min(image_shape[0], max(0, remaining))
        remaining = None if remaining is None else remaining - count
        step = max(1, data_cfg.rows_per_block)
        done = (lambda i, split=split: skip(sample_id(src.name, split, i))) if skip else (lambda i: False)
        for first, stop in _todo_runs(count, done):
            chunks += [{"split": split, "start": a, "end": min(a + step, stop)} for a in range(first, stop, step)]

    if not chunks:
        return ray.data.from_arrow(SAMPLE_SCHEMA.empty_table())
    return ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        _chunk_rows,
        batch_size=None,  # one chunk per block, one block per call
        batch_format="pyarrow",
        fn_kwargs=dict(
            path=src.path,
            mtime=mtime,
            src_name=src.name,
            names=names,
            multi=multi,
            modality=src.modality or info.get("modality"),
            task=default_task(src),
            on_error=on_error,
        ),
    )
