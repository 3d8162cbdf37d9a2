"""Instruction tuning on one Ray Train worker, as a recipe: :meth:`~InstructionTuningRecipe.setup` (engine,
collator, data shards), :meth:`~InstructionTuningRecipe.restore` (from the latest checkpoint, if any),
:meth:`~InstructionTuningRecipe.train` (epochs of :meth:`~InstructionTuningRecipe.batches` and
:meth:`~InstructionTuningRecipe.step`), with :meth:`~InstructionTuningRecipe.report` and
:meth:`~InstructionTuningRecipe.checkpoint` along the way.

Each worker loads the student, wraps it with LoRA, hands it to ``deepspeed.initialize`` (ZeRO-3 partitions the
parameters, gradients and optimizer states over the workers) and trains on its shard of the instruction data
through ``iter_torch_batches`` with :class:`~meddr_ray.model.collate.InstructionCollator`.

Checkpoints (every ``train.checkpoint_every`` optimizer steps and at the end; contents:
:mod:`meddr_ray.stages.train.checkpoint`) let a restarted or re-run job continue from there: same step, same
learning rate, and the batches of the current epoch it already trained on are skipped (each epoch's order is
deterministic: ``preserve_order`` ingest plus a local shuffle seeded by seed, epoch and rank).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Dict, Optional

from meddr_ray.config import Config
from meddr_ray.progress import report
from meddr_ray.stages.train.batches import epoch_batches
from meddr_ray.stages.train.checkpoint import (DEEPSPEED_SUBDIR, checkpoint_dir_name, read_position, read_state,
                                               step_tag, write_checkpoint)  # fmt: skip
from meddr_ray.stages.train.engine import build_engine, reapply_schedule
from meddr_ray.stages.train.gauges import TrainGauges
from meddr_ray.stages.train.plan import TrainPlan
from meddr_ray.stages.train.schedule import lr_multiplier
from meddr_ray.stages.train.state import DataPosition, MetricsWindow, Reducer
from meddr_ray.stages.train.worker_info import gather_worker_memory, write_worker_info


class InstructionTuningRecipe:
    """One worker's part of a training run. ``loop_config`` (built by :mod:`meddr_ray.stages.train.stage`):
    ``cfg`` (Config), ``plan`` (:class:`TrainPlan` as a dict), ``model_path``, ``identity`` and ``description``
    (what the run computes from, recorded in its checkpoints), ``status_dir`` (optional local folder for worker
    info), ``has_val`` (a validation split exists)."""

    def __init__(self, loop_config: Dict[str, Any]):
        self.cfg: Config = loop_config["cfg"]
        self.t = self.cfg.train
        self.plan = TrainPlan(**loop_config["plan"])
        self.model_path: str = loop_config["model_path"]
        self.identity = loop_config.get("identity")
        self.description = loop_config.get("description")
        self.status_dir: Optional[str] = loop_config.get("status_dir")
        self.has_val = bool(loop_config.get("has_val"))
        self.state: Dict[str, Any] = {}  # the loop state saved in every checkpoint (restore() fills it)
        self.event: Dict[str, Any] = {}  # this start of the run, one of state["events"]
        self.saved_position: Optional[Dict[str, Any]] = None  # this rank's data position in the checkpoint
        self.window = MetricsWindow()  # what happened since the last report: averaged into the next one

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """The DeepSpeed engine, the collator and this rank's data shards."""
        import ray.train

        t, plan = self.t, self.plan
        ctx = ray.train.get_context()
        self.rank, world = ctx.get_world_rank(), ctx.get_world_size()
        if world != plan.world_size:
            raise RuntimeError(f"planned for {plan.world_size} workers, running on {world}")
        if not t.use_gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: no CUDA probing on CPU workers

        import deepspeed
        import torch

        from meddr_ray.model.collate import InstructionCollator
        from meddr_ray.model.internvl import load_processor

        self.device = torch.device("cuda", torch.cuda.current_device()) if t.use_gpu else torch.device("cpu")
        # Ray Train already set up torch.distributed (gloo/nccl); DeepSpeed's comm layer adopts that process group.
        # It must be up before the DeepSpeed config is parsed, which reads the world size from it.
        deepspeed.init_distributed(dist_backend="nccl" if t.use_gpu else "gloo")
        self.schedule = lr_multiplier(t, plan.total_steps)
        self.engine, (trainable, total, share) = build_engine(self.cfg, plan, self.model_path, self.schedule)
        if self.rank == 0:
            report("train", f"trainable parameters: {trainable:,} of {total:,} ({share:.3f} %; the paper's 40B "
                            "InternVL with its LoRA: 0.4 %)")  # fmt: skip
        processor = load_processor(self.model_path, self.cfg.student.trust_remote_code)  # InternVL: image-only
        self.collate = InstructionCollator(
            processor, t.max_length, max_image_bytes=self.cfg.data.max_image_bytes,
            max_image_pixels=self.cfg.data.max_image_pixels,
        )  # fmt: skip
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val") if self.has_val else None
        self.reducer = Reducer()
        self.gauges = TrainGauges(t.name) if self.rank == 0 else None
        self.position = DataPosition(self.rank)

    # ---------------------------------------------------------------------------------------------- restore

    def restore(self) -> None:
        """The loop state: fresh, or from Ray Train's latest checkpoint (engine state loaded); records this
        start in the run's events and in ``<experiment>/workers/rank-<r>.json``."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "world_size": self.plan.world_size,
                      "history": [], "events": []}  # fmt: skip
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                self._load_checkpoint(folder, checkpoint.path)
            reapply_schedule(self.engine, self.t, self.schedule)
        self.state["identity"] = self.identity  # what the run computes from (stages.train.resume.run_identity)
        self.state["description"] = self.description  # its parts, to name what changed on a refused resume
        self.event = {"start_step": self.state["step"], "resumed": checkpoint is not None, "time": time.time()}
        self.state["events"].append(self.event)
        write_worker_info(self.status_dir, self.rank, {"attempt": len(self.state["events"]), **self.event})
        if self.rank == 0:
            plan = self.plan
            how = f"resuming at step {self.state['step']} (epoch {self.state['epoch']})" if checkpoint else "starting"
            report("train", f"{how}; {plan.total_steps} steps, {plan.steps_per_epoch} per epoch, {plan.world_size} "
                            f"workers x {plan.micro_batch_size} micro x {plan.accumulation} accumulation = "
                            f"{self.t.global_batch_size} per step")  # fmt: skip

    def _load_checkpoint(self, folder: str, where: str) -> None:
        state = read_state(folder)
        world = self.plan.world_size
        if state.get("world_size", world) != world:
            raise RuntimeError(
                f"checkpoint {where} was written by {state['world_size']} workers and ZeRO partitions cannot be "
                f"loaded by {world}: use train.num_workers={state['world_size']}, or a new train.name to start a "
                "new run"
            )
        load_path, _ = self.engine.load_checkpoint(os.path.join(folder, DEEPSPEED_SUBDIR), tag=state["tag"])
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no engine state for rank {self.rank} in checkpoint {where}")
        self.state = state
        self.saved_position = read_position(folder, self.rank)

    # ------------------------------------------------------------------------------------------------ train

    def train(self) -> None:
        """The baseline validation loss (a fresh run), then epochs until the plan's last step."""
        if not self.event["resumed"] and self.t.eval_at_start and self.val_shard is not None:
            val = self.evaluate()
            self.report({"step": 0, "epoch": 0, "val_loss": val}, with_checkpoint=False)
            if self.rank == 0:
                report("train", f"step 0: val_loss {val:.4f}")
        self.engine.train()
        while self.state["step"] < self.plan.total_steps:
            self._train_epoch()

    def _train_epoch(self) -> None:
        """The rest of the current epoch (from where a checkpoint left it), or until the last step."""
        plan = self.plan
        epoch, skip = self.state["epoch"], self.state["batch_in_epoch"]
        consumed = skip  # the micro-batches a checkpoint already trained on are passed over, not decoded
        micro = 0
        step_start = time.perf_counter()
        for ids, batch in self.batches(epoch, skip):
            if consumed >= plan.micro_per_epoch or self.state["step"] >= plan.total_steps:
                return
            self.position.add(ids)
            lr = self.step(batch)
            consumed += 1
            micro += 1
            if micro < plan.accumulation:
                continue
            micro = 0
            epoch_done = self._optimizer_step_done(epoch, consumed, lr, time.perf_counter() - step_start)
            step_start = time.perf_counter()
            if epoch_done:
                return
        # the shard ran out before the planned batches: the split gave this worker fewer rows than planned
        if consumed < plan.micro_per_epoch and self.state["step"] < plan.total_steps:
            raise RuntimeError(
                f"rank {self.rank}: epoch {epoch} ended after {consumed} micro-batches, planned {plan.micro_per_epoch}"
            )

    def batches(self, epoch: int, skip: int):
        """This rank's micro-batches of ``epoch`` after the first ``skip``; on a resume, checks (and records in
        the run's events) that the skipped ones are those the checkpoint had trained on."""
        self.position.new_epoch(epoch)
        batches = epoch_batches(self.train_shard, self.t, epoch, self.rank, skip, self.collate, self.position)
        if skip:
            self.event["data_position"] = self.position.verify(self.saved_position, epoch, skip, self.reducer)
            self.event["skipped_batches"] = skip
        return batches

    def step(self, batch: Dict[str, Any]) -> float:
        """Forward and backward on one micro-batch; returns the learning rate it trained with. DeepSpeed steps
        the optimizer (and the schedule) only at accumulation boundaries."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        lr = self.engine.get_lr()[0]
        out = self.engine(**batch)
        self.engine.backward(out.loss)
        self.engine.step()
        self.window.add(float(out.loss.detach()), float(batch["attention_mask"].sum()), batch["input_ids"].shape[0])
        return lr

    def _optimizer_step_done(self, epoch: int, consumed: int, lr: float, seconds: float) -> bool:
        """Bookkeeping after an optimizer step: metrics, validation, checkpoint. Returns whether the epoch ended."""
        state, t, plan = self.state, self.t, self.plan
        state["step"] += 1
        state["batch_in_epoch"] = consumed
        step = state["step"]
        self.window.steps += 1
        self.window.seconds += seconds
        epoch_done = consumed >= plan.micro_per_epoch
        last = step >= plan.total_steps
        save = last or step % t.checkpoint_every == 0
        if last:  # per-worker memory, recorded with the final checkpoint (meddr.json "workers")
            state["workers"] = gather_worker_memory(self.engine, self.rank)
        if not (save or epoch_done or step % t.log_every == 0):
            return epoch_done
        metrics = {"step": step, "epoch": epoch, "lr": lr, **self.window.metrics(self.reducer)}
        self.window = MetricsWindow()
        if (epoch_done or last) and self.val_shard is not None:
            metrics["val_loss"] = self.evaluate()
        if epoch_done:
            state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        self.report(metrics, with_checkpoint=save)
        if self.rank == 0:
            val = f" val_loss {metrics['val_loss']:.4f}" if metrics.get("val_loss") is not None else ""
            report("train", f"step {step}/{plan.total_steps} epoch {epoch} loss {metrics['loss']:.4f} lr {lr:.2e} "
                            f"{metrics['tokens_per_s']:.0f} tok/s {metrics['step_time_s']:.2f} s/step{val}")  # fmt: skip
        return epoch_done

    def evaluate(self) -> Optional[float]:
        """Token-weighted mean loss over the whole validation split (every worker's shard), or None if empty."""
        import torch

        from meddr_ray.model.collate import IGNORE_INDEX

        if self.val_shard is None:
            return None
        self.engine.eval()
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for batch in self.val_shard.iter_batches(batch_size=self.t.micro_batch_size, batch_format="numpy"):
                batch = {k: v.to(self.device) for k, v in self.collate(batch).items()}
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                out = self.engine(**batch)
                loss_sum += float(out.loss) * n
                tokens += n
        self.engine.train()
        total_loss, total_tokens = self.reducer.sum([loss_sum, float(tokens)])
        return total_loss / total_tokens if total_tokens else None

    # ------------------------------------------------------------------------------------ report, checkpoint

    def report(self, metrics: Dict[str, Any], with_checkpoint: bool) -> None:
        """Hand ``metrics`` to Ray Train (rank 0 also keeps them in the history and sets the gauges), with a
        checkpoint when asked."""
        if self.rank == 0:
            self.state["history"].append(metrics)
            self.gauges.window(metrics)
        if with_checkpoint:
            self.checkpoint(metrics)
        else:
            import ray.train

            ray.train.report(metrics)

    def checkpoint(self, metrics: Dict[str, Any]) -> None:
        """Every rank writes its part into a local folder; ``ray.train.report`` returns once Ray Train has
        persisted the merged checkpoint on the run's storage."""
        import ray.train

        tag = self.state["tag"] = step_tag(self.state["step"])
        with tempfile.TemporaryDirectory(prefix=f"meddr-ckpt-r{self.rank}-") as tmp:
            write_checkpoint(tmp, self.engine, self.rank, self.state, self.position.snapshot())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(tag))  # fmt: skip
        if self.rank == 0:
            self.gauges.checkpoint(self.state["step"])
