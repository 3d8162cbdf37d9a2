"""What a training checkpoint folder holds, written by every worker and read back on resume and by the driver.

- ``deepspeed/``: the DeepSpeed engine state of every rank (each rank saves its own partition into its own
  temporary folder; Ray Train merges the ranks' folders into one checkpoint folder on the run's storage);
- ``adapter/``: the LoRA adapter in PEFT format, gathered on rank 0 with ``deepspeed.zero.GatheredParameters``;
- ``data_position/rank-<r>.json``: where each rank is in the current epoch's data
  (:class:`meddr_ray.stages.train.state.DataPosition`);
- ``state.json`` (rank 0): step, epoch, micro-batches consumed in that epoch, the metrics history and the
  start/resume events.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

STATE_FILE = "state.json"
POSITION_DIR = "data_position"
ADAPTER_SUBDIR = "adapter"
DEEPSPEED_SUBDIR = "deepspeed"


def checkpoint_dir_name(tag: str) -> str:
    """The folder Ray Train gives the checkpoint of ``tag`` in the run's storage."""
    return f"checkpoint_{tag}"


def step_tag(step: int) -> str:
    return f"step{step:07d}"


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


def write_checkpoint(folder: str, engine, rank: int, state: Dict[str, Any], position: Dict[str, Any]) -> None:
    """This rank's part of the checkpoint ``state["tag"]`` into the local ``folder`` (a collective: every rank
    calls it)."""
    os.makedirs(os.path.join(folder, DEEPSPEED_SUBDIR), exist_ok=True)
    engine.save_checkpoint(os.path.join(folder, DEEPSPEED_SUBDIR), tag=state["tag"])
    save_adapter(engine, rank, os.path.join(folder, ADAPTER_SUBDIR))
    os.makedirs(os.path.join(folder, POSITION_DIR))
    with open(os.path.join(folder, POSITION_DIR, f"rank-{rank}.json"), "w") as f:
        json.dump(position, f)
    if rank == 0:
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state, f)


def read_state(folder: str) -> Dict[str, Any]:
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)


def read_position(folder: str, rank: int) -> Optional[Dict[str, Any]]:
    """The data position ``rank`` saved, or None (a checkpoint of an earlier release has none)."""
    path = os.path.join(folder, POSITION_DIR, f"rank-{rank}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
