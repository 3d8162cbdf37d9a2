"""The one error type of the data layer, and helpers to find it again after Ray has wrapped it."""

from __future__ import annotations

import os
import re
from typing import Optional


class DataError(ValueError):
    """Bad input data. The message names the file and the row, e.g.
    ``"breast.csv row 3: image 'x.png' not found under /abs/dir"``.

    Row numbers are the ``source_index`` of the row: 0-based, counting data rows (not the CSV header), before
    any split/language filter, so the row in the message is the row with that ``source_index``.
    """


def where(file: str, row: Optional[int] = None, field: Optional[str] = None, *, split: Optional[str] = None) -> str:
    """How an error message names a place in the input: the file's name (without its folder), then the split,
    the row (its ``source_index``) and the field if given. ``where("/d/breast.csv", 3)`` is
    ``"breast.csv row 3"``; ``where("b.npz", 3, split="test")`` is ``"b.npz split test row 3"``;
    ``where("b.csv", 3, "label")`` is ``"b.csv row 3, column 'label'"``."""
    text = os.path.basename(str(file).rstrip("/")) or str(file)
    if split is not None:
        text += f" split {split}"
    if row is not None:
        text += f" row {row}"
    if field is not None:
        text += f", column {field!r}"
    return text


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
