"""Where a stream alloc's server CPU goes, next to the echo's per message (issue 12, point 1).

`python -m bench profile` (`make profile`): the same load as `bench rpc`'s stream figure
(16 callers, ping-pong allocs on one Unix socket) against the aio echo, the broker, and
the broker whose store writes nothing (the test fault store_writes_nothing), one after
the other, each sampled by `perf record` (no call graphs: cheap enough not to move the
figures much). Every server's CPU per message, from /proc like `bench rpc`'s, is split by
the shared object perf found running: the kernel, gRPC (core and its Cython layer), the
Python interpreter, SQLite, protobuf, the event loop, libc. Printed in µs per message,
with the broker's excess over echo's per component, and the broker's threads apart.

The interpreter's share cannot be split by Python function here (CPython 3.11 has no perf
map); docs/performance.md gives that split from py-spy. Diagnostic only: it needs
Debian's linux-perf and prints why it skips without it. Nothing is asserted.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.proc import threads_on_cpu
from bench.rpc import CONCURRENCY, Target, start_echo, stream_round
from tests.harness import BrokerProcess

SECONDS = float(os.environ.get("BENCH_PROFILE_SECONDS", "4"))

# Shared object (as perf names it) -> component, first match wins.
COMPONENTS = (
    ("kernel", re.compile(r"\[kernel")),
    ("gRPC (core + Cython)", re.compile(r"cygrpc|grpc")),
    ("SQLite", re.compile(r"sqlite")),
    ("protobuf (upb)", re.compile(r"_message|upb|protobuf")),
    ("Python interpreter", re.compile(r"libpython|^python")),
    ("event loop (uvloop, _asyncio)", re.compile(r"^loop\.|_asyncio|uvloop")),
    ("libc, ld.so, vdso", re.compile(r"libc\.|ld-linux|vdso|libstdc|libm\.|libpthread")),
)
OTHER = "other"


def component(dso: str) -> str:
    return next((name for name, rx in COMPONENTS if rx.search(dso)), OTHER)


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the main thread, gRPC's own threads, and the other threads (the
    store's writer and checkpoints, for the broker)."""
    out: defaultdict[str, float] = defaultdict(float)
    for t in threads_on_cpu(pid):
        if t.tid == pid:
            out["main thread"] += t.seconds
        elif t.comm.startswith(("event_engine", "grpc")):
            out["gRPC's threads"] += t.seconds
        else:
            out["other threads"] += t.seconds
    return dict(out)


def dso_shares(data: Path) -> dict[str, float]:
    """Share of samples per component, from `perf report --sort dso`."""
    r = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso", "-g", "none"],
        capture_output=True,
        text=True,
        check=True,
    )
    shares: defaultdict[str, float] = defaultdict(float)
    for line in r.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
        if m:
            shares[component(m.group(2))] += float(m.group(1)) / 100
    return dict(shares)


def profiled_round(t: Target, data: Path, seconds: float) -> tuple[float, float, dict[str, float]]:
    """(allocs/s, server CPU µs per message, the same by thread) of one round."""
    asyncio.run(stream_round(t, CONCURRENCY, 0.5, batch=False))  # warm: streams, caches
    before = threads_cpu(t.pid)
    perf = subprocess.Popen(
        ["perf", "record", "-q", "-F", "999", "-p", str(t.pid), "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)  # perf attached
    rate, cpu_us, _ = asyncio.run(stream_round(t, CONCURRENCY, seconds, batch=False))
    perf.send_signal(signal.SIGINT)
    perf.wait()
    after = threads_cpu(t.pid)
    calls = max(rate * seconds, 1)
    return rate, cpu_us, {k: (v - before.get(k, 0.0)) / calls * 1e6 for k, v in after.items()}


def main(quick: bool = False) -> int:
    if shutil.which("perf") is None:
        print("skipped: perf is not installed (Debian: apt-get install linux-perf)")
        return 0
    probe = subprocess.run(["perf", "stat", "-e", "cpu-clock", "true"], capture_output=True)
    if probe.returncode != 0:
        print(f"skipped: perf cannot sample here: {probe.stderr.decode().strip()[:200]}")
        return 0
    seconds = 1.0 if quick else SECONDS
    d = Path(tempfile.mkdtemp(prefix="pb-profile-", dir="/tmp"))
    echo = start_echo(str(d / "echo.sock"))
    args = ("--quota-per-set", "0", "--log-level", "WARNING")
    broker = BrokerProcess(*args)
    nostore = BrokerProcess(*args, env={"PASID_BROKER_TEST_FAULTS": "store_writes_nothing"})
    try:
        broker.start()  # waits until it serves
        nostore.start()
        assert broker.proc is not None and nostore.proc is not None
        servers = {
            "echo": Target(str(d / "echo.sock"), echo=True, pid=echo.pid),
            "broker": Target(broker.socket, echo=False, pid=broker.proc.pid),
            "no SQLite": Target(nostore.socket, echo=False, pid=nostore.proc.pid),
        }
        rows: dict[str, tuple[float, float, dict[str, float], dict[str, float]]] = {}
        for name, t in servers.items():
            data = d / f"{name.replace(' ', '-')}.data"
            rate, cpu_us, threads = profiled_round(t, data, seconds)
            rows[name] = (rate, cpu_us, dso_shares(data), threads)
        print_table(rows, seconds)
    finally:
        echo.kill()
        broker.cleanup()
        nostore.cleanup()
        shutil.rmtree(d, ignore_errors=True)
    return 0


def print_table(
    rows: dict[str, tuple[float, float, dict[str, float], dict[str, float]]], seconds: float
) -> None:
    names = list(rows)
    print(
        f"{CONCURRENCY} streams of ping-pong allocs, {seconds:g} s per server, sampled by"
        f" perf at 999 Hz; load {os.getloadavg()[0]:.1f}"
    )
    print("  server CPU per message, µs, by what perf found running:")
    print(f"  {'':32}" + "".join(f"{n:>11}" for n in names) + "  broker - echo")
    comps = [c for c, _ in COMPONENTS] + [OTHER]
    for comp in comps:
        vals = [rows[n][1] * rows[n][2].get(comp, 0.0) for n in names]
        print(f"  {comp:32}" + "".join(f"{v:11.1f}" for v in vals) + f"{vals[1] - vals[0]:+15.1f}")
    totals = [rows[n][1] for n in names]
    print(
        f"  {'total (/proc)':32}"
        + "".join(f"{v:11.1f}" for v in totals)
        + f"{totals[1] - totals[0]:+15.1f}"
    )
    print("  rate, messages/s:" + " " * 15 + "".join(f"{rows[n][0]:11.0f}" for n in names))
    for n in names:
        per = ", ".join(
            f"{k} {us:.1f}"
            for k, us in sorted(rows[n][3].items(), key=lambda kv: -kv[1])
            if us >= 0.1
        )
        print(f"  {n}: CPU per message by thread, µs: {per}")
