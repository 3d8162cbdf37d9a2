"""Published index versions, without Ray: publish (compare-and-swap on ``CURRENT``, idempotent per build),
versions, manifests, and loading with checks.

A published version is a folder ``<index_dir>/<version>/`` with ``manifest.json``, ``index.faiss`` (+
``index.ivfdata`` for IVF) and ``values.parquet`` (row i = FAISS id i). It is written under a temporary name,
renamed into place, and only then named by ``<index_dir>/CURRENT`` (itself replaced atomically), so a reader
never sees a half-written version. Publishing is a compare-and-swap on the parent version (``parent=``) and
idempotent per ``build_id`` (:func:`publish_staged`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import pyarrow as pa

from meddr_ray import storage
from meddr_ray.layout import CURRENT_FILE
from meddr_ray.retrieval.faiss_io import _faiss, apply_search_params, describe, read_published_index, to_cpu
from meddr_ray.retrieval.format import (
    FORMAT_VERSION,
    INDEX_FILE,
    IVFDATA_FILE,
    MANIFEST_FILE,
    METRIC,
    REQUIRED_VALUE_COLUMNS,
    VALUES_FILE,
    IndexArtifactError,
    PublishConflict,
    conform_values,
)
from meddr_ray.storage import is_uri, join_path

log = logging.getLogger("meddr_ray.retrieval.store")

_VERSION_RE = re.compile(r"^v(\d+)$")
_STALE_TMP_S = 3600  # temporary folders older than this are from crashed publishers


# -------------------------------------------------------------------------------------------- files


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as f:
        while True:
            chunk = f.read(8 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _size(path: str) -> int:
    fs, p = storage.resolve(path)
    return int(fs.get_file_info(p).size)


def _write_parquet(table: pa.Table, path: str) -> None:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    pq.write_table(table, p, filesystem=fs)


def _read_parquet(path: str) -> pa.Table:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    return pq.read_table(p, filesystem=fs)


# -------------------------------------------------------------------------------------------- versions


def list_versions(index_dir: str) -> List[str]:
    """Published version folders (``v0001``, ``v0002``, ...) in order."""
    fs, p = storage.resolve(index_dir)
    import pyarrow.fs as pafs

    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    names = [
        os.path.basename(i.path)
        for i in fs.get_file_info(pafs.FileSelector(p, recursive=False))
        if i.type == pafs.FileType.Directory
    ]
    return sorted((n for n in names if _VERSION_RE.match(n)), key=lambda n: int(n[1:]))


def current_version(index_dir: str) -> Optional[str]:
    """The version ``CURRENT`` names, or None when nothing has been published."""
    return storage.read_pointer(join_path(index_dir, CURRENT_FILE))


def _next_version(index_dir: str) -> str:
    versions = list_versions(index_dir)
    return f"v{(int(versions[-1][1:]) + 1) if versions else 1:04d}"


def _claim_and_rename(tmp: str, final: str) -> None:
    """Move the finished temporary folder (local) to its version name; FileExistsError if that name is taken."""
    os.mkdir(final)  # atomic claim of the name: two publishers never get the same version
    os.rename(tmp, final)  # replaces the empty claimed folder in one step


def _switch_current(index_dir: str, version: str) -> None:
    storage.write_pointer(join_path(index_dir, CURRENT_FILE), version)


def _remove_stale_tmp(index_dir: str) -> None:
    if is_uri(index_dir) or not os.path.isdir(index_dir):
        return
    now = time.time()
    for name in os.listdir(index_dir):
        path = os.path.join(index_dir, name)
        try:
            stale = name.startswith(".tmp-") and now - os.path.getmtime(path) > _STALE_TMP_S
        except FileNotFoundError:  # another publisher's stage, renamed into place (or removed) since the listing
            continue
        if stale:
            log.info("removing %s, left by an interrupted publish", path)
            storage.remove(path)


class _Unchecked:
    def __repr__(self) -> str:
        return "UNCHECKED"


UNCHECKED: Any = _Unchecked()  # publish(parent=UNCHECKED): no compare-and-swap on CURRENT (tools, tests)
LOCK_FILE = ".publish.lock"


@contextlib.contextmanager
def _publish_lock(index_dir: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``<index_dir>/.publish.lock``: the check of CURRENT, the claim of a version name
    and the switch happen as one step among publishers of this folder (threads or processes, on one machine or
    over a filesystem whose locks are shared, e.g. NFSv4). The kernel drops it if the holder dies."""
    import fcntl

    with open(os.path.join(index_dir, LOCK_FILE), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def find_build(index_dir: str, build_id: Optional[str]) -> Optional[Dict[str, Any]]:
    """The manifest of the version published by ``build_id`` (newest first), or None: what makes a retried
    publish return the version its first attempt made instead of a second one."""
    if not build_id:
        return None
    for version in reversed(list_versions(index_dir)):
        path = join_path(index_dir, version, MANIFEST_FILE)
        if not storage.exists(path):
            continue  # a claimed version still being written (object stores)
        try:
            manifest = json.loads(storage.read_text(path))
        except (ValueError, UnicodeDecodeError):
            continue
        if manifest.get("build_id") == build_id:
            manifest["path"] = join_path(index_dir, version)
            return manifest
    return None


def _conflict(index_dir: str, parent: Optional[str], current: Optional[str]) -> PublishConflict:
    return PublishConflict(
        f"{join_path(index_dir, CURRENT_FILE)} names {current or 'nothing'}, but this build was made on "
        f"{parent or 'an empty index folder'}: another publisher moved it in between; nothing was published. Run "
        f"the build (or the --add) again to make it on {current or 'an empty folder'}"
    )


def new_stage(index_dir: str) -> str:
    """A private local folder to write a version's files into before :func:`publish_staged`: a hidden sibling of
    the versions (local ``index_dir``: renamed into place), or a local temporary folder (object stores)."""
    if is_uri(index_dir):
        return tempfile.mkdtemp(prefix="meddr-index-stage-")
    storage.makedirs(index_dir)
    _remove_stale_tmp(index_dir)
    stage = join_path(index_dir, f".tmp-{uuid.uuid4().hex[:12]}")
    os.makedirs(stage)
    return stage


def stage_index(index, values: pa.Table, stage: str) -> Dict[str, Any]:
    """Write an in-memory index and its values into ``stage``; returns :func:`describe` of the index."""
    index = to_cpu(index)
    values = conform_values(values)
    if values.num_rows != index.ntotal:
        raise IndexArtifactError(f"refusing to publish: {values.num_rows} value rows for {index.ntotal} vectors")
    _faiss().write_index(index, os.path.join(stage, INDEX_FILE))
    _write_parquet(values, os.path.join(stage, VALUES_FILE))
    return describe(index)


def publish(
    index_dir: str,
    index,
    values: pa.Table,
    manifest: Dict[str, Any],
    extra_files: Optional[Dict[str, str]] = None,
    parent: Any = UNCHECKED,
    build_id: Optional[str] = None,
) -> Dict[str, Any]:
    """Write an in-memory index as a new version and make it current (see :func:`publish_staged`)."""
    index = to_cpu(index)
    values = conform_values(values)
    if values.num_rows != index.ntotal:
        raise IndexArtifactError(f"refusing to publish: {values.num_rows} value rows for {index.ntotal} vectors")
    if find_build(index_dir, build_id) is None:
        stage = new_stage(index_dir)
        info = stage_index(index, values, stage)
    else:
        stage, info = None, describe(index)
    return publish_staged(index_dir, stage, info, manifest, extra_files, parent=parent, build_id=build_id)


def publish_staged(
    index_dir: str,
    stage: Optional[str],
    info: Dict[str, Any],
    manifest: Dict[str, Any],
    extra_files: Optional[Dict[str, str]] = None,
    parent: Any = UNCHECKED,
    build_id: Optional[str] = None,
) -> Dict[str, Any]:
    """Publish the files in the local folder ``stage`` (``index.faiss``, optionally ``index.ivfdata``,
    ``values.parquet``) as a new version and make it current. Returns the manifest as written (with ``version``
    and ``path``); ``stage`` is consumed.

    ``manifest`` carries the caller's fields (encoder fingerprint, model, parent, summary...); this adds the
    version, ``info`` (:func:`describe`), file sizes and sha256 checksums. ``extra_files``: name -> text.

    - ``parent``: compare-and-swap. The version ``CURRENT`` must still name (None: nothing published yet), else
      :class:`PublishConflict` and nothing is published -- a build made on a stale parent never moves ``CURRENT``
      backwards or drops a version published in between. ``UNCHECKED``: no check.
    - ``build_id``: idempotence. If a version with this build id exists (an earlier attempt of the same build
      that got as far as publishing), it is returned and no new version is made.

    Local folders: the checks, the claim of the version name and the switch run under an exclusive lock
    (:func:`_publish_lock`). Object stores (pyarrow: no lock, no conditional write) get the best that is
    available: the checks, a version folder claimed with a ``CLAIM`` object naming this build and read back, the
    files, the manifest, the check of ``CURRENT`` again just before it is written, and a read-back after it; two
    publishers that pass the last check within the same moment can still both write ``CURRENT`` (the later one
    wins). Run one publisher per index folder there, or publish to a local/NFS folder.
    """
    if stage is not None:
        _finish_stage(stage, info, extra_files)
    full = _full_manifest(manifest, info, stage, build_id)
    storage.makedirs(index_dir)
    if is_uri(index_dir):
        return _publish_uri(index_dir, stage, full, parent, build_id)
    return _publish_local(index_dir, stage, full, parent, build_id)


def _finish_stage(stage: str, info: Dict[str, Any], extra_files: Optional[Dict[str, str]]) -> None:
    """Check that the staged values line up with the staged index, and add the extra files."""
    count = _values_rows(os.path.join(stage, VALUES_FILE))
    if count != info["count"]:
        shutil.rmtree(stage, ignore_errors=True)
        raise IndexArtifactError(f"refusing to publish: {count} value rows for {info['count']} vectors")
    for name, text in (extra_files or {}).items():
        with open(os.path.join(stage, name), "w", encoding="utf-8") as f:
            f.write(text)


def _full_manifest(manifest: Dict[str, Any], info: Dict[str, Any], stage: Optional[str],
                   build_id: Optional[str]) -> Dict[str, Any]:  # fmt: skip
    """The caller's manifest plus format, metric, :func:`describe` fields, file sizes and checksums, build id."""
    full = dict(manifest)
    full.update(format=FORMAT_VERSION, metric=METRIC, **info)
    if stage is not None:
        names = [n for n in (INDEX_FILE, IVFDATA_FILE, VALUES_FILE) if os.path.exists(os.path.join(stage, n))]
        full["files"] = {n: {"bytes": _size(os.path.join(stage, n)), "sha256": _sha256_file(os.path.join(stage, n))}
                         for n in names}  # fmt: skip
    if build_id:
        full["build_id"] = build_id
    full.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return full


def _publish_local(index_dir: str, stage: Optional[str], full: Dict[str, Any], parent: Any,
                   build_id: Optional[str]) -> Dict[str, Any]:  # fmt: skip
    """A local (or NFS) folder: the checks, the claim of the version name and the switch under the lock."""
    with _publish_lock(index_dir):
        done = find_build(index_dir, build_id)
        if done is not None:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            log.info("publish: build %s is already version %s", build_id, done["version"])
            return done
        if stage is None:
            raise IndexArtifactError(f"{index_dir}: build {build_id} was expected to be published but is not")
        current = current_version(index_dir)
        if parent is not UNCHECKED and current != parent:
            shutil.rmtree(stage, ignore_errors=True)
            raise _conflict(index_dir, parent, current)
        for _ in range(1000):  # a publisher without the lock (an older meddr-ray) may hold the next number
            version = _next_version(index_dir)
            _write_manifest(full, version, stage)
            final = join_path(index_dir, version)
            try:
                _claim_and_rename(stage, final)
                break
            except FileExistsError:
                continue
        else:
            raise IndexArtifactError(f"{index_dir}: could not claim a version name")
        _switch_current(index_dir, version)
    full["path"] = final
    return full


def _write_manifest(full: Dict[str, Any], version: str, where: str) -> None:
    full["version"] = version
    storage.write_text(join_path(where, MANIFEST_FILE), json.dumps(full, indent=2, sort_keys=True) + "\n")


def _values_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def _publish_uri(index_dir: str, stage: Optional[str], full: Dict[str, Any], parent: Any, build_id) -> Dict[str, Any]:
    """Object stores: no folder rename, no lock, no conditional write (see :func:`publish_staged`)."""
    import pyarrow.fs as pafs

    done = find_build(index_dir, build_id)
    if done is not None:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        return done
    if stage is None:
        raise IndexArtifactError(f"{index_dir}: build {build_id} was expected to be published but is not")
    try:
        current = current_version(index_dir)
        if parent is not UNCHECKED and current != parent:
            raise _conflict(index_dir, parent, current)
        token = build_id or uuid.uuid4().hex
        final = version = None
        for _ in range(1000):
            version = _next_version(index_dir)
            final = join_path(index_dir, version)
            if storage.exists(final):
                continue
            storage.write_text(join_path(final, "CLAIM"), token)
            if storage.read_text(join_path(final, "CLAIM")) == token:  # another claimer's write would show here
                break
        else:
            raise IndexArtifactError(f"{index_dir}: could not claim a version name")
        fs, remote = storage.resolve(final)
        for name in os.listdir(stage):
            pafs.copy_files(os.path.join(stage, name), f"{remote}/{name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)  # fmt: skip
        _write_manifest(full, version, final)  # written last: a version without it is incomplete
        current = current_version(index_dir)
        if parent is not UNCHECKED and current != parent:
            storage.remove(final)
            raise _conflict(index_dir, parent, current)
        _switch_current(index_dir, version)
        if current_version(index_dir) != version:
            raise PublishConflict(
                f"{join_path(index_dir, CURRENT_FILE)}: another publisher wrote it at the same moment (object "
                f"stores have no conditional write); {version} is complete but not current"
            )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    full["path"] = final
    return full


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedIndex:
    """A published version in memory: FAISS index, values (row i = FAISS id i) and manifest."""

    index: Any
    values: pa.Table
    manifest: Dict[str, Any]
    version: str
    path: str
    index_dir: str

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)


_REQUIRED = ("version", "dim", "count", "metric", "encoder_fingerprint", "files")


def load_manifest(index_dir: str, version: Optional[str] = None) -> Dict[str, Any]:
    """The manifest of ``version`` (default: the one ``CURRENT`` names), checked for the fields readers need."""
    if version is None:
        cur = join_path(index_dir, CURRENT_FILE)
        if not storage.exists(cur):
            raise IndexArtifactError(
                f"{index_dir}: no published index ({CURRENT_FILE} is missing); build one with `meddr-ray index`"
            )
        version = storage.read_text(cur).strip()
        if not version:
            raise IndexArtifactError(f"{cur} is empty; it should name the live version")
    vdir = join_path(index_dir, version)
    mpath = join_path(vdir, MANIFEST_FILE)
    if not storage.exists(mpath):
        known = ", ".join(list_versions(index_dir)) or "none"
        what = "does not exist" if not storage.exists(vdir) else f"has no {MANIFEST_FILE} (incomplete)"
        raise IndexArtifactError(f"{index_dir}: index version {version!r} {what}; published versions: {known}")
    try:
        manifest = json.loads(storage.read_text(mpath))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexArtifactError(f"{mpath}: not valid JSON ({exc})") from None
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise IndexArtifactError(f"{mpath}: missing fields {missing}")
    if manifest["version"] != version:
        raise IndexArtifactError(f"{mpath}: says version {manifest['version']!r} but lies in folder {version!r}")
    if manifest["metric"] != METRIC:
        raise IndexArtifactError(f"{mpath}: metric {manifest['metric']!r}, expected {METRIC!r}")
    manifest["path"] = vdir
    return manifest


def published_manifest(index_dir: str, needed_by: str, hint: str = "") -> Dict[str, Any]:
    """The manifest of the version ``CURRENT`` names, for a stage that cannot run without one: FileNotFoundError
    saying which stage (``needed_by``) needs it and how to get one when nothing is published."""
    if current_version(index_dir) is None:
        raise FileNotFoundError(
            f"{needed_by}: no retrieval index at {index_dir} (no published version: "
            f"{join_path(index_dir, CURRENT_FILE)} is missing); run `meddr-ray index` first{hint}"
        )
    return load_manifest(index_dir)


def check_compatible(
    manifest: Dict[str, Any], expect_dim: Optional[int] = None, expect_fingerprint: Optional[str] = None
) -> None:
    """Refuse an index built with another encoder: a different embedding dimension or weights fingerprint."""
    where = join_path(manifest["path"], MANIFEST_FILE)
    if expect_dim is not None and int(manifest["dim"]) != int(expect_dim):
        raise IndexArtifactError(
            f"{where}: the index has dimension {manifest['dim']} but the encoder produces {expect_dim}; "
            f"it was built with another model ({manifest.get('model_name')!r}): rebuild it with `meddr-ray index`"
        )
    if expect_fingerprint is not None and manifest["encoder_fingerprint"] != expect_fingerprint:
        raise IndexArtifactError(
            f"{where}: the index was built with encoder {manifest['encoder_fingerprint']} "
            f"({manifest.get('model_name')!r}) but the current encoder is {expect_fingerprint}; its vectors are not "
            f"comparable: rebuild it with `meddr-ray index`"
        )


def _check_file(vdir: str, name: str, expected: Dict[str, Any], verify: bool) -> str:
    path = join_path(vdir, name)
    if not storage.exists(path):
        raise IndexArtifactError(f"{path} is missing")
    size = _size(path)
    if size != int(expected["bytes"]):
        raise IndexArtifactError(
            f"{path} is truncated or corrupt: {size} bytes, the manifest says {expected['bytes']}"
        )
    if verify and _sha256_file(path) != expected["sha256"]:
        raise IndexArtifactError(f"{path} is corrupt: its sha256 does not match the manifest")
    return path


def _fetch_on_disk_version(vdir: str, files: Dict[str, Any]) -> str:
    """FAISS maps ``index.ivfdata`` from a local file: copy an object-store version's index files into a local
    cache folder named by their checksums (fetched once per machine), and return the local ``index.faiss``."""
    import pyarrow.fs as pafs

    key = hashlib.sha256("".join(files[n]["sha256"] for n in (INDEX_FILE, IVFDATA_FILE)).encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), f"meddr-index-{key}")
    if not os.path.exists(os.path.join(local, INDEX_FILE)):
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp)
        fs, remote = storage.resolve(vdir)
        for name in (IVFDATA_FILE, INDEX_FILE):
            pafs.copy_files(f"{remote}/{name}", os.path.join(tmp, name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
        try:
            os.rename(tmp, local)
        except OSError:  # another loader on this machine fetched it first
            shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(local, INDEX_FILE)


def load_index(
    index_dir: str,
    expect_dim: Optional[int] = None,
    expect_fingerprint: Optional[str] = None,
    version: Optional[str] = None,
    verify: bool = True,
) -> LoadedIndex:
    """Load a published version (default: ``CURRENT``) after checking it end to end. An IVF version's inverted
    lists (``index.ivfdata``) are mapped into memory, not read: pages come from disk as searches touch them.

    Raises :class:`IndexArtifactError` with the reason when: nothing is published or the version is missing; the
    manifest's dimension or encoder fingerprint differs from ``expect_*``; ``index.faiss`` or ``values.parquet``
    is truncated or fails its checksum (``verify``) or cannot be read; the values do not line up with the index.
    """
    manifest = load_manifest(index_dir, version)
    version, vdir = manifest["version"], manifest["path"]
    check_compatible(manifest, expect_dim, expect_fingerprint)
    files = manifest["files"]
    for name in (INDEX_FILE, VALUES_FILE):
        if name not in files:
            raise IndexArtifactError(f"{join_path(vdir, MANIFEST_FILE)}: lists no {name}")
    checked = {name: _check_file(vdir, name, expected, verify) for name, expected in files.items()}
    ipath, vpath = checked[INDEX_FILE], checked[VALUES_FILE]
    index = _read_checked_index(ipath, manifest)
    values = _read_checked_values(vpath, int(index.ntotal))
    params = manifest.get("params", {})
    apply_search_params(index, params.get("nprobe"), params.get("ef_search"))
    return LoadedIndex(index=index, values=values, manifest=manifest, version=version, path=vdir, index_dir=index_dir)


def _read_checked_index(path: str, manifest: Dict[str, Any]):
    """The version's FAISS index (IVF lists mapped from ``index.ivfdata``; fetched first from an object store),
    checked against the manifest's dimension and count."""
    on_disk = IVFDATA_FILE in manifest["files"]
    if on_disk and is_uri(path):
        path = _fetch_on_disk_version(manifest["path"], manifest["files"])
    try:
        index = read_published_index(path, on_disk=on_disk)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IndexArtifactError(f"{path}: not a readable FAISS index ({reason})") from None
    if int(index.d) != int(manifest["dim"]) or int(index.ntotal) != int(manifest["count"]):
        raise IndexArtifactError(
            f"{path}: holds {index.ntotal} vectors of dimension {index.d}, the manifest says "
            f"{manifest['count']} of dimension {manifest['dim']}"
        )
    return index


def _read_checked_values(path: str, ntotal: int) -> pa.Table:
    """The version's values in :data:`meddr_ray.retrieval.format.VALUES_SCHEMA`, one row per vector of the index."""
    try:
        values = _read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise IndexArtifactError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in REQUIRED_VALUE_COLUMNS if c not in values.column_names]
    if missing:
        older = "task" in values.column_names and "text" in values.column_names
        raise IndexArtifactError(
            f"{path}: missing columns {missing}"
            + ("; it was published by an older meddr-ray (one vector per task row, not per image): rebuild it "
               "with `meddr-ray index`" if older else "")
        )
    values = conform_values(values)
    if values.num_rows != ntotal:
        raise IndexArtifactError(
            f"{path}: {values.num_rows} rows but the index holds {ntotal} vectors; the values do not line "
            f"up with the index"
        )
    return values


def local_index_file(manifest: Dict[str, Any]) -> str:
    """A published version's ``index.faiss`` as a path FAISS can read with its on-disk lists beside it (an
    object-store version's index files are fetched to a local cache first)."""
    path = join_path(manifest["path"], INDEX_FILE)
    if is_uri(path) and IVFDATA_FILE in manifest["files"]:
        return _fetch_on_disk_version(manifest["path"], manifest["files"])
    return path
