"""What every reader shares: reading a metadata file, the error policy, and the Ray step that loads images.

The table readers (image folder, VQA JSON, reports, DICOM) all work the same way. The driver reads only the
small metadata file and builds one row per sample, with the image left empty and two helper columns: where
the image is (``image_ref``) and how to name the row in errors (``where``). :func:`metadata_dataset` cuts
that table into blocks of ``rows_per_block`` rows, and a Ray task per block reads, checks and encodes the
images, so no image byte passes through the driver.

Row ids never depend on a row's position (:class:`RowIds`), and image paths stay inside the source's image root
(:func:`confine_image_ref`) unless the source allows otherwise.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from meddr_ray import storage
from meddr_ray.config import DataConfig, SourceConfig, source_task
from meddr_ray.storage import join_path
from meddr_ray.data.errors import DataError, where
from meddr_ray.data.images import load_image
from meddr_ray.data.schema import SAMPLE_SCHEMA, keyed_id, make_row, rows_to_table

IMAGE_REF = "image_ref"
WHERE = "where"
META_SCHEMA = SAMPLE_SCHEMA.append(pa.field(IMAGE_REF, pa.string())).append(pa.field(WHERE, pa.string()))

# Tried in this order when an image name has no extension (HAM10000's image_id, DICOM series exports).
IMAGE_EXTENSIONS = ("", ".jpg", ".jpeg", ".png", ".dcm")

def default_task(src: SourceConfig) -> str:
    """The task of the source's rows (:func:`meddr_ray.config.source_task`)."""
    return source_task(src)


def default_split(src: SourceConfig) -> str:
    """The split of rows whose file has no split column: the first configured split (default ``train``)."""
    return src.splits[0] if src.splits else "train"


def image_root(src: SourceConfig) -> str:
    return src.image_root or os.path.dirname(src.path.rstrip("/"))


def check_on_error(data_cfg: DataConfig) -> str:
    if data_cfg.on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', not {data_cfg.on_error!r}")
    return data_cfg.on_error


def fail(row: Dict[str, Any], message: str, on_error: str) -> Dict[str, Any]:
    """Apply the error policy to a bad row: raise, or keep the row with its error and no image."""
    if on_error == "raise":
        raise DataError(message) from None  # one clean traceback, not "during handling of ..." twice
    row["image"] = None
    row["error"] = message
    return row


# ------------------------------------------------------------------------------------ metadata files


def read_metadata_bytes(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from None


def read_records(path: str) -> List[Dict[str, Any]]:
    """Rows of a JSON list of objects, a JSONL file or a CSV (all cells as strings, empty cell -> None)."""
    data = read_metadata_bytes(path)
    name = os.path.basename(path)
    lower = path.lower()
    if lower.endswith(".csv"):
        import pandas as pd

        try:
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        except Exception as exc:
            raise DataError(f"{path}: not a readable CSV ({exc})") from None
        frame.columns = [str(c).strip() for c in frame.columns]
        return [{k: (v if v != "" else None) for k, v in rec.items()} for rec in frame.to_dict("records")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # a binary file (an .npz, an image) given as JSON
        raise DataError(f"{path}: not a UTF-8 text file, so not JSON or JSONL ({exc.reason} at byte {exc.start})") from None
    if lower.endswith(".jsonl"):
        records = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{name} line {i + 1}: not valid JSON ({exc})") from None  # a line, not a row
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a list of JSON objects (one per sample)")
    return records


def require_columns(path: str, records: List[Dict[str, Any]], columns: List[str]) -> None:
    present = set(records[0]) if records else set()
    missing = [c for c in columns if c not in present]
    if records and missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(sorted(present))})")


class RowIds:
    """Ids of the rows of one metadata table, stable under inserts and unique.

    A row's id is ``<name>/<split>/<key>`` (:func:`keyed_id`), its key being the value of ``src.id_column`` when the
    row has one (a duplicate value is a :class:`DataError` whatever ``on_error`` says: setting one row aside would
    skip a real sample under the other's id), else its image path and a hash of the fields the reader uses.
    Rows identical in those fields get ``~2``, ``~3``... in order, which an insert elsewhere does not shift.
    """

    def __init__(self, src: SourceConfig, fields: Sequence[str]):
        self.src = src
        self.fields = list(dict.fromkeys(fields))
        self.seen: Dict[str, str] = {}  # id -> the row that has it, for the duplicate message

    def __call__(self, rec: Dict[str, Any], split: str, image_ref: Optional[str], where: str) -> str:
        column = self.src.id_column
        value = rec.get(column) if column else None
        if value is not None and str(value).strip():
            row_id = keyed_id(self.src.name, split, str(value).strip())
            if row_id in self.seen:
                raise DataError(
                    f"{where}: id {str(value).strip()!r} in column {column!r} is also {self.seen[row_id]}; "
                    f"ids must be unique (set id_column: null to derive them from the rows)"
                )
        else:
            content = json.dumps([rec.get(f) for f in self.fields], sort_keys=True, default=str, ensure_ascii=False)
            digest = hashlib.sha1(content.encode()).hexdigest()[:12]
            base = keyed_id(self.src.name, split, f"{image_ref or ''}#{digest}")
            row_id, n = base, 1
            while row_id in self.seen:
                n += 1
                row_id = f"{base}~{n}"
        self.seen[row_id] = where
        return row_id


def confine_image_ref(ref: Any, column: str, src: SourceConfig, where: str) -> Optional[str]:
    """The image path a row names, checked to stay inside the image root: not absolute, no ``..`` out of it,
    not a URI (unless ``src.allow_paths_outside_root``). A table from elsewhere must not make the job read
    ``/etc/...`` or another bucket. Raises :class:`DataError` naming the row and column."""
    if ref is None:
        return None
    ref = str(ref)
    if src.allow_paths_outside_root:
        return ref
    posix = ref.replace("\\", "/")
    if "://" in ref:
        why = "is a URI"
    elif posix.startswith("/") or posix[1:3] == ":/":  # /x, C:\x
        why = "is absolute"
    elif posixpath.normpath(posix).split("/")[0] == "..":
        why = "leaves it with '..'"
    else:
        return ref
    raise DataError(
        f"{where}: image {ref!r} in column {column!r} {why}, outside the image root {image_root(src)} "
        f"(set allow_paths_outside_root: true on the source to allow it)"
    )


def limit_reached(rows: List[Dict[str, Any]], src: SourceConfig) -> bool:
    """``src.limit`` counts rows after the split/language filters; rows past it are not even checked."""
    return src.limit is not None and len(rows) >= src.limit


# -------------------------------------------------------------------------------- the table-reader loop


class Record(NamedTuple):
    """What a reader takes from one record of its table before any check: the image it names (``None``: none),
    the column that named it (for messages), and the sample columns it fills in :func:`make_row`."""

    image: Optional[str]
    image_column: Optional[str]
    fields: Dict[str, Any]


def metadata_row(src: SourceConfig, *, image_ref: Optional[str], where: str, **columns: Any) -> Dict[str, Any]:
    """A row of the metadata table: the sample's columns (``dataset`` is the source's name) plus where its image
    is and how to name it in errors."""
    row = make_row(dataset=src.name, **columns)
    row[IMAGE_REF], row[WHERE] = image_ref, where
    return row


def table_rows(
    src: SourceConfig,
    data_cfg: DataConfig,
    records: Iterable[Dict[str, Any]],
    *,
    id_fields: Sequence[str],
    take: Callable[[Dict[str, Any]], Record],
    check: Callable[[Dict[str, Any], Dict[str, Any], str], None],
    keep: Callable[[Dict[str, Any]], bool] = lambda rec: True,
) -> List[Dict[str, Any]]:
    """Metadata rows of a table's records, the loop every table reader shares (driver side: no image is read).

    Per record, in order: stop at ``src.limit``; leave it out unless ``keep(rec)`` (the VQA language filter) and
    its ``split`` (default: the first configured) is one of ``src.splits``; ``take`` its image and columns; give
    it an id (:class:`RowIds` over ``id_fields``); confine its image to the image root; then ``check(row, rec,
    where)`` may fill more columns and raises :class:`DataError` for a bad row. A bad row raises or is kept with
    its error, as ``data_cfg.on_error`` says.
    """
    on_error = check_on_error(data_cfg)
    task, fallback_split = default_task(src), default_split(src)
    row_id = RowIds(src, id_fields)
    rows: List[Dict[str, Any]] = []
    for index, rec in enumerate(records):
        if limit_reached(rows, src):
            break
        if not keep(rec):
            continue
        split = rec.get("split") or fallback_split
        if split not in src.splits:
            continue
        here = where(src.path, index)
        image, image_column, fields = take(rec)
        row = metadata_row(
            src,
            image_ref=None,
            where=here,
            id=row_id(rec, split, image, here),
            split=split,
            source_index=index,
            source_file=src.path,
            task=task,
            **fields,
        )
        try:
            row[IMAGE_REF] = confine_image_ref(image, image_column, src, here)
            check(row, rec, here)
        except DataError as exc:
            fail(row, str(exc), on_error)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- the image-loading step


def metadata_dataset(
    rows: List[Dict[str, Any]],
    src: SourceConfig,
    data_cfg: DataConfig,
    *,
    dicom: Optional[bool] = None,
    skip: Optional[Callable[[str], bool]] = None,
):
    """A Ray Dataset in :data:`SAMPLE_SCHEMA` from metadata rows; images are read and checked in Ray tasks.

    Each row holds the schema columns plus ``image_ref`` (a path relative to the source's image root, or
    absolute; None = no image) and ``where`` (the row's name in error messages). Rows whose id ``skip`` is true
    for are dropped here, on the driver, so their images are never read (a resume's finished rows).
    """
    import ray

    if skip is not None:
        rows = [r for r in rows if not skip(r["id"])]
    if not rows:  # Ray drops empty blocks, and with them the schema
        return ray.data.from_arrow(SAMPLE_SCHEMA.empty_table())
    table = pa.Table.from_pylist([{**make_row(), **r} for r in rows], schema=META_SCHEMA)
    step = max(1, data_cfg.rows_per_block)
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    return ray.data.from_arrow(blocks).map_batches(
        _attach_images,
        batch_size=None,  # one call per block: the blocks are already cut to rows_per_block
        batch_format="pyarrow",
        fn_kwargs=dict(
            root=image_root(src),
            require_images=src.require_images,
            dicom=dicom,
            max_bytes=data_cfg.max_image_bytes,
            max_pixels=data_cfg.max_image_pixels,
            on_error=check_on_error(data_cfg),
        ),
    )


def _is_file(path: str) -> bool:
    fs, p = storage.resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def find_image(root: str, ref: str, where: str, require: bool) -> Optional[str]:
    """The existing file ``ref`` names (trying extensions if it has none); None if absent and not required."""
    has_ext = bool(os.path.splitext(ref)[1])
    for ext in ("",) if has_ext else IMAGE_EXTENSIONS:
        name = ref + ext
        path = name if (os.path.isabs(name) or "://" in name) else join_path(root, name)
        if _is_file(path):
            return path
    if require:
        tried = "" if has_ext else f" (also tried {', '.join(IMAGE_EXTENSIONS[1:])})"
        raise DataError(f"{where}: image {ref!r} not found under {root}{tried}")
    return None


def _read_image(path: str, where: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except OSError as exc:
        raise DataError(f"{where}: cannot read image {path} ({exc})") from None


def _attach_images(
    batch: pa.Table,
    *,
    root: str,
    require_images: bool,
    dicom: Optional[bool],
    max_bytes: int,
    max_pixels: int,
    on_error: str,
) -> pa.Table:
    """Ray task: read, validate and encode the image of every row of a block (runs where the block is)."""
    out = []
    for row in batch.to_pylist():
        ref, where = row.pop(IMAGE_REF), row.pop(WHERE)
        if ref and row["error"] is None:
            try:
                path = find_image(root, ref, where, require_images)
                if path is not None:
                    row["image"], tag = load_image(
                        _read_image(path, where), max_bytes=max_bytes, max_pixels=max_pixels, where=where, dicom=dicom
                    )
                    row["modality"] = row["modality"] or tag
            except DataError as exc:
                fail(row, str(exc), on_error)
        out.append(row)
    return rows_to_table(out)


def split_errors(ds):
    """``(good, bad)``: rows without and with an ``error``. Stages count and set aside the bad ones.

    Both are lazy views of ``ds``: materialize ``ds`` first if it should not be read twice.
    """
    from ray.data.expressions import col

    return ds.filter(expr=col("error").is_null()), ds.filter(expr=col("error").is_not_null())
