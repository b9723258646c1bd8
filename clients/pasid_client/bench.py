"""`pasidctl bench`: load a broker from the client side and report what its callers see.

Each of `concurrency` workers holds its own session (one ioasid_set) on one shared channel
and issues its next request as soon as the last is answered, so concurrency is the number
of requests in flight. The alloc/free mix is deterministic (op i of a worker is an alloc
when ceil((i+1)*ratio) > ceil(i*ratio)), a free releases the worker's lowest `batch`
PASIDs in one request, and a free with nothing held becomes an alloc. Quota and exhaustion
refusals are counted and the run goes on; any other failure ends it. Closing the sessions
at the end frees whatever is still held.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from pasid_client.aio import AsyncClient, AsyncSession
from pasid_client.errors import ResourceExhausted


@dataclass(frozen=True)
class Plan:
    """What to run: `duration` seconds, or `count` requests in all when count > 0."""

    concurrency: int = 4
    duration: float = 10.0
    count: int = 0
    alloc_ratio: float = 0.5
    batch: int = 1
    client: str = "pasidctl-bench"


@dataclass
class Tally:
    """Latencies in seconds per kind, and what the broker refused (by its reason)."""

    latency: dict[str, list[float]] = field(default_factory=lambda: {"alloc": [], "free": []})
    allocated: int = 0
    freed: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def ops(self) -> int:
        return sum(len(v) for v in self.latency.values())


def is_alloc(i: int, ratio: float) -> bool:
    """Op i of a worker is an alloc: spreads ratio*n allocs evenly over n ops."""
    return math.ceil((i + 1) * ratio) > math.ceil(i * ratio)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100]) of an ascending sequence; 0.0 if empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def _latency_ms(values: Sequence[float]) -> dict[str, float]:
    s = sorted(values)
    return {
        "p50": round(percentile(s, 50) * 1e3, 3),
        "p99": round(percentile(s, 99) * 1e3, 3),
        "max": round((s[-1] if s else 0.0) * 1e3, 3),
    }


def summary(plan: Plan, tally: Tally, elapsed: float) -> dict[str, Any]:
    """The report, as `--json` prints it."""
    every = tally.latency["alloc"] + tally.latency["free"]
    return {
        "concurrency": plan.concurrency,
        "batch": plan.batch,
        "alloc_ratio": plan.alloc_ratio,
        "elapsed_seconds": round(elapsed, 3),
        "ops": tally.ops,
        "alloc_ops": len(tally.latency["alloc"]),
        "free_ops": len(tally.latency["free"]),
        "pasids_allocated": tally.allocated,
        "pasids_freed": tally.freed,
        "refused": dict(sorted(tally.refused.items())),
        "ops_per_second": round(tally.ops / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": {
            "all": _latency_ms(every),
            "alloc": _latency_ms(tally.latency["alloc"]),
            "free": _latency_ms(tally.latency["free"]),
        },
    }


def render(s: dict[str, Any]) -> str:
    """The text report for one run."""
    refused = ", ".join(f"{n} {code}" for code, n in s["refused"].items()) or "none"

    def lat(k: str) -> str:
        v = s["latency_ms"][k]
        return f"p50 {v['p50']:.3f} ms  p99 {v['p99']:.3f} ms  max {v['max']:.3f} ms"

    return "\n".join(
        [
            f"bench       {s['concurrency']} sessions, batch {s['batch']},"
            f" alloc ratio {s['alloc_ratio']:g}, {s['elapsed_seconds']:.2f} s",
            f"requests    {s['ops']} ({s['alloc_ops']} alloc, {s['free_ops']} free),"
            f" refused: {refused}",
            f"pasids      {s['pasids_allocated']} allocated, {s['pasids_freed']} freed",
            f"throughput  {s['ops_per_second']:.1f} requests/s",
            f"latency     {lat('all')}",
            f"  alloc     {lat('alloc')}",
            f"  free      {lat('free')}",
        ]
    )


class _Progress:
    """A one-line bar on a terminal, redrawn a few times a second; nothing elsewhere."""

    WIDTH = 30

    def __init__(self, plan: Plan, out: TextIO) -> None:
        self.plan = plan
        self.out = out

    def draw(self, tally: Tally, elapsed: float) -> None:
        if self.plan.count:
            done = min(1.0, tally.ops / self.plan.count)
        else:
            done = min(1.0, elapsed / self.plan.duration) if self.plan.duration else 1.0
        filled = round(done * self.WIDTH)
        rate = tally.ops / elapsed if elapsed > 0 else 0.0
        self.out.write(
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done * 100:5.1f} %"
            f"  {tally.ops} requests  {rate:.0f}/s"
        )
        self.out.flush()

    def clear(self) -> None:
        self.out.write("\r\x1b[2K")
        self.out.flush()


async def _worker(s: AsyncSession, plan: Plan, tally: Tally, ticket: Any) -> None:
    held: list[int] = []  # ascending: a free takes the lowest `batch` in one range
    i = 0
    while ticket():
        kind = "alloc" if is_alloc(i, plan.alloc_ratio) or not held else "free"
        i += 1
        t0 = time.perf_counter()
        try:
            if kind == "alloc":
                got = await s.alloc(count=plan.batch)
                tally.allocated += len(got)
                held.extend(got)
                held.sort()
            else:
                lo, hi = held[0], held[min(plan.batch, len(held)) - 1]
                freed = await s.free(lo, hi)  # awaited first: `+= await` loses updates
                tally.freed += freed
                del held[: min(plan.batch, len(held))]
        except ResourceExhausted as exc:
            why = exc.reason or exc.code.name  # QUOTA_EXCEEDED or EXHAUSTED
            tally.refused[why] = tally.refused.get(why, 0) + 1
        tally.latency[kind].append(time.perf_counter() - t0)


async def run_async(
    client: AsyncClient, plan: Plan, progress: TextIO | None = None
) -> dict[str, Any]:
    """Run `plan` against the broker behind `client`; the summary. Raises
    PasidClientError subclasses for anything but quota/exhaustion refusals."""
    tally = Tally()
    issued = 0
    deadline = 0.0

    def ticket() -> bool:
        nonlocal issued
        if plan.count:
            issued += 1
            return issued <= plan.count
        return time.monotonic() < deadline

    sessions = [await client.session(plan.client) for _ in range(plan.concurrency)]
    bar = _Progress(plan, progress) if progress is not None else None
    try:
        start = time.monotonic()
        deadline = start + plan.duration
        work = asyncio.gather(*(_worker(s, plan, tally, ticket) for s in sessions))
        while bar is not None and not work.done():
            bar.draw(tally, time.monotonic() - start)
            await asyncio.wait([work], timeout=0.2)
        await work
        elapsed = time.monotonic() - start
    finally:
        if bar is not None:
            bar.clear()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    return summary(plan, tally, elapsed)


def run(
    target: str,
    plan: Plan,
    *,
    as_json: bool = False,
    timeout: float = 10.0,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    """pasidctl's entry: the progress bar only when `out` is a terminal and not JSON."""

    async def go() -> dict[str, Any]:
        async with AsyncClient(target, timeout=timeout) as c:
            progress = out if (not as_json and out.isatty()) else None
            return await run_async(c, plan, progress)

    return asyncio.run(go())
