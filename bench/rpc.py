"""The broker's RPC cost against bare grpc echo servers: same socket, same client, one run.

Targets (issue 12): stream alloc >= 0.85x stream echo; unary Alloc >= 0.85x unary echo;
p50 with one caller <= 1.3x echo; batched alloc >= 100,000 PASIDs/s; the broker's CPU per
alloc printed next to echo's CPU per message.

Fairness. The echo servers (bench/echo_server.py) run in their own process on a Unix
socket, like the broker. One load generator drives both through the *same* code: a raw
grpc.aio channel on bytes methods, with requests serialized once up front, so neither side
pays for protobuf or for the client library in the measured loop (the client library's
own cost is printed separately). The echo is sent the broker's exact request bytes.

The machine is shared (2 cores, other jobs), so nothing is trusted across runs: every
figure is measured in ROUNDS rounds that alternate echo and broker (A, B, A, B, ...), each
round's ratio is computed from that round's pair, and the median and spread are printed.
CPU per message comes from /proc/PID/stat (utime + stime) of each server process, read
around each round.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from pasid.v1 import broker_pb2 as pb

from tests.harness import ROOT, BrokerProcess, wait_until

SECONDS = float(os.environ.get("BENCH_RPC_SECONDS", "2"))
ROUNDS = int(os.environ.get("BENCH_RPC_ROUNDS", "3"))
CONCURRENCY = int(os.environ.get("BENCH_RPC_CONCURRENCY", "16"))
BATCH = 1024  # PASIDs per request in the batched figure
TOP = (1 << 20) - 1
FREE_EVERY = 256  # single allocs per set between frees (keeps the space from filling)
SESSION = "/pasid.v1.PasidBroker/Session"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Figure:
    """One measured quantity, per round: rate (ops/s) and server CPU µs per op."""

    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    client_cpu_us: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


# -- the one load generator -------------------------------------------------------------


async def drive(call: Callable[[int], Awaitable[int]], workers: int, seconds: float) -> float:
    """Units per second (what `call` returns summed) with `workers` callers."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            # Not `done += await call(w)`: that reads `done` before the await and writes
            # it back after, losing every other worker's count in between.
            n = await call(w)
            done += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return done / (time.perf_counter() - t0)


async def latencies(call: Callable[[int], Awaitable[int]], seconds: float) -> list[float]:
    out: list[float] = []
    stop = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < stop:
        await call(0)
        out.append(time.perf_counter() - t0)
    return out


class Target:
    """A server reached by the one client code: its stream and unary method names and the
    bytes to send. For the echo, the same bytes go to /bench.Echo/*."""

    def __init__(self, address: str, *, echo: bool, pid: int) -> None:
        self.address = address
        self.echo = echo
        self.pid = pid

    async def open_streams(
        self, ch: grpc.aio.Channel, n: int
    ) -> tuple[list[grpc.aio.StreamStreamCall], list[bytes]]:
        """n open session streams, and for each the unary AllocRequest naming it."""
        method = "/bench.Echo/Stream" if self.echo else SESSION
        streams, unary = [], []
        for w in range(n):
            call = ch.stream_stream(method)()
            opened = pb.SessionRequest(open=pb.OpenSession(client=f"bench{w}", pid=os.getpid()))
            await call.write(opened.SerializeToString())
            reply = await call.read()
            ref = pb.SessionRef()
            if not self.echo:
                o = pb.SessionResponse.FromString(reply).opened
                ref = pb.SessionRef(session_id=o.session_id, token=o.token)
            else:  # the same shape: a session id and a 43-character token
                ref = pb.SessionRef(session_id=w + 1, token="x" * 43)
            streams.append(call)
            unary.append(pb.AllocRequest(session=ref, min=1, max=TOP).SerializeToString())
        return streams, unary

    def unary(self, ch: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
        return ch.unary_unary("/bench.Echo/Unary" if self.echo else "/pasid.v1.PasidBroker/Alloc")


ALLOC1 = pb.SessionRequest(alloc=pb.AllocRequest(min=1, max=TOP)).SerializeToString()
ALLOCN = pb.SessionRequest(alloc=pb.AllocRequest(min=1, max=TOP, count=BATCH)).SerializeToString()
FREE_ALL = pb.SessionRequest(free=pb.FreeRequest(min=0, max=0xFFFFFFFF)).SerializeToString()


def check(reply: bytes) -> None:
    """A SessionResponse carrying an error (field 6) means the bench measured refusals."""
    r = pb.SessionResponse.FromString(reply)
    if r.WhichOneof("result") == "error":
        raise SystemExit(f"broker refused a bench request: {r.error.message}")


async def stream_round(
    t: Target, workers: int, seconds: float, batch: bool
) -> tuple[float, float, float]:
    """(units/s, server CPU µs per request, this load generator's CPU µs per request) for
    alloc ping-pong on `workers` streams."""
    req = ALLOCN if batch else ALLOC1
    units = BATCH if batch else 1
    every = 16 if batch else FREE_EVERY
    async with grpc.aio.insecure_channel(f"unix:{t.address}") as ch:
        streams, _ = await t.open_streams(ch, workers)
        count = [0] * workers

        async def one(w: int) -> int:
            s = streams[w]
            await s.write(req)
            reply = await s.read()
            count[w] += 1
            if count[w] % every == 0:
                check(reply)
                await s.write(FREE_ALL)
                await s.read()
            return units

        c0, m0 = cpu_seconds(t.pid), time.process_time()
        rate = await drive(one, workers, seconds)
        cpu, mine = cpu_seconds(t.pid) - c0, time.process_time() - m0
        for s in streams:
            s.cancel()
    calls = max(rate * seconds / units, 1)
    return rate, cpu / calls * 1e6, mine / calls * 1e6


async def unary_round(t: Target, workers: int, seconds: float) -> tuple[float, float, float]:
    async with grpc.aio.insecure_channel(f"unix:{t.address}") as ch:
        streams, reqs = await t.open_streams(ch, workers)  # the sessions the calls name
        alloc = t.unary(ch)
        count = [0] * workers

        async def one(w: int) -> int:
            await alloc(reqs[w])
            count[w] += 1
            if count[w] % FREE_EVERY == 0:
                await streams[w].write(FREE_ALL)
                await streams[w].read()
            return 1

        c0, m0 = cpu_seconds(t.pid), time.process_time()
        rate = await drive(one, workers, seconds)
        cpu, mine = cpu_seconds(t.pid) - c0, time.process_time() - m0
        for s in streams:
            s.cancel()
    calls = max(rate * seconds, 1)
    return rate, cpu / calls * 1e6, mine / calls * 1e6


async def p50_round(t: Target, seconds: float, unary: bool) -> float:
    """One caller's median latency, on the session stream or by unary Alloc."""
    async with grpc.aio.insecure_channel(f"unix:{t.address}") as ch:
        (s,), (req,) = await t.open_streams(ch, 1)
        call = t.unary(ch)
        n = 0

        async def one(_: int) -> int:
            nonlocal n
            if unary:
                await call(req)
            else:
                await s.write(ALLOC1)
                await s.read()
            n += 1
            if n % FREE_EVERY == 0:
                await s.write(FREE_ALL)
                await s.read()
            return 1

        lat = await latencies(one, seconds)
        s.cancel()
    return statistics.median(lat) * 1e3


async def client_library_round(address: str, seconds: float) -> tuple[float, float]:
    """Alloc via pasid_client.AsyncSession vs the raw stream, one caller, same broker."""
    from pasid_client import AsyncClient

    raw_t = Target(address.removeprefix("unix:"), echo=False, pid=0)
    raw = statistics.median([await p50_round(raw_t, seconds / 2, unary=False)])
    async with AsyncClient(address) as c, c.session("lib") as sess:
        n = 0

        async def one(_: int) -> int:
            nonlocal n
            await sess.alloc(1, TOP)
            n += 1
            if n % FREE_EVERY == 0:
                await sess.free()
            return 1

        lib = statistics.median(await latencies(one, seconds / 2)) * 1e3
    return raw, lib


# -- the run ----------------------------------------------------------------------------


def start_echo(path: str, *, sync: bool = False) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", path, *(["--sync"] if sync else [])],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def main(quick: bool = False) -> int:
    seconds = 0.5 if quick else SECONDS
    rounds = 1 if quick else ROUNDS
    d = tempfile.mkdtemp(prefix="pb-bench-", dir="/tmp")
    echo_path = os.path.join(d, "echo.sock")
    echo = start_echo(echo_path)
    sync_path = os.path.join(d, "sync.sock")
    sync_echo = start_echo(sync_path, sync=True)
    b = BrokerProcess("--quota-per-set", "0", "--log-level", "WARNING")
    # The same broker with a store that writes nothing (a test fault, tests/faults): what
    # is left of the gap to echo without SQLite. Not a configuration anyone can run.
    b0 = BrokerProcess(
        "--quota-per-set",
        "0",
        "--log-level",
        "WARNING",
        env={"PASID_BROKER_TEST_FAULTS": "store_writes_nothing"},
    )
    # The same broker with --durability page-cache (no fsync per commit): what an
    # acknowledgement that means "on the device" costs, as a ratio in the same rounds.
    bp = BrokerProcess(
        "--quota-per-set", "0", "--log-level", "WARNING", "--durability", "page-cache"
    )
    try:
        b.start()
        b0.start()
        bp.start()
        wait_until(lambda: b.health() == "SERVING", 10)
        assert b.proc is not None and b0.proc is not None
        e = Target(echo_path, echo=True, pid=echo.pid)
        k = Target(b.socket, echo=False, pid=b.proc.pid)
        k0 = Target(b0.socket, echo=False, pid=b0.proc.pid)
        assert bp.proc is not None
        kp = Target(bp.socket, echo=False, pid=bp.proc.pid)
        se = Target(sync_path, echo=True, pid=sync_echo.pid)
        figs: dict[str, tuple[Figure, Figure]] = {
            n: (Figure(), Figure()) for n in ("stream", "unary", "p50s", "p50u", "batch", "sync")
        }
        # Against the same round's echo: the broker whose store writes nothing.
        nostore = {n: Figure() for n in ("stream", "unary", "p50s")}
        # Against the same round's (fsync) broker: the broker with --durability page-cache.
        pagecache = {n: Figure() for n in ("stream", "unary", "p50s")}

        async def run() -> None:
            for _ in range(rounds):
                for t, i in ((e, 0), (k, 1)):  # A, B in each round
                    r, c, m = await stream_round(t, CONCURRENCY, seconds, batch=False)
                    figs["stream"][i].rates.append(r)
                    figs["stream"][i].cpu_us.append(c)
                    figs["stream"][i].client_cpu_us.append(m)
                r, c, _ = await stream_round(k0, CONCURRENCY, seconds, batch=False)
                nostore["stream"].rates.append(r)
                nostore["stream"].cpu_us.append(c)
                r, c, _ = await stream_round(kp, CONCURRENCY, seconds, batch=False)
                pagecache["stream"].rates.append(r)
                pagecache["stream"].cpu_us.append(c)
                for t, i in ((e, 0), (k, 1)):
                    r, c, m = await unary_round(t, CONCURRENCY, seconds)
                    figs["unary"][i].rates.append(r)
                    figs["unary"][i].cpu_us.append(c)
                    figs["unary"][i].client_cpu_us.append(m)
                r, c, _ = await unary_round(k0, CONCURRENCY, seconds)
                nostore["unary"].rates.append(r)
                nostore["unary"].cpu_us.append(c)
                r, c, _ = await unary_round(kp, CONCURRENCY, seconds)
                pagecache["unary"].rates.append(r)
                pagecache["unary"].cpu_us.append(c)
                for t, i in ((e, 0), (k, 1)):
                    figs["p50s"][i].p50_ms.append(await p50_round(t, seconds / 2, False))
                    figs["p50u"][i].p50_ms.append(await p50_round(t, seconds / 2, True))
                nostore["p50s"].p50_ms.append(await p50_round(k0, seconds / 2, False))
                pagecache["p50s"].p50_ms.append(await p50_round(kp, seconds / 2, False))
                for t, i in ((e, 0), (k, 1)):
                    r, c, _ = await stream_round(t, 4, seconds, batch=True)
                    figs["batch"][i].rates.append(r)
                    figs["batch"][i].cpu_us.append(c)
                # The thread-pool server, against the aio echo's unary of this round.
                r, c, _ = await unary_round(se, CONCURRENCY, seconds)
                figs["sync"][1].rates.append(r)
                figs["sync"][1].cpu_us.append(c)
                figs["sync"][0].rates.append(figs["unary"][0].rates[-1])
                figs["sync"][0].cpu_us.append(figs["unary"][0].cpu_us[-1])

        asyncio.run(run())
        raw, lib = asyncio.run(client_library_round(b.address, seconds))

        def ratio(name: str, attr: str) -> list[float]:
            a, bb = figs[name]
            return [y / x for x, y in zip(getattr(a, attr), getattr(bb, attr), strict=True)]

        print(
            f"{CONCURRENCY} callers, {rounds} rounds x {seconds:g} s, echo and broker"
            f" alternating; Unix socket; grpcio {grpc.__version__}; load {os.getloadavg()[0]:.1f}"
        )
        print("  median [min-max] over rounds; ratio = broker / echo in the same round")
        for name, label, target in (
            ("stream", "stream alloc  ", ">= 0.85"),
            ("unary", "unary Alloc   ", ">= 0.85"),
        ):
            a, bb = figs[name]
            print(
                f"  {label}: echo {spread(a.rates, '{:.0f}')}/s  broker"
                f" {spread(bb.rates, '{:.0f}')}/s  ratio {spread(ratio(name, 'rates'))}"
                f"  (target {target})"
            )
            print(
                f"  {'':14}  server CPU per call: echo {spread(a.cpu_us, '{:.0f}')} µs,"
                f" broker {spread(bb.cpu_us, '{:.0f}')} µs; this load generator's:"
                f" {spread(a.client_cpu_us, '{:.0f}')} µs against echo,"
                f" {spread(bb.client_cpu_us, '{:.0f}')} µs against the broker"
            )
        for name, label in (("p50s", "p50, 1 caller, stream"), ("p50u", "p50, 1 caller, unary ")):
            a, bb = figs[name]
            print(
                f"  {label}: echo {spread(a.p50_ms, '{:.3f}')} ms  broker"
                f" {spread(bb.p50_ms, '{:.3f}')} ms  ratio {spread(ratio(name, 'p50_ms'))}"
                + ("  (target <= 1.3)" if name == "p50s" else "")
            )
        print(
            "  the gap without SQLite (the same broker, its store writing nothing: test fault"
            " store_writes_nothing; same rounds, same echo):"
        )
        for name, label, attr in (
            ("stream", "stream alloc  ", "rates"),
            ("unary", "unary Alloc   ", "rates"),
            ("p50s", "p50 stream    ", "p50_ms"),
        ):
            echo_fig = figs[name][0]
            ns = nostore[name]
            r0 = [y / x for x, y in zip(getattr(echo_fig, attr), getattr(ns, attr), strict=True)]
            cpu = f"; server CPU per call {spread(ns.cpu_us, '{:.0f}')} µs" if ns.cpu_us else ""
            with_store = spread(ratio(name, attr))
            print(f"    {label}: ratio {spread(r0)} without SQLite, {with_store} with{cpu}")
        print(
            "  what fsync per commit costs (--durability fsync, the default, against"
            " page-cache; same rounds; ratio = fsync / page-cache):"
        )
        for name, label, attr in (
            ("stream", "stream alloc  ", "rates"),
            ("unary", "unary Alloc   ", "rates"),
            ("p50s", "p50 stream    ", "p50_ms"),
        ):
            fs = figs[name][1]
            pc = pagecache[name]
            rp = [x / y for x, y in zip(getattr(fs, attr), getattr(pc, attr), strict=True)]
            unit = "/s" if attr == "rates" else " ms"
            fmt = "{:.0f}" if attr == "rates" else "{:.3f}"
            print(
                f"    {label}: fsync {spread(getattr(fs, attr), fmt)}{unit}, page-cache"
                f" {spread(getattr(pc, attr), fmt)}{unit}: ratio {spread(rp)}"
            )
        a, bb = figs["batch"]
        print(
            f"  batched alloc ({BATCH} per request, 4 streams): broker"
            f" {spread(bb.rates, '{:,.0f}')} PASIDs/s (target >= 100,000);"
            f" echo of the same request {spread(a.rates, '{:,.0f}')}/s"
        )
        print(
            f"  {'':14}  server CPU per PASID: broker {spread([c / BATCH for c in bb.cpu_us])} µs"
        )
        a, bb = figs["sync"]
        print(
            f"  sync (thread-pool) echo server, unary: {spread(bb.rates, '{:.0f}')}/s,"
            f" {spread(ratio('sync', 'rates'))}x the aio echo; server CPU per call"
            f" {spread(bb.cpu_us, '{:.0f}')} µs (each open stream would hold one of its threads)"
        )
        print(
            f"  client library: one caller's stream alloc p50 {lib:.3f} ms through"
            f" pasid_client.AsyncSession vs {raw:.3f} ms raw ({lib / raw:.2f}x)"
        )
    finally:
        echo.kill()
        sync_echo.kill()
        b.cleanup()
        b0.cleanup()
        bp.cleanup()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
