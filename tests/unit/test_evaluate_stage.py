"""The evaluate stage's checks before any Ray work, and its per-batch skip (no Ray, no model): wrong files in the
evaluation folder, sources that would mix tasks, and which rows a batch skips."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddr_ray import cli
from meddr_ray.config import ConfigError, load_config
from meddr_ray.stages.evaluate.schema import PREDICTION_SCHEMA
from meddr_ray.stages.evaluate.stage import (
    EvalArtifactError,
    StudentEvaluator,
    _check,
    _prepare_output,
)
from meddr_ray.stages.parts import FAILED_SCHEMA, write_table


def _cfg(tmp_path, *overrides):
    return load_config("tiny", [f"run_dir={tmp_path / 'run'}", "evaluate.modes=[no_rag]", *overrides])


def _prediction(i: int, key: str = "k", dataset: str = "breastmnist", task: str = "diagnosis") -> dict:
    return {"id": f"id{i}", "mode": "no_rag", "dataset": dataset, "task": task, "run_key": key}


def _write(folder, rows, schema=PREDICTION_SCHEMA) -> str:
    return write_table(str(folder), pa.Table.from_pylist(rows, schema=schema))


def test_resume_reads_the_ids_to_skip(tmp_path):
    out = tmp_path / "eval"
    _write(out / "predictions", [_prediction(0), _prediction(1)])
    _write(out / "failed", [{"id": "id9", "error": "bad"}], FAILED_SCHEMA)
    done, failed = _prepare_output(_cfg(tmp_path, f"evaluate.output_dir={out}"), "k")
    assert sorted(done.to_pylist()) == ["id0", "id1"] and failed.to_pylist() == ["id9"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign"])
def test_a_damaged_or_foreign_prediction_file_is_an_error_naming_it_and_nothing_is_removed(tmp_path, damage):
    out = tmp_path / "eval"
    good = _write(out / "predictions", [_prediction(0), _prediction(1)])
    bad = out / "predictions" / "part-0bad.parquet"
    if damage == "foreign":  # e.g. a bootstrap part copied in: an id column, no run_key (read as null = "another run")
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": ["x"], "report": ["r"]}), buf)
        bad.write_bytes(buf.getvalue())
    else:
        data = open(good, "rb").read()
        bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(EvalArtifactError, match=f"{bad}: not a "):
        _prepare_output(_cfg(tmp_path, f"evaluate.output_dir={out}"), "k")
    assert open(good, "rb").read()  # the good file is still there: no restart was triggered by the bad one


def test_a_damaged_file_is_a_one_line_cli_error(tmp_path, capsys):
    out = tmp_path / "eval"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "part-0bad.parquet").write_bytes(b"PAR1 not really")
    code = cli.main(["evaluate", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "evaluate.modes=[no_rag]",
                     f"evaluate.output_dir={out}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "part-0bad.parquet: not a readable Parquet file" in err and len(err.splitlines()) == 1


def test_a_source_renamed_onto_another_task_is_found_before_answering(tmp_path):
    out = tmp_path / "eval"
    _write(out / "predictions", [_prediction(0, dataset="slake", task="diagnosis")])
    cfg = _cfg(tmp_path, "evaluate.sources.0.name=slake", "evaluate.sources.0.task=vqa", f"evaluate.output_dir={out}")
    with pytest.raises(ConfigError, match="holds diagnosis predictions of dataset 'slake'"):
        _prepare_output(cfg, "k")


def test_one_source_name_is_one_task(tmp_path):
    cfg = _cfg(tmp_path, "evaluate.modes=[no_rag,rag]")
    second = type(cfg.evaluate.sources[0])(**{**cfg.evaluate.sources[0].__dict__, "splits": ["val"], "task": "vqa"})
    cfg.evaluate.sources.append(second)
    with pytest.raises(ConfigError, match=r"evaluate.sources\[1\]'.*is a vqa source.*evaluate.sources\[0\]"):
        _check(cfg)


def test_a_batch_skips_what_was_written_or_set_aside_before():
    actor = StudentEvaluator.__new__(StudentEvaluator)  # the skip check alone: no model
    actor.done, actor.failed_before = frozenset({"a", "c"}), frozenset({"c", "d"})
    batch = pa.table({"id": ["a", "b", "c", "d", "e"], "x": [1, 2, 3, 4, 5]})
    todo, skipped, skipped_failed = actor._todo(batch)
    assert todo.column("id").to_pylist() == ["b", "e"] and (skipped, skipped_failed) == (2, 1)


def test_one_evaluation_at_a_time_per_output_folder(tmp_path, capsys):
    import fcntl

    from meddr_ray.stages.pipeline import LOCK_FILE

    out = tmp_path / "eval"
    out.mkdir()
    with open(out / LOCK_FILE, "a") as other:  # another `meddr-ray evaluate` writing the same folder
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = cli.main(["evaluate", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "evaluate.modes=[no_rag]",
                         f"evaluate.output_dir={out}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"{out} is in use by another meddr-ray" in err and not (out / "predictions").exists()


def test_a_damaged_adapter_meta_file_is_an_error_naming_it(tmp_path):
    from meddr_ray.stages.evaluate.stage import _adapter

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "meddr.json").write_text('{"base_model": ')
    with pytest.raises(EvalArtifactError, match=f"{adapter / 'meddr.json'}: not valid JSON"):
        _adapter(_cfg(tmp_path))


def test_a_dataset_the_index_does_not_hold_is_refused_before_any_model_loads():
    """rag.same_dataset: each test source retrieves from its own dataset's cases; one the index lacks is a config
    error naming the key, the source and what the index holds."""
    from meddr_ray.config import ConfigError, load_config
    from meddr_ray.stages.evaluate.stage import _check_scope

    manifest = {"version": "v0001", "path": "/runs/x/index/v0001", "summary": {"datasets": {"breastmnist": 624}}}
    cfg = load_config("tiny")
    _check_scope(cfg, manifest)  # breastmnist test queries, breastmnist cases
    cfg.evaluate.sources[0].name = "folder"
    with pytest.raises(ConfigError, match=r"'rag.same_dataset'.*'folder'.*holds \['breastmnist'\]"):
        _check_scope(cfg, manifest)
    cfg.rag.same_dataset = False
    _check_scope(cfg, manifest)  # the whole index
    cfg.rag.datasets = ["chestmnist"]
    with pytest.raises(ConfigError, match=r"'rag.datasets'.*\['chestmnist'\]"):
        _check_scope(cfg, manifest)
    with pytest.raises(ConfigError, match="does not list its datasets"):
        _check_scope(cfg, {"version": "v0001", "path": "/x", "summary": {}})
