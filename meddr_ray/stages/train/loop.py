"""The per-worker loop of instruction tuning: runs inside each Ray Train worker (see :mod:`meddr_ray.stages.train.stage`).

Each worker loads the student, wraps it with LoRA, hands it to ``deepspeed.initialize`` (ZeRO-3 partitions the
parameters, gradients and optimizer states over the workers) and trains on its shard of the instruction data
through ``iter_torch_batches`` with :class:`~meddr_ray.model.collate.InstructionCollator`.

Checkpoints (every ``train.checkpoint_every`` optimizer steps and at the end) hold:
- ``deepspeed/``: the DeepSpeed engine state of every rank (each rank saves its own partition into its own
  temporary folder; Ray Train merges the ranks' folders into one checkpoint folder on the run's storage);
- ``adapter/``: the LoRA adapter in PEFT format, gathered on rank 0 with ``deepspeed.zero.GatheredParameters``;
- ``state.json`` (rank 0): step, epoch, micro-batches consumed in that epoch, the metrics history and the
  start/resume events. A restarted or re-run job continues from there: same step, same learning rate, and the
  batches of the current epoch it already trained on are skipped (each epoch's order is deterministic:
  ``preserve_order`` ingest plus a local shuffle seeded by seed, epoch and rank).

``deepspeed`` is imported only here, inside the loop, and after ``DS_ACCELERATOR=cpu`` is set on CPU workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from meddr_ray.config import Config, TrainConfig

STATE_FILE = "state.json"
POSITION_DIR = "data_position"
ADAPTER_SUBDIR = "adapter"
DEEPSPEED_SUBDIR = "deepspeed"


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """How many batches and steps one run takes; computed by the driver from the row counts."""

    world_size: int
    micro_batch_size: int
    accumulation: int
    rows_per_worker: int
    steps_per_epoch: int
    total_steps: int

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation


def make_plan(t: TrainConfig, train_rows: int) -> Plan:
    """Gradient accumulation that reaches ``global_batch_size`` and the step counts it implies.

    Ray Data splits the training rows equally over the workers (the remainder is dropped); each epoch trains on
    whole accumulation cycles only, so every rank takes the same number of optimizer steps.
    """
    world = t.num_workers
    per_pass = t.micro_batch_size * world
    if t.global_batch_size % per_pass:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x num_workers "
            f"= {per_pass}"
        )
    accumulation = t.global_batch_size // per_pass
    rows_per_worker = train_rows // world
    steps_per_epoch = rows_per_worker // t.micro_batch_size // accumulation
    if steps_per_epoch == 0:
        raise ValueError(
            f"{train_rows} training rows are fewer than one global batch of {t.global_batch_size} "
            f"({world} workers x {t.micro_batch_size} x {accumulation} accumulation): lower train.global_batch_size "
            "or add data"
        )
    total = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
    return Plan(world, t.micro_batch_size, accumulation, rows_per_worker, steps_per_epoch, int(total))


def lr_multiplier(t: TrainConfig, total_steps: int):
    """The schedule as a function of the optimizer steps already taken (0 for the first step) -> factor of the
    peak learning rate: linear warm-up over ``warmup_ratio`` of the steps (the first step already moves), then
    cosine or linear decay towards 0, or constant."""
    warmup = math.ceil(t.warmup_ratio * total_steps) if t.warmup_ratio > 0 else 0
    kind = t.lr_scheduler

    def factor(done: int) -> float:
        if done < warmup:
            return (done + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (done - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return factor


def deepspeed_config(t: TrainConfig, plan: Plan) -> Dict[str, Any]:
    """The DeepSpeed config of ``train``: ZeRO stage, precision, accumulation, clipping, torch AdamW.

    The learning-rate schedule is a torch ``LambdaLR`` (:func:`lr_multiplier`) handed to
    ``deepspeed.initialize``, which steps it at accumulation boundaries and keeps its state in checkpoints.
    """
    zero: Dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(
            {
                # parameters smaller than this stay whole on every rank (fewer all-gathers); 0 partitions all
                "stage3_param_persistence_threshold": t.param_persistence_threshold,
                "stage3_gather_16bit_weights_on_model_save": False,  # the adapter is gathered by hand, on rank 0
            }
        )
    if t.zero_stage > 0:
        # The fusion buckets default to 5e8 elements (2 GB in fp32) each; size them to the model instead.
        zero.update({"reduce_bucket_size": t.bucket_size, "allgather_bucket_size": t.bucket_size})
        if t.zero_stage == 3:
            zero.update({"stage3_prefetch_bucket_size": t.bucket_size})
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    config: Dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": t.gradient_clipping,
        "zero_optimization": zero,
        # torch's AdamW: DeepSpeed's fused/CPU Adam would compile a C++/CUDA op on first use
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.learning_rate, "weight_decay": t.weight_decay, "betas": [0.9, 0.999], "torch_adam": True},
        },
        # with offload, DeepSpeed insists on its own CPU Adam unless told that torch's is fine
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # progress goes through ray.train.report, not DeepSpeed's logger
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return config


# ------------------------------------------------------------------------------------------------ helpers


def _say(message: str) -> None:
    """One progress line on the worker's stdout (Ray Train V2 patches ``print`` into a logger, which echoes
    each line twice once DeepSpeed has configured logging)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _numel(param) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it (then ``numel()`` is 0)."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


def count_parameters(model) -> Dict[str, float]:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return {"trainable": trainable, "total": total, "share_pct": 100.0 * trainable / max(total, 1)}


def _write_worker_info(status_dir: Optional[str], rank: int, attempt: Dict[str, Any]) -> None:
    """``<experiment>/workers/rank-<r>.json``: which process is which rank (operators, and the kill test)."""
    if not status_dir:
        return
    os.makedirs(status_dir, exist_ok=True)
    info = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), **attempt}
    tmp = os.path.join(status_dir, f".rank-{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(status_dir, f"rank-{rank}.json"))


def save_adapter(engine, rank: int, folder: str) -> None:
    """Gather the trainable (LoRA, and any unfrozen) parameters and write a PEFT adapter from rank 0.

    ``GatheredParameters`` is a collective: every rank enters it, rank 0 reads the full tensors inside.
    """
    import deepspeed

    model = engine.module
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    state = None
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
        if rank == 0:
            # full-model key names, as peft's save_pretrained expects; it keeps the LoRA and modules_to_save ones
            state = {name: p.detach().cpu().clone() for name, p in trainable}
    if rank == 0:
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)


def worker_memory(engine) -> Dict[str, float]:
    """This rank's memory: peak resident set, and the bytes of model parameters and optimizer state it holds.

    Under ZeRO-3 a partitioned parameter holds only its shard (``ds_tensor``) outside forward/backward; the
    optimizer state is the Adam moments plus any fp32 master copies that are not the model's own tensors.
    """
    import resource

    import torch

    params = 0
    for p in engine.module.parameters():
        params += p.data.numel() * p.data.element_size()
        shard = getattr(p, "ds_tensor", None)
        if shard is not None:
            params += shard.numel() * shard.element_size()
    basic = engine.basic_optimizer or engine.optimizer
    own = {p.data.data_ptr() for p in engine.module.parameters() if p.data.numel()}
    own |= {p.ds_tensor.data_ptr() for p in engine.module.parameters() if getattr(p, "ds_tensor", None) is not None}
    optim = 0
    for group in basic.param_groups:
        for t in group["params"]:
            if t.data_ptr() not in own:  # a master copy the optimizer keeps besides the model's tensor
                optim += t.numel() * t.element_size()
    for st in basic.state.values():
        optim += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "param_mb": params / 2**20,
        "optimizer_mb": optim / 2**20,
    }


def gather_worker_memory(engine, rank: int) -> List[Dict[str, float]]:
    """:func:`worker_memory` of every rank, in rank order (a collective)."""
    import torch.distributed as dist

    mine = {"rank": rank, **worker_memory(engine)}
    if not dist.is_initialized():
        return [mine]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


class _Reducer:
    """Sums small vectors over the workers (loss, token counts); one all-reduce per call."""

    def __init__(self):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.device = "cpu"

    def sum(self, values: List[float]) -> List[float]:
        t = self.torch.tensor(values, dtype=self.torch.float64, device=self.device)
        if self.dist.is_initialized():
            self.dist.all_reduce(t)
        return t.tolist()


class _DataPosition:
    """Fingerprint of the rows a rank has consumed in the current epoch: a hash of their ids, in order.

    Saved with every checkpoint; a resumed run passes over the same number of micro-batches (their ids only, no
    image decoded: :func:`epoch_batches`) and compares the fingerprint of what it passed over, so it knows (and
    records in the run's events) that it continues exactly where the checkpoint left off rather than trusting
    that the data order repeated. (The driver has already refused a resume on other data: this checks the order.)
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.epoch = 0
        self._hash = hashlib.sha1()
        self.consumed = 0

    def new_epoch(self, epoch: int) -> None:
        self.epoch, self._hash, self.consumed = epoch, hashlib.sha1(), 0

    def add(self, ids) -> None:
        """One micro-batch consumed: its row ids, in order."""
        self._hash.update("\x1f".join(str(i) for i in ids).encode() + b"\x1e")
        self.consumed += 1

    def snapshot(self, state: Dict[str, Any]) -> Dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "digest": self._hash.hexdigest()}

    def verify(self, saved: Optional[Dict[str, Any]], epoch: int, skipped: int, reducer: "_Reducer") -> str:
        """``verified`` when every rank skipped exactly the batches its checkpoint had consumed (collective)."""
        ok = (
            saved is not None
            and saved.get("epoch") == epoch
            and saved.get("consumed") == skipped
            and saved.get("digest") == self._hash.hexdigest()
        )
        bad = int(reducer.sum([0.0 if ok else 1.0])[0])
        if bad:
            _say(
                f"[train] warning: rank {self.rank} skipped {skipped} batches of epoch {epoch} that differ from the "
                "ones its checkpoint consumed (the data order is not reproducible)"
                if not ok
                else f"[train] warning: {bad} rank(s) resumed at a different data position"
            )
        return "verified" if not bad else f"mismatch on {bad} rank(s)"


def epoch_batches(shard, t: TrainConfig, epoch: int, rank: int, skip: int, collate, position: _DataPosition):
    """This rank's micro-batches of ``epoch`` as ``(ids, collated batch)``, from micro-batch ``skip`` on.

    The rows come from Ray Data as plain arrays (image bytes undecoded); the first ``skip`` micro-batches, which
    a checkpoint already trained on, are passed over by their ids alone (hashed into ``position``): no image is
    decoded and nothing collated to seek the position. The order is deterministic (``preserve_order`` ingest, a
    local shuffle seeded by seed, epoch and rank), so the position is a count of micro-batches. The others are
    collated one batch ahead in a background thread, while the current one trains.
    """
    rows = iter(
        shard.iter_batches(
            batch_size=t.micro_batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=t.shuffle_buffer_size or None,
            local_shuffle_seed=(t.seed * 1_000_003 + epoch * 7919 + rank) if t.shuffle_buffer_size else None,
        )
    )
    for _ in range(skip):  # now, not on the first next(): the caller checks the position before training
        batch = next(rows, None)
        if batch is None:
            return iter(())
        position.add(batch["id"])
    return _collated_ahead(rows, collate)


def _collated_ahead(rows, collate):
    """``(ids, collate(batch))`` for each batch of ``rows``, the next one collated in a thread meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate") as pool:
        batch = next(rows, None)
        pending = pool.submit(collate, batch) if batch is not None else None
        while pending is not None:
            ids = batch["id"]
            batch = next(rows, None)
            ready = pending.result()
            pending = pool.submit(collate, batch) if batch is not None else None
            yield ids, ready


class _Window:
    """Training metrics accumulated between two reports (every ``log_every`` steps)."""

    def __init__(self):
        self.loss = self.micro = self.tokens = self.samples = 0.0
        self.steps = 0
        self.seconds = 0.0

    def add(self, loss: float, tokens: float, samples: int) -> None:
        self.loss += loss
        self.micro += 1
        self.tokens += tokens
        self.samples += samples

    def metrics(self, reducer: "_Reducer") -> Dict[str, float]:
        """Means over the window and over all workers (one all-reduce)."""
        loss, micro, tokens, samples = reducer.sum([self.loss, self.micro, self.tokens, self.samples])
        seconds = max(self.seconds, 1e-9)
        return {
            "loss": loss / max(micro, 1),
            "tokens_per_s": tokens / seconds,
            "samples_per_s": samples / seconds,
            "step_time_s": seconds / max(self.steps, 1),
            "steps_in_window": self.steps,
        }


def evaluate(engine, shard, collate, micro_batch_size: int, reducer: _Reducer, device) -> Optional[float]:
    """Token-weighted mean loss over the whole validation split (every worker's shard), or None if empty."""
    import torch

    from meddr_ray.model.collate import IGNORE_INDEX

    if shard is None:
        return None
    engine.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy"):
            batch = {k: v.to(device) for k, v in collate(batch).items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            out = engine(**batch)
            loss_sum += float(out.loss) * n
            tokens += n
    engine.train()
    total_loss, total_tokens = reducer.sum([loss_sum, float(tokens)])
    return total_loss / total_tokens if total_tokens else None


def _build_engine(cfg: Config, plan: Plan, model_path: str, schedule):
    """The student with LoRA inside a DeepSpeed engine; returns ``(engine, parameter counts)``."""
    import deepspeed
    import torch

    from meddr_ray.model import apply_lora
    from meddr_ray.model.loading import _load_weights

    t = cfg.train
    ds_config = deepspeed_config(t, plan)
    # ZeRO-3: while this object lives, from_pretrained builds the model inside deepspeed.zero.Init, so each rank
    # only ever holds its shard of the base weights (a 40B model never sits whole in every worker's memory).
    hf_ds_config = None
    if t.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(t.seed)  # same adapter initialisation on every rank
    # the library's loader: AutoModelForImageTextToText, or AutoModel for remote-code InternVL-Chat checkpoints
    model = _load_weights(model_path, getattr(torch, cfg.student.dtype), cfg.student.trust_remote_code)
    model.config.use_cache = False
    model = apply_lora(model, t.lora)  # LoRA tensors are created whole; deepspeed.initialize partitions them
    counts = count_parameters(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    del hf_ds_config  # later from_pretrained calls (the processor, other code) must not see ZeRO-3
    return engine, counts


def _restore(engine, checkpoint, t: TrainConfig, plan: Plan, schedule, rank: int):
    """Loop state and this rank's saved data position: fresh, or from ``checkpoint`` (engine state loaded)."""
    state: Dict[str, Any] = {
        "step": 0, "epoch": 0, "batch_in_epoch": 0, "world_size": plan.world_size, "history": [], "events": []
    }  # fmt: skip
    if checkpoint is None:
        return state, None
    saved_position = None
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        if state.get("world_size", plan.world_size) != plan.world_size:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was written by {state['world_size']} workers and ZeRO partitions "
                f"cannot be loaded by {plan.world_size}: use train.num_workers={state['world_size']}, or a new "
                "train.name to start a new run"
            )
        load_path, _ = engine.load_checkpoint(os.path.join(folder, DEEPSPEED_SUBDIR), tag=state["tag"])
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no engine state for rank {rank} in checkpoint {checkpoint.path}")
        position_file = os.path.join(folder, POSITION_DIR, f"rank-{rank}.json")
        if os.path.isfile(position_file):
            with open(position_file) as f:
                saved_position = json.load(f)
    # The restored optimizer carries the learning rate of the plan it was saved under; the next step must use
    # this plan's (a re-run with more max_steps stretches the schedule), so re-apply it now.
    sched = engine.lr_scheduler
    sched.base_lrs = [t.learning_rate] * len(sched.base_lrs)
    for group in sched.optimizer.param_groups:
        group["lr"] = t.learning_rate * schedule(sched.last_epoch)
    return state, saved_position


# --------------------------------------------------------------------------------------------------- loop


class _TrainGauges:
    """The run's dashboard metrics, set by rank 0 (the window's figures are already means over every worker):
    Prometheus ``ray_meddr_train_*``, tagged with ``train.name`` (docs/operations.md, "Metrics"). Gauges, not
    counters: a resumed run starts its process afresh, and a gauge still shows the last value."""

    def __init__(self, run_name: str):
        from ray.util.metrics import Gauge

        tags = ("run",)
        self.tags = {"run": run_name}
        self.loss = Gauge("meddr_train_loss", "Mean training loss of the last reporting window", tag_keys=tags)
        self.samples_per_s = Gauge(
            "meddr_train_samples_per_s", "Training samples per second, all workers, last window", tag_keys=tags
        )
        self.tokens_per_s = Gauge(
            "meddr_train_tokens_per_s", "Training tokens per second, all workers, last window", tag_keys=tags
        )
        self.step = Gauge("meddr_train_step", "Optimizer steps done", tag_keys=tags)
        self.checkpoint_step = Gauge("meddr_train_last_checkpoint_step", "Step of the last checkpoint", tag_keys=tags)
        self.checkpoint_time = Gauge(
            "meddr_train_last_checkpoint_timestamp_s",
            "Unix time the last checkpoint was persisted (its age: time() - this)",
            tag_keys=tags,
        )

    def window(self, metrics: Dict[str, Any]) -> None:
        self.step.set(metrics["step"], tags=self.tags)
        for gauge, key in ((self.loss, "loss"), (self.samples_per_s, "samples_per_s"),
                           (self.tokens_per_s, "tokens_per_s")):
            if metrics.get(key) is not None:
                gauge.set(float(metrics[key]), tags=self.tags)

    def checkpoint(self, step: int) -> None:
        self.checkpoint_step.set(step, tags=self.tags)
        self.checkpoint_time.set(time.time(), tags=self.tags)


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: ``cfg`` (Config), ``plan`` (Plan dict), ``model_path``,
    ``status_dir`` (optional local folder for worker info)."""
    import ray.train

    cfg: Config = loop_config["cfg"]
    t = cfg.train
    plan = Plan(**loop_config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} workers, running on {world}")
    if not t.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: no CUDA probing on CPU workers

    import deepspeed
    import torch

    from meddr_ray.model.collate import InstructionCollator
    from meddr_ray.model.internvl import load_processor

    device = torch.device("cuda", torch.cuda.current_device()) if t.use_gpu else torch.device("cpu")
    # Ray Train already set up torch.distributed (gloo/nccl); DeepSpeed's comm layer adopts that process group.
    # It must be up before the DeepSpeed config is parsed, which reads the world size from it.
    deepspeed.init_distributed(dist_backend="nccl" if t.use_gpu else "gloo")
    schedule = lr_multiplier(t, plan.total_steps)
    engine, counts = _build_engine(cfg, plan, loop_config["model_path"], schedule)
    if rank == 0:
        _say(
            f"[train] trainable parameters: {counts['trainable']:,} of {counts['total']:,} "
            f"({counts['share_pct']:.3f} %; the paper's 40B InternVL with its LoRA: 0.4 %)"
        )
    processor = load_processor(loop_config["model_path"], cfg.student.trust_remote_code)  # InternVL: image-only
    collate = InstructionCollator(
        processor, t.max_length, max_image_bytes=cfg.data.max_image_bytes, max_image_pixels=cfg.data.max_image_pixels
    )
    checkpoint = ray.train.get_checkpoint()
    state, saved_position = _restore(engine, checkpoint, t, plan, schedule, rank)
    state["identity"] = loop_config.get("identity")  # what the run computes from (meddr_ray.stages.train.stage.run_identity)
    state["description"] = loop_config.get("description")  # its parts, to name what changed on a refused resume
    event = {"start_step": state["step"], "resumed": checkpoint is not None, "time": time.time()}
    state["events"].append(event)
    _write_worker_info(loop_config.get("status_dir"), rank, {"attempt": len(state["events"]), **event})
    if rank == 0:
        how = f"resuming at step {state['step']} (epoch {state['epoch']})" if checkpoint else "starting"
        _say(
            f"[train] {how}; {plan.total_steps} steps, {plan.steps_per_epoch} per epoch, {world} workers x "
            f"{plan.micro_batch_size} micro x {plan.accumulation} accumulation = {t.global_batch_size} per step"
        )

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config.get("has_val") else None
    reducer = _Reducer()
    gauges = _TrainGauges(t.name) if rank == 0 else None

    def checkpoint_and_report(metrics: Dict[str, Any], with_checkpoint: bool) -> None:
        if rank == 0:
            state["history"].append(metrics)
            gauges.window(metrics)
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        tag = f"step{state['step']:07d}"
        state["tag"] = tag
        with tempfile.TemporaryDirectory(prefix=f"meddr-ckpt-r{rank}-") as tmp:
            os.makedirs(os.path.join(tmp, DEEPSPEED_SUBDIR), exist_ok=True)
            engine.save_checkpoint(os.path.join(tmp, DEEPSPEED_SUBDIR), tag=tag)
            save_adapter(engine, rank, os.path.join(tmp, ADAPTER_SUBDIR))
            os.makedirs(os.path.join(tmp, POSITION_DIR))
            with open(os.path.join(tmp, POSITION_DIR, f"rank-{rank}.json"), "w") as f:
                json.dump(position.snapshot(state), f)
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(state, f)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"checkpoint_{tag}"
            )
        if rank == 0:  # report() returns once the checkpoint is persisted on the run's storage
            gauges.checkpoint(state["step"])

    # ---- the baseline: validation loss before any training (a fresh run only)
    if checkpoint is None and t.eval_at_start and val_shard is not None:
        val = evaluate(engine, val_shard, collate, t.micro_batch_size, reducer, device)
        checkpoint_and_report({"step": 0, "epoch": 0, "val_loss": val}, with_checkpoint=False)
        if rank == 0:
            _say(f"[train] step 0: val_loss {val:.4f}")

    engine.train()
    position = _DataPosition(rank)
    window = _Window()  # what happened since the last report: averaged into the next one
    while state["step"] < plan.total_steps:
        epoch = state["epoch"]
        skip = state["batch_in_epoch"]
        position.new_epoch(epoch)
        batches = epoch_batches(train_shard, t, epoch, rank, skip, collate, position)
        consumed = skip  # the micro-batches a checkpoint already trained on were passed over, not decoded
        micro = 0
        if skip:
            event["data_position"] = position.verify(saved_position, epoch, skip, reducer)
            event["skipped_batches"] = skip
        step_start = time.perf_counter()
        for ids, batch in batches:
            if consumed >= plan.micro_per_epoch or state["step"] >= plan.total_steps:
                break
            position.add(ids)
            batch = {k: v.to(device) for k, v in batch.items()}
            lr = engine.get_lr()[0]
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer (and the schedule) only at accumulation boundaries
            consumed += 1
            micro += 1
            window.add(float(out.loss.detach()), float(batch["attention_mask"].sum()), batch["input_ids"].shape[0])
            if micro < plan.accumulation:
                continue

            # ---- one optimizer step done
            micro = 0
            state["step"] += 1
            state["batch_in_epoch"] = consumed
            step = state["step"]
            window.steps += 1
            window.seconds += time.perf_counter() - step_start
            epoch_done = consumed >= plan.micro_per_epoch
            last = step >= plan.total_steps
            save = last or step % t.checkpoint_every == 0
            if last:  # per-worker memory, recorded with the final checkpoint (meddr.json "workers")
                state["workers"] = gather_worker_memory(engine, rank)
            if save or epoch_done or step % t.log_every == 0:
                metrics = {"step": step, "epoch": epoch, "lr": lr, **window.metrics(reducer)}
                window = _Window()
                if (epoch_done or last) and val_shard is not None:
                    metrics["val_loss"] = evaluate(engine, val_shard, collate, t.micro_batch_size, reducer, device)
                if epoch_done:
                    state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
                checkpoint_and_report(metrics, with_checkpoint=save)
                if rank == 0:
                    val = f" val_loss {metrics['val_loss']:.4f}" if metrics.get("val_loss") is not None else ""
                    _say(
                        f"[train] step {step}/{plan.total_steps} epoch {epoch} loss {metrics['loss']:.4f} "
                        f"lr {lr:.2e} {metrics['tokens_per_s']:.0f} tok/s {metrics['step_time_s']:.2f} s/step{val}"
                    )
            step_start = time.perf_counter()
            if epoch_done:
                break
        else:
            # the shard ran out before the planned batches: the split gave this worker fewer rows than planned
            if consumed < plan.micro_per_epoch and state["step"] < plan.total_steps:
                raise RuntimeError(
                    f"rank {rank}: epoch {epoch} ended after {consumed} micro-batches, planned {plan.micro_per_epoch}"
                )
    return {"step": state["step"], "parameters": counts} if rank == 0 else None
