"""CPU time of a process tree from /proc, for the benchmarks: on a machine shared with other work, CPU seconds
per request or per token move far less than wall time, so the benchmarks report both."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict


def tree_cpu(root: int) -> Dict[int, float]:
    """pid -> CPU seconds (user + system) so far, of ``root`` and every live descendant (the driver and the local
    Ray cluster it started: GCS, raylet, workers, replicas, dashboard)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2 :].split()
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime+stime
    family, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier} - family
        family |= frontier
    return {pid: stats[pid][1] for pid in family if pid in stats}
