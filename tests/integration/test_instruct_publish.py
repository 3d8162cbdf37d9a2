"""Publishing the instruction mix: on storage that cannot rename a folder (S3, GCS through pyarrow), and through
a crash at every step of a publish, the last good mix stays readable by training and the index.

The driver's storage calls (``meddr_ray.storage.resolve``) go through a pyarrow ``PyFileSystem`` over local
files that behaves like an object store where it matters here: moving a folder is refused (files move, as a
copy and a delete do there). The same filesystem can stop the process's storage work at its n-th change (a
kill at that point), to check every step of a publish.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from meddr_ray import storage
from meddr_ray.config import load_config
from meddr_ray.stages.instruct import run_instruct

pytestmark = pytest.mark.integration


class SimulatedCrash(BaseException):
    """The process dies here (a BaseException: nothing on the way catches it as an ordinary error)."""


class LocalStore(FSSpecHandler):
    """Local files behind pyarrow's ``PyFileSystem``; ``rename_folders=False``: an object store's limit (no
    directory rename); ``crash_at=n``: the n-th change (create, write, move, delete) is never made, the process
    "dies" instead."""

    def __init__(self, rename_folders: bool, crash_at=None):
        super().__init__(LocalFileSystem(auto_mkdir=True))
        self.rename_folders, self.crash_at, self.changes = rename_folders, crash_at, []

    def _change(self, what: str) -> None:
        self.changes.append(what)
        if self.crash_at is not None and len(self.changes) >= self.crash_at:
            raise SimulatedCrash(f"killed at change {len(self.changes)}: {what}")

    def move(self, src, dest):
        if not self.rename_folders and self.fs.isdir(src):
            raise OSError(f"{src}: this store cannot rename a folder (as S3 and GCS through pyarrow)")
        self._change(f"move {src} -> {dest}")
        return super().move(src, dest)

    def create_dir(self, path, recursive):
        self._change(f"create_dir {path}")
        return super().create_dir(path, recursive)

    def delete_dir(self, path):
        self._change(f"delete_dir {path}")
        return super().delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._change(f"delete_dir_contents {path}")
        return super().delete_dir_contents(path, missing_dir_ok)

    def delete_file(self, path):
        self._change(f"delete_file {path}")
        return super().delete_file(path)

    def copy_file(self, src, dest):
        self._change(f"copy_file {src} -> {dest}")
        return super().copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        self._change(f"write {path}")
        return super().open_output_stream(path, metadata)


def _use(monkeypatch, store: LocalStore) -> None:
    """Every storage call of this process (the driver) goes through ``store``."""
    monkeypatch.setattr(storage, "resolve", lambda path: (PyFileSystem(store), os.path.abspath(path)))


def _cfg(run_dir, limit: int, *extra: str):
    return load_config("tiny", [f"run_dir={run_dir}", "instruct.use_bootstrap=false", f"instruct.sources.0.limit={limit}",
                                *extra])  # fmt: skip


def _ids(cfg) -> set:
    """The rows training would read (``meddr_ray.stages.train.inputs.instruction_files``)."""
    from meddr_ray.stages.train.inputs import instruction_files

    return set(pq.read_table(instruction_files(cfg), columns=["id"]).column("id").to_pylist())


def test_publishes_without_renaming_a_folder_and_training_and_the_index_read_it(ray_cluster, tmp_path, monkeypatch):
    _use(monkeypatch, LocalStore(rename_folders=False))
    first = _cfg(tmp_path, 12)
    out = run_instruct(first).path
    assert len(_ids(first)) == 12

    from meddr_ray.stages.index.inputs import _instruct_parquet_files, input_dataset
    from meddr_ray.layout import CURRENT_FILE
    from meddr_ray.stages.instruct import published_mix
    from meddr_ray.stages.train.inputs import instruction_files

    second = _cfg(tmp_path, 20)
    assert run_instruct(second).path == out
    mix = published_mix(out)
    assert mix.rows["train"] + mix.rows.get("val", 0) == 20 and len(_ids(second)) == 20
    assert instruction_files(second) == _instruct_parquet_files(out) == mix.files
    assert all(f.startswith(os.path.join(out, mix.version) + os.sep) for f in mix.files)
    cases, _ = input_dataset(_cfg(tmp_path, 20, "index.sources=[]"))  # the index's input: the mix's train rows
    assert cases.count() == mix.rows["train"]
    # only the published version is left: the one before it is removed once nothing names it
    assert sorted(os.listdir(out)) == sorted([CURRENT_FILE, mix.version, ".lock"])


def test_a_crash_at_any_step_of_a_publish_keeps_a_readable_mix(ray_cluster, tmp_path, monkeypatch):
    """A re-run killed at each of its storage changes in turn, then the next start (which cleans up before it
    fails on a missing input): training reads the old mix or the new one, whole, never none."""
    old_cfg, new_cfg = _cfg(tmp_path, 8), _cfg(tmp_path, 10)
    broken_cfg = _cfg(tmp_path, 8, "instruct.use_bootstrap=true")  # no bootstrapped reports: fails after cleanup
    _use(monkeypatch, LocalStore(rename_folders=True))
    run_instruct(old_cfg)
    old = _ids(old_cfg)
    new = None
    for crash_at in range(1, 100):
        store = LocalStore(rename_folders=True, crash_at=crash_at)
        _use(monkeypatch, store)
        try:
            run_instruct(new_cfg)
        except SimulatedCrash:
            pass
        else:
            new = _ids(new_cfg)
            break
        _use(monkeypatch, LocalStore(rename_folders=True))
        with pytest.raises(FileNotFoundError, match="no bootstrapped reports"):
            run_instruct(broken_cfg)
        seen = _ids(old_cfg)  # raises when no mix is left
        assert seen == old or (len(seen) == 10 and old < seen), f"killed at {store.changes[-1]!r}: {len(seen)} rows"
    assert new is not None and old < new and len(new) == 10
    assert crash_at > 5  # the publish really was interrupted at several steps
