"""What the metrics cost on the alloc path, as a ratio against the same path without them.

    .venv/bin/python -m bench.metrics_overhead [--pairs N]

Two measurements, both in this process and run back to back, alternating, so that they
share the machine's state:

1. The engine path (no gRPC): alloc + free of one PASID through Broker, with a real
   SQLite store in a temp dir, each awaited (one group commit each). Instrumented vs
   a Metrics whose hooks do nothing, in CPU time (both threads) and wall time. This
   denominator is smaller than a real RPC's, so the ratio overstates the overhead a
   client sees. Wall time on a shared 2-core machine swings by +-20 % between runs;
   trust the CPU ratio and the hook cost.
2. The hooks alone: what one alloc adds (backend timing, commit accounting, stream-op
   latency), in microseconds per alloc.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from broker.backends import SimulatorBackend
from broker.backends.base import Backend
from broker.engine import Broker
from broker.metrics import Metrics
from broker.store import AddPasids, Record, SqliteStore


class NoMetrics(Metrics):
    """The baseline: same object shape, every hook a no-op, the backend unwrapped."""

    def committed(self, records: Sequence[Record]) -> None:
        pass

    def commit_failed(self, records: Sequence[Record]) -> None:
        pass

    def commit_timed(self, commit: Callable[[Sequence[Record]], None]) -> Callable[..., None]:
        return commit

    def alloc_refused(self, exc: BaseException) -> None:
        pass

    def set_reclaimed(self, reason: str, pasids: int) -> None:
        pass

    def session_opened(self, resumed: bool) -> None:
        pass

    def session_op_done(self, op: str | None, t0: float) -> None:
        pass

    def instrument(self, backend: Backend) -> Backend:
        return backend


async def _engine_run(metrics: Metrics, pairs: int, workdir: str, tag: str) -> tuple[float, float]:
    """(wall, CPU) seconds per alloc+free pair. CPU counts both threads (loop and writer)
    and is what the hooks really cost; wall also carries thread hand-offs and noise."""
    backend = metrics.instrument(SimulatorBackend(pasid_bits=20))
    broker = Broker(backend, SqliteStore(f"{workdir}/{tag}.db"), metrics=metrics)
    await broker.start()
    sess, _, _ = await broker.open_session("bench")
    hi = (1 << 20) - 1
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(pairs):
        t = time.perf_counter()
        (p,) = await broker.alloc(sess, 1, hi, 1)
        metrics.session_op_done("alloc", t)
        t = time.perf_counter()
        await broker.free(sess, p, p)
        metrics.session_op_done("free", t)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    await broker.stop()
    return took / pairs, cpu / pairs


def engine_ratio(pairs: int, rounds: int, which: int) -> tuple[float, float, float]:
    """(baseline µs per pair, instrumented µs per pair, median of paired ratios);
    `which` 0 for wall time, 1 for CPU time."""
    base: list[float] = []
    inst: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pb-bench-") as d:
        for r in range(rounds):
            # Alternate which goes first, so that drift does not favour one side.
            first, second = (NoMetrics(), Metrics()) if r % 2 == 0 else (Metrics(), NoMetrics())
            for m in (first, second):
                t = asyncio.run(_engine_run(m, pairs, d, f"{r}{type(m).__name__}"))[which]
                (base if isinstance(m, NoMetrics) else inst).append(t)
    b, i = statistics.median(base), statistics.median(inst)
    ratio = statistics.median(x / y for x, y in zip(inst, base, strict=True))
    return b * 1e6, i * 1e6, ratio


def hooks_per_alloc(n: int) -> float:
    """µs the hooks add to one alloc: backend call timing, commit accounting, op latency."""
    m = Metrics()
    raw = SimulatorBackend(pasid_bits=20)
    raw.open()
    wrapped = m.instrument(SimulatorBackend(pasid_bits=20))
    wrapped.open()
    rec: list[Any] = [AddPasids(1, (5,))]

    def loop_raw() -> None:
        for _ in range(n):
            raw.free(raw.alloc(1, 1), 1)

    def loop_hooked() -> None:
        for _ in range(n):
            t = time.perf_counter()
            wrapped.free(wrapped.alloc(1, 1), 1)
            m.committed(rec)
            m.session_op_done("alloc", t)

    def best(fn: Callable[[], None]) -> float:
        out = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    return (best(loop_hooked) - best(loop_raw)) / n * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1000, help="alloc+free pairs per round")
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args(argv)
    hooks = hooks_per_alloc(20000)
    print(f"hooks per alloc (backend timing + commit count + latency observe): {hooks:.2f} us")
    for which, what in ((1, "CPU"), (0, "wall")):
        b, i, ratio = engine_ratio(a.pairs, a.rounds, which)
        print(
            f"engine alloc+free pair, {what}: baseline {b:.1f} us, instrumented {i:.1f} us,"
            f" ratio {ratio:.3f}"
        )
        if which == 1:
            print(f"hooks as a share of the pair's CPU: {hooks / b:.1%}")


if __name__ == "__main__":
    main()
