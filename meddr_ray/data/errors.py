"""The one error type of the data layer, and helpers to find it again after Ray has wrapped it."""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional


class DataError(ValueError):
    """Bad input data. The message names the file and the row, e.g.
    ``"breast.csv row 3: image 'x.png' not found under /abs/dir"``.

    Row numbers are the ``source_index`` of the row: 0-based, counting data rows (not the CSV header), before
    any split/language filter, so the row in the message is the row with that ``source_index``.
    """


def where(file: Optional[str] = None, row: Optional[int] = None, field: Optional[str] = None, *,
          split: Optional[str] = None, row_id: Optional[str] = None, full_path: bool = False) -> str:  # fmt: skip
    """How an error message names a place in the input: the file (its name without its folder, or the whole path
    with ``full_path``), then the split, the row (its ``source_index``), the row's id and the field, each if given.
    ``where("/d/breast.csv", 3)`` is ``"breast.csv row 3"``; ``where("/d/a.csv", 5, full_path=True)`` is
    ``"/d/a.csv row 5"``; ``where("b.npz", 3, split="test")`` is ``"b.npz split test row 3"``;
    ``where("b.csv", 3, "label")`` is ``"b.csv row 3, column 'label'"``; ``where(row_id="x1")`` is
    ``"row id x1"``."""
    words = []
    if file is not None:
        words.append(str(file) if full_path else os.path.basename(str(file).rstrip("/")) or str(file))
    if split is not None:
        words.append(f"split {split}")
    if row is not None:
        words.append(f"row {row}")
    if row_id is not None:
        words.append(f"row id {row_id}")
    text = " ".join(words)
    if field is not None:
        text += f", column {field!r}"
    return text


def sample_where(sample: Dict[str, Any], *, full_path: bool = False) -> str:
    """Where a row of the sample schema came from: its source file (the dataset when it has none) and its
    ``source_index``, e.g. ``labels.csv row 2`` (``/data/labels.csv row 2`` with ``full_path``)."""
    return where(str(sample.get("source_file") or sample.get("dataset")), sample.get("source_index"),
                 full_path=full_path)  # fmt: skip


_RAY_TEXT = re.compile(r"DataError: (.+)")


def unwrap_data_error(exc: BaseException) -> Optional[DataError]:
    """The :class:`DataError` behind ``exc`` (itself, or the cause inside a Ray task error), or None.

    Ray re-raises a task's exception on the driver as ``RayTaskError(DataError)``: it is an instance of
    DataError, but its text carries the remote traceback. Walk the cause chain for the original, and fall back
    to parsing the text, because Ray Data sometimes re-wraps the error in its own exception types.
    """
    seen = set()
    stack = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, DataError) and not _is_ray_wrapper(err):
            return err
        stack.extend([getattr(err, "cause", None), err.__cause__, err.__context__])
    match = _RAY_TEXT.findall(str(exc))
    return DataError(match[-1].strip()) if match else None


def _is_ray_wrapper(err: BaseException) -> bool:
    try:
        from ray.exceptions import RayError
    except ImportError:  # the data helpers are usable without Ray
        return False
    return isinstance(err, RayError)
