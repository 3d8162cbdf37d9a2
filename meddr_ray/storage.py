"""Local paths and pyarrow-filesystem URIs (``s3://``, ``gs://``, ...) behind one small API.

Artifacts live under ``run_dir``, which may be a shared filesystem on a cluster. Writes that readers must
never see half-done go to a temporary name first and are then moved into place.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pyarrow.fs as pafs
from pathlib import Path


def is_uri(path: str) -> bool:
    return "://" in path


def join_path(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def resolve(path: str) -> Tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def list_files(path: str, suffix: str = "") -> List[str]:
    """Files (not folders) directly under ``path`` ending with ``suffix``, sorted; [] if absent."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    prefix = path[: len(path) - len(p)] if "://" in path else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_file(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> str:
    """Write atomically: a temporary sibling, then a rename (a reader sees the old file or the new one)."""
    fs, p = resolve(path)
    parent = os.path.dirname(p)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)
    return path


def write_text(path: str, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def move(src: str, dst: str) -> None:
    fs, s = resolve(src)
    _, d = resolve(dst)
    fs.move(s, d)


# ------------------------------------------------------------------------------------------- pointers
#
# A versioned artifact (the instruction mix, the index) is published by a small file that names its current
# version. Readers follow the pointer, so a version is switched by replacing that file alone, in one step.


def read_pointer(path: str) -> Optional[str]:
    """The name a pointer file holds (its text, stripped), or None when the file is absent or empty."""
    if not exists(path):
        return None
    return read_text(path).strip() or None


def write_pointer(path: str, name: str) -> None:
    """Point ``path`` at ``name`` in one step: a local temporary file renamed over it; on an object store a
    single PUT (atomic there: a reader gets the old object or the new one; a rename would be a copy and a
    delete)."""
    text = name + "\n"
    if not is_uri(path):
        write_text(path, text)
        return
    fs, p = resolve(path)
    with fs.open_output_stream(p) as f:
        f.write(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------- run lock

LOCK_FILE = ".lock"


class RunBusyError(RuntimeError):
    """Another pipeline, demo or evaluation is running in the same folder."""


_HELD: Dict[str, Tuple[Any, int]] = {}  # run folder -> (open lock file, depth): the demo holds it around the pipeline


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` exclusively (re-entrant in one process). Two runs in one folder would write the
    same checkpoints, index versions and prediction files at once, so the second one stops at once instead."""
    if "://" in run_dir:  # object stores have no locks: one run per folder is up to the user there
        yield
        return
    import fcntl

    key = os.path.abspath(run_dir)
    if key in _HELD:
        handle, depth = _HELD[key]
        _HELD[key] = (handle, depth + 1)
        try:
            yield
        finally:
            handle, depth = _HELD[key]
            _HELD[key] = (handle, depth - 1)
        return
    os.makedirs(key, exist_ok=True)
    handle = open(os.path.join(key, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunBusyError(
            f"{run_dir} is in use by another meddr-ray pipeline, demo or evaluation ({holder}); wait for it to "
            f"finish, stop it, or use another folder"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    handle.flush()
    _HELD[key] = (handle, 1)
    try:
        yield
    finally:
        depth = _HELD[key][1] - 1
        if depth:
            _HELD[key] = (handle, depth)
        else:
            del _HELD[key]
            handle.close()  # releases the lock
