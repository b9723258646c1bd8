"""A process's threads as the kernel counts them, for the benchmarks' CPU figures."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class ThreadCpu(NamedTuple):
    tid: int
    comm: str
    seconds: float  # on CPU since the thread began


def threads_on_cpu(pid: int) -> list[ThreadCpu]:
    """Each thread's CPU time in nanoseconds' resolution: the first field of
    /proc/PID/task/TID/schedstat. /proc/PID/stat counts clock ticks (10 ms): a short run
    of a fast daemon could read 0 and divide by it. A thread that ends meanwhile is left
    out."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.append(ThreadCpu(int(task.name), comm, ns / 1e9))
    return out
