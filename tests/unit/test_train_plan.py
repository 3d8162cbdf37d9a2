"""Training plan, DeepSpeed config, learning-rate schedule, data-position check and input errors (no Ray)."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from meddr_ray.config import TrainConfig, load_config
from meddr_ray.train import TrainDataError, run_train
from meddr_ray.train_loop import _DataPosition, deepspeed_config, lr_multiplier, make_plan


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


def _batches(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, 100, (4, 10), generator=g), "pixel_values": torch.rand(4, 3, 8, 8, generator=g)}
        for _ in range(n)
    ]


def test_data_position_verifies_the_skipped_batches():
    before = _DataPosition(0)
    before.new_epoch(2)
    for b in _batches(0):
        before.add(b)
    saved = before.snapshot({})
    again = _DataPosition(0)
    again.new_epoch(2)
    for b in _batches(0):
        again.add(b)
    assert again.verify(saved, epoch=2, skipped=3, reducer=_LocalReducer()) == "verified"
    other = _DataPosition(0)
    other.new_epoch(2)
    for b in _batches(1):  # another order of the data
        other.add(b)
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
    from meddr_ray.train import run_identity

    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    identity = run_identity(cfg, [str(folder / "part-0.parquet")])  # the same run, with another worker count
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


def test_run_identity_changes_with_the_student_data_and_settings_not_with_operational_keys(tmp_path):
    """A run's checkpoints are only resumed by a run of the same student, data and settings."""
    from meddr_ray.train import run_identity

    data = tmp_path / "part-0.parquet"
    data.write_bytes(b"x" * 100)
    base = load_config("tiny")
    same = run_identity(base, [str(data)])
    assert run_identity(load_config("tiny", ["train.keep_checkpoints=5", "train.max_steps=99"]), [str(data)]) == same
    assert run_identity(load_config("tiny", ["train.learning_rate=0.5"]), [str(data)]) != same
    assert run_identity(load_config("tiny", ["student.build_options.vision_tower=efficientnet_lite0"]),
                        [str(data)]) != same  # fmt: skip
    data.write_bytes(b"x" * 101)  # another instruction mix
    assert run_identity(base, [str(data)]) != same


def test_checkpoints_of_another_run_are_moved_aside_not_resumed(tmp_path, capsys):
    from meddr_ray.train import _set_aside_other_run

    experiment = tmp_path / "meddr-lora"
    (experiment / "checkpoint_step0000010").mkdir(parents=True)
    _set_aside_other_run(str(experiment), {"identity": "aaaa"}, "aaaa")  # the same run: resumed
    assert experiment.exists()
    _set_aside_other_run(str(experiment), {"identity": "aaaa"}, "bbbb")
    assert not experiment.exists()
    (aside,) = tmp_path.glob("meddr-lora.replaced-*")
    assert (aside / "checkpoint_step0000010").is_dir()  # kept, not deleted
    assert "starts from step 0" in capsys.readouterr().out
