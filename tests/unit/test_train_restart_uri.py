"""``train.restart`` on a ``file://`` run directory (a pyarrow URI on a local or mounted filesystem, which can move
a folder): the old checkpoints are moved aside as on a plain path, so a pipeline re-run on such a run can restart
training. Object stores, which cannot move a folder, are still refused by name."""

from __future__ import annotations

import pytest

from meddr_ray.stages.train.resume import TrainResumeError, check_resume


def test_restart_on_a_file_uri_moves_the_checkpoints_aside(tmp_path):
    experiment = tmp_path / "train" / "finetune"
    (experiment / "checkpoint_step0000004").mkdir(parents=True)
    check_resume(f"file://{experiment}", None, {}, restart=True)
    assert not experiment.exists()
    aside = [p for p in experiment.parent.iterdir() if p.name.startswith("finetune.replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint_step0000004").is_dir()


def test_restart_on_an_object_store_is_refused_by_name(monkeypatch):
    import pyarrow.fs as pafs

    from meddr_ray import storage

    monkeypatch.setattr(storage, "exists", lambda path: True)
    # a filesystem that is not the local one (as S3's), without a network
    monkeypatch.setattr(storage, "resolve", lambda path: (pafs.SubTreeFileSystem("/", pafs.LocalFileSystem()), path))
    with pytest.raises(TrainResumeError, match="cannot move a folder aside"):
        check_resume("s3://bucket/run/train/finetune", None, {}, restart=True)


def test_the_adapter_folder_is_published_to_a_file_uri_run(tmp_path):
    """A flat adapter folder (no sub-folders) copied to a URI: pyarrow's copy_files makes only sub-folders, so
    the destination's root must be made first (a file:// pipeline failed right after training without it)."""
    from meddr_ray.stages.train.stage import _copy_tree

    src = tmp_path / "ckpt" / "adapter"
    src.mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    (src / "adapter_config.json").write_text("{}")
    dst = tmp_path / "run" / "adapter"
    _copy_tree(str(src), f"file://{dst}")
    assert sorted(p.name for p in dst.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (src / "adapter_config.json").write_text('{"r": 16}')
    _copy_tree(str(src), f"file://{dst}")  # a second training run replaces it
    assert (dst / "adapter_config.json").read_text() == '{"r": 16}'
