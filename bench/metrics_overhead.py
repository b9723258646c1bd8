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
3. `--rpc`: the real thing. A broker daemon (subprocess, Unix socket, SQLite) serves
   alloc + free on a session stream, once with metrics and once with every hook a
   no-op; the ratio is of the daemon's CPU time per pair (from /proc), and of wall time.
   The same run with no-op against no-op is printed first: a ratio inside that noise
   floor is no measurable overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.proc import threads_on_cpu
from broker.backends import SimulatorBackend
from broker.backends.base import Backend
from broker.engine import Broker
from broker.metrics import Metrics
from broker.store import AddPasids, Event, Record, SqliteStore


class NoMetrics(Metrics):
    """The baseline: same object shape, every hook a no-op, the backend unwrapped."""

    def commit_done(
        self, records: Sequence[Record], events: Sequence[Event], seconds: float
    ) -> None:
        pass

    def commit_failed(self, records: Sequence[Record], seconds: float) -> None:
        pass

    def alloc_refused(self, exc: BaseException) -> None:
        pass

    def set_destroyed(self, set_id: int, reason: str, kind: str, pasids: int) -> None:
        pass

    def session_opened(self, set_id: int, resumed: bool) -> None:
        pass

    def session_op_done(self, op: str | None, t0: float) -> None:
        pass

    def instrument(self, backend: Backend) -> Backend:
        return backend


async def _engine_run(metrics: Metrics, pairs: int, workdir: str, tag: str) -> tuple[float, float]:
    """(wall, CPU) seconds per alloc+free pair. CPU counts both threads (loop and writer)
    and is what the hooks really cost; wall also carries thread hand-offs and noise."""
    backend = metrics.instrument(SimulatorBackend(pasid_bits=20))
    broker = Broker(backend, SqliteStore(f"{workdir}/{tag}.db"))
    broker.observers.subscribe(metrics)
    await broker.start()
    sess, _, _, created = broker.open_session("bench")
    await created
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
            m.commit_done(rec, (), 0.0001)
            m.session_op_done("alloc", t)

    def best(fn: Callable[[], None]) -> float:
        out = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    return (best(loop_hooked) - best(loop_raw)) / n * 1e6


def _serve(mode: str, socket: str, db: str) -> None:
    """The daemon side of --rpc: `none` swaps in NoMetrics before serve() builds its own."""
    from broker.config import Config
    from broker.service import server

    if mode == "none":
        server.Metrics = NoMetrics  # type: ignore[attr-defined]
    asyncio.run(server.serve(Config(db=db, socket=socket, metrics_address="off")))


def _cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads (bench/proc.py: schedstat, not ticks)."""
    return sum(t.seconds for t in threads_on_cpu(pid))


def _rpc_run(mode: str, pairs: int, workdir: str) -> tuple[float, float]:
    """(daemon CPU, wall) seconds per alloc+free pair on a session stream."""
    from pasid_client import Client

    sock, db = f"{workdir}/{mode}.sock", f"{workdir}/{mode}-{time.monotonic_ns()}.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.metrics_overhead", "--serve", mode, sock, db],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"bench daemon ({mode}) did not start")
            time.sleep(0.05)
        with Client(f"unix:{sock}") as c:
            c.wait_ready()  # it listens before recovery is done
            s = c.session("bench")
            for _ in range(200):  # warm up
                p = s.alloc()[0]
                s.free(p, p)
            c0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
            for _ in range(pairs):
                p = s.alloc()[0]
                s.free(p, p)
            wall = time.perf_counter() - t0
            cpu = _cpu_seconds(proc.pid) - c0
            s.close()
        return cpu / pairs, wall / pairs
    finally:
        proc.terminate()
        proc.wait(30)


def rpc_ratio(
    pairs: int, rounds: int, modes: tuple[str, str] = ("none", "full")
) -> tuple[float, float, float, float]:
    """(baseline CPU µs/pair, CPU ratio, baseline wall µs/pair, wall ratio), medians of
    paired rounds, alternating which side goes first. modes ("none", "none") measures the
    noise floor: the same code against itself."""
    runs: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
    with tempfile.TemporaryDirectory(prefix="pb-bench-") as d:
        for r in range(rounds):
            for side in (0, 1) if r % 2 == 0 else (1, 0):
                runs[side].append(_rpc_run(modes[side], pairs, d))
    base, full = runs
    cpu_ratio = statistics.median(f[0] / b[0] for f, b in zip(full, base, strict=True))
    wall_ratio = statistics.median(f[1] / b[1] for f, b in zip(full, base, strict=True))
    return (
        statistics.median(b[0] for b in base) * 1e6,
        cpu_ratio,
        statistics.median(b[1] for b in base) * 1e6,
        wall_ratio,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1000, help="alloc+free pairs per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--rpc", action="store_true", help="also measure a real daemon over gRPC")
    p.add_argument("--serve", nargs=3, metavar=("MODE", "SOCKET", "DB"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        _serve(*a.serve)
        return
    if a.rpc:
        for modes, what in (
            (("none", "none"), "noise floor, no-op vs no-op"),
            (("none", "full"), "metrics vs no-op"),
        ):
            b_cpu, r_cpu, b_wall, r_wall = rpc_ratio(a.pairs, a.rounds, modes)
            print(
                f"alloc+free RPC pair on a session stream ({what}): daemon CPU"
                f" {b_cpu:.1f} us, ratio {r_cpu:.3f}; wall {b_wall:.1f} us, ratio {r_wall:.3f}"
            )
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
