"""What each training worker records about itself: which process is which rank, and the memory it holds."""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Dict, List, Optional


def write_worker_info(status_dir: Optional[str], rank: int, attempt: Dict[str, Any]) -> None:
    """``<experiment>/workers/rank-<r>.json``: which process is which rank (operators, and the kill test)."""
    if not status_dir:
        return
    os.makedirs(status_dir, exist_ok=True)
    info = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), **attempt}
    tmp = os.path.join(status_dir, f".rank-{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(status_dir, f"rank-{rank}.json"))


def _optimizer_bytes(engine) -> int:
    """The Adam moments plus any fp32 master copies that are not the model's own tensors."""
    import torch

    basic = engine.basic_optimizer or engine.optimizer
    own = {p.data.data_ptr() for p in engine.module.parameters() if p.data.numel()}
    own |= {p.ds_tensor.data_ptr() for p in engine.module.parameters() if getattr(p, "ds_tensor", None) is not None}
    total = 0
    for group in basic.param_groups:
        for t in group["params"]:
            if t.data_ptr() not in own:  # a master copy the optimizer keeps besides the model's tensor
                total += t.numel() * t.element_size()
    for st in basic.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return total


def worker_memory(engine) -> Dict[str, float]:
    """This rank's memory: peak resident set, and the bytes of model parameters and optimizer state it holds.

    Under ZeRO-3 a partitioned parameter holds only its shard (``ds_tensor``) outside forward/backward.
    """
    import resource

    params = 0
    for p in engine.module.parameters():
        params += p.data.numel() * p.data.element_size()
        shard = getattr(p, "ds_tensor", None)
        if shard is not None:
            params += shard.numel() * shard.element_size()
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "param_mb": params / 2**20,
        "optimizer_mb": _optimizer_bytes(engine) / 2**20,
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
