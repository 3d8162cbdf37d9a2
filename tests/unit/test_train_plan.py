"""Training plan, DeepSpeed config, learning-rate schedule, data-position check and input errors (no Ray)."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddr_ray.config import TrainConfig, load_config
from meddr_ray.stages.train import run_train
from meddr_ray.stages.train.inputs import TrainDataError
from meddr_ray.stages.train.deepspeed_config import deepspeed_config
from meddr_ray.stages.train.plan import make_plan
from meddr_ray.stages.train.schedule import lr_multiplier
from meddr_ray.stages.train.state import DataPosition


def test_plan_reaches_the_global_batch_with_accumulation():
    t = TrainConfig(num_workers=2, micro_batch_size=4, global_batch_size=16, epochs=2, max_steps=None)
    plan = make_plan(t, train_rows=491)
    assert plan.accumulation == 2
    assert plan.rows_per_worker == 245  # the equal split drops the odd row
    assert plan.steps_per_epoch == 245 // 4 // 2 == 30
    assert plan.total_steps == 60 and plan.micro_per_epoch == 60
    assert make_plan(TrainConfig(num_workers=2, micro_batch_size=4, global_batch_size=16, max_steps=7), 491).total_steps == 7


def test_plan_refuses_impossible_batches():
    with pytest.raises(ValueError, match="not a multiple"):
        make_plan(TrainConfig(num_workers=2, micro_batch_size=4, global_batch_size=12), 100)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_plan(TrainConfig(num_workers=2, micro_batch_size=4, global_batch_size=16), 10)


def test_paper_preset_deepspeed_config():
    cfg = load_config("paper")
    plan = make_plan(cfg.train, train_rows=100_000)
    ds = deepspeed_config(cfg.train, plan)
    assert ds["train_batch_size"] == 128 == ds["train_micro_batch_size_per_gpu"] * 16 * ds["gradient_accumulation_steps"]
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 1e-5 and ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["gradient_clipping"] == 1.0
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_tiny_preset_deepspeed_config_is_fp32_and_can_offload():
    cfg = load_config("tiny", ["train.offload_optimizer=true", "train.param_persistence_threshold=0"])
    ds = deepspeed_config(cfg.train, make_plan(cfg.train, 500))
    assert "bf16" not in ds and "fp16" not in ds  # fp32 on CPU
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch AdamW on offloaded states: nothing to compile


def test_schedule_warms_up_then_decays():
    t = TrainConfig(warmup_ratio=0.1, lr_scheduler="cosine")
    f = lr_multiplier(t, total_steps=100)  # 10 warm-up steps
    assert f(0) == pytest.approx(0.1)  # the first step already moves
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(99) < 0.01 and all(f(i) >= f(i + 1) for i in range(10, 99))
    linear = lr_multiplier(TrainConfig(warmup_ratio=0.1, lr_scheduler="linear"), 100)
    assert linear(55) == pytest.approx(0.5)
    constant = lr_multiplier(TrainConfig(warmup_ratio=0.0, lr_scheduler="constant"), 100)
    assert constant(0) == constant(99) == 1.0


class _LocalReducer:
    def sum(self, values):
        return list(values)


def _ids(seed, n=3):
    return [[f"row-{seed}-{b}-{i}" for i in range(4)] for b in range(n)]


def test_data_position_verifies_the_skipped_batches():
    before = DataPosition(0)
    before.new_epoch(2)
    for ids in _ids(0):
        before.add(ids)
    saved = before.snapshot()
    again = DataPosition(0)
    again.new_epoch(2)
    for ids in _ids(0):
        again.add(ids)
    assert again.verify(saved, epoch=2, skipped=3, reducer=_LocalReducer()) == "verified"
    other = DataPosition(0)
    other.new_epoch(2)
    for ids in _ids(1):  # another order of the data
        other.add(ids)
    assert other.verify(saved, epoch=2, skipped=3, reducer=_LocalReducer()).startswith("mismatch")
    assert again.verify(saved, epoch=3, skipped=3, reducer=_LocalReducer()).startswith("mismatch")
    assert again.verify(None, epoch=2, skipped=3, reducer=_LocalReducer()).startswith("mismatch")


def test_missing_instruction_data_names_the_folder(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    with pytest.raises(TrainDataError, match=str(tmp_path / "instruct")):
        run_train(cfg)


def test_instruction_parquet_without_a_column_names_file_and_column(tmp_path):
    folder = tmp_path / "instruct"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"], "prompt": ["p"], "split": ["train"]}), folder / "part-0.parquet")
    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    with pytest.raises(TrainDataError, match=r"part-0.parquet.*\['answer'\]"):
        run_train(cfg)


def test_instruction_data_without_training_rows_is_refused(tmp_path):
    folder = tmp_path / "instruct"
    folder.mkdir()
    table = pa.table({"id": ["a"], "image": [b"x"], "prompt": ["p"], "answer": ["y"], "split": ["val"]})
    pq.write_table(table, folder / "part-0.parquet")
    with pytest.raises(TrainDataError, match="no rows with split == 'train'"):
        run_train(load_config("tiny", [f"run_dir={tmp_path}"]))


def test_a_run_checkpointed_by_other_worker_count_is_refused_before_starting(tmp_path):
    from meddr_ray.config import ConfigError

    folder = tmp_path / "instruct"
    folder.mkdir()
    n = 40
    table = pa.table(
        {"id": [str(i) for i in range(n)], "image": [b"x"] * n, "prompt": ["p"] * n, "answer": ["y"] * n,
         "split": ["train"] * n}
    )  # fmt: skip
    pq.write_table(table, folder / "part-0.parquet")
    checkpoint = tmp_path / "train" / "finetune" / "checkpoint_step0000005"
    checkpoint.mkdir(parents=True)
    from meddr_ray.stages.instruct import published_mix
    from meddr_ray.stages.train.resume import run_description, run_identity

    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    identity = run_identity(run_description(cfg, published_mix(str(folder))))  # the same run, other worker count
    (checkpoint / "state.json").write_text(json.dumps({"step": 5, "world_size": 1, "identity": identity}))
    with pytest.raises(ConfigError, match=r"checkpointed by 1 workers.*train.num_workers=1"):
        run_train(cfg)


def test_training_with_retrieved_labels_needs_the_runs_index_and_says_so(tmp_path):
    folder = tmp_path / "instruct"
    folder.mkdir()
    n = 40
    table = pa.table({"id": [str(i) for i in range(n)], "image": [b"x"] * n, "prompt": ["p"] * n,
                      "answer": ["y"] * n, "split": ["train"] * n})  # fmt: skip
    pq.write_table(table, folder / "part-0.parquet")
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "train.rag_context_fraction=0.5"])
    with pytest.raises(FileNotFoundError, match=r"train \(train.rag_context_fraction=0.5\): no retrieval index at "
                       + str(tmp_path / "index")):  # fmt: skip
        run_train(cfg)


def _plain_mix(folder, rows=40, split="train"):
    folder.mkdir(exist_ok=True)
    table = pa.table({"id": [str(i) for i in range(rows)], "image": [b"x"] * rows, "prompt": ["p"] * rows,
                      "answer": ["y"] * rows, "split": [split] * rows})  # fmt: skip
    pq.write_table(table, folder / "part-0.parquet")


def test_run_identity_changes_with_the_student_data_and_settings_not_with_operational_keys(tmp_path):
    """A run's checkpoints are only resumed by a run of the same student, data and settings."""
    from meddr_ray.stages.instruct import published_mix
    from meddr_ray.stages.train.resume import run_description, run_identity

    _plain_mix(tmp_path / "mix")

    def identity(*overrides):
        return run_identity(run_description(load_config("tiny", list(overrides)), published_mix(str(tmp_path / "mix"))))

    same = identity()
    assert identity("train.keep_checkpoints=5", "train.max_steps=99", "train.restart=true") == same
    assert identity("train.learning_rate=0.5") != same
    assert identity("student.build_options.vision_tower=efficientnet_lite0") != same
    _plain_mix(tmp_path / "mix", rows=41)  # another instruction mix
    assert identity() != same


def _checkpoint(tmp_path, cfg, **state):
    from meddr_ray.stages.instruct import published_mix
    from meddr_ray.stages.train.resume import run_description, run_identity

    description = run_description(cfg, published_mix(str(tmp_path / "instruct")))
    folder = tmp_path / "train" / cfg.train.name / "checkpoint_step0000005"
    folder.mkdir(parents=True)
    full = {"step": 5, "world_size": 2, "identity": run_identity(description), "description": description, **state}
    (folder / "state.json").write_text(json.dumps(full))
    return folder


class _ReachedRay(Exception):
    pass


def _no_ray(monkeypatch):
    def refuse(cfg):
        raise _ReachedRay("the run went on to start Ray")

    monkeypatch.setattr("meddr_ray.stages.runtime.init_ray", refuse)


def test_a_resume_on_changed_instruction_data_is_refused_naming_what_changed(tmp_path, monkeypatch):
    from meddr_ray.config import ConfigError

    _no_ray(monkeypatch)
    _plain_mix(tmp_path / "instruct", rows=40)
    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    checkpoint = _checkpoint(tmp_path, cfg)
    _plain_mix(tmp_path / "instruct", rows=48)  # the mix was rebuilt with more rows since
    with pytest.raises(ConfigError) as err:
        run_train(cfg)
    message = str(err.value)
    assert "train.restart" in message and str(tmp_path / "train" / "finetune") in message
    assert "files changed in size: part-0.parquet" in message and "fingerprint" in message
    assert checkpoint.is_dir()  # nothing moved or deleted

    # other settings: named too
    with pytest.raises(ConfigError, match=r"train.learning_rate: 0.002 -> 0.5"):
        run_train(load_config("tiny", [f"run_dir={tmp_path}", "train.learning_rate=0.5"]))


def test_the_same_run_resumes_and_restart_moves_the_checkpoints_aside(tmp_path, monkeypatch, capsys):
    _no_ray(monkeypatch)
    _plain_mix(tmp_path / "instruct")
    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    checkpoint = _checkpoint(tmp_path, cfg)
    with pytest.raises(_ReachedRay):  # the same data and settings: on to Ray, resuming
        run_train(cfg)
    assert checkpoint.is_dir()
    _plain_mix(tmp_path / "instruct", rows=48)
    with pytest.raises(_ReachedRay):  # told to start over: the checkpoints move aside, the run goes on
        run_train(load_config("tiny", [f"run_dir={tmp_path}", "train.restart=true"]))
    assert not checkpoint.exists()
    (aside,) = (tmp_path / "train").glob("finetune.replaced-*")
    assert (aside / "checkpoint_step0000005" / "state.json").is_file()  # kept, not deleted
    assert "starts from step 0" in capsys.readouterr().out


def test_the_metrics_window_averages_over_micro_batches_and_steps():
    from meddr_ray.stages.train.state import MetricsWindow

    window = MetricsWindow()
    for loss in (2.0, 4.0):
        window.add(loss, tokens=10.0, samples=2)
    window.steps, window.seconds = 1, 2.0
    metrics = window.metrics(_LocalReducer())
    assert metrics == {"loss": 3.0, "tokens_per_s": 10.0, "samples_per_s": 2.0, "step_time_s": 2.0,
                       "steps_in_window": 1}  # fmt: skip


def test_a_checkpoint_without_a_data_position_reads_as_none(tmp_path):
    from meddr_ray.stages.train.checkpoint import read_position, read_state

    (tmp_path / "state.json").write_text(json.dumps({"step": 3}))
    assert read_state(str(tmp_path)) == {"step": 3}
    assert read_position(str(tmp_path), rank=0) is None  # written by an earlier release: the epoch restarts


def test_the_summary_names_the_losses_the_resumes_and_each_ranks_memory():
    from meddr_ray.stages.train.plan import TrainPlan
    from meddr_ray.stages.train.stage import _final_metrics, _summary_text

    history = [{"step": 0, "epoch": 0, "val_loss": 6.0},
               {"step": 5, "epoch": 0, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 100.0, "val_loss": 1.0}]  # fmt: skip
    final = _final_metrics(history)
    assert final == {"step": 5, "epoch": 0, "loss": 1.5, "lr": 1e-3, "tokens_per_s_mean": 100.0, "val_loss": 1.0,
                     "val_loss_first": 6.0}  # fmt: skip
    state = {"step": 5, "epoch": 1, "history": history,
             "events": [{"start_step": 0, "resumed": False}, {"start_step": 4, "resumed": True,
                                                             "data_position": "verified"}],
             "workers": [{"rank": 0, "peak_rss_mb": 900.0, "param_mb": 1.5, "optimizer_mb": 0.25}]}  # fmt: skip
    text = _summary_text(state, TrainPlan(2, 4, 2, 40, 5, 5), final, "/run/adapter", 12.0)
    assert text.splitlines() == [
        "train: done: step 5/5, epoch 1, 12 s",
        "  loss 1.5000, val_loss 6.0000 -> 1.0000",
        "  resumed 1 time(s) (from step 4, data position verified)",
        "  adapter: /run/adapter",
        "  rank 0: peak RSS 900 MB, parameters 1.50 MB, optimizer state 0.25 MB",
    ]
