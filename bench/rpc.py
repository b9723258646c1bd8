"""Alloc RPC rate against a bare grpc.aio echo, same socket kind, same run.

Target: alloc >= 0.85x echo. Both servers run in their own process on a Unix socket and
are driven by the same asyncio load generator (CONCURRENCY callers for SECONDS each), so
the ratio cancels the machine and the client's own cost. Four figures: unary echo vs
unary Alloc (+ a Free every so often to stay within the space), and a bidi-stream echo
vs alloc on the Session stream (the path a VMM uses).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import AsyncClient

from tests.harness import ROOT, BrokerProcess, wait_until

SECONDS = float(os.environ.get("BENCH_RPC_SECONDS", "4"))
CONCURRENCY = int(os.environ.get("BENCH_RPC_CONCURRENCY", "16"))


async def drive(call: Callable[[int], Awaitable[None]], seconds: float) -> float:
    """Calls per second with CONCURRENCY workers for `seconds`."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call(w)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return done / (time.perf_counter() - t0)


async def echo_rates(path: str, seconds: float) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
        unary = ch.unary_unary("/bench.Echo/Unary")
        payload = pb.AllocRequest(min=1, max=1 << 19, count=1).SerializeToString()

        async def one(_: int) -> None:
            await unary(payload)

        u = await drive(one, seconds)
        streams = [ch.stream_stream("/bench.Echo/Stream")() for _ in range(CONCURRENCY)]

        async def ping(w: int) -> None:
            await streams[w].write(payload)
            await streams[w].read()

        s = await drive(ping, seconds)
        for st in streams:
            st.cancel()
        return u, s


async def broker_rates(address: str, seconds: float) -> tuple[float, float]:
    async with AsyncClient(address) as c:
        sessions = [await c.session(f"bench{w}") for w in range(CONCURRENCY)]
        count = [0] * CONCURRENCY
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.PasidBrokerStub(ch)

            async def unary_alloc(w: int) -> None:
                s = sessions[w]
                ref = pb.SessionRef(session_id=s.session_id, token=s.token)
                await stub.Alloc(pb.AllocRequest(session=ref, min=1, max=(1 << 20) - 1))
                count[w] += 1
                if count[w] % 500 == 0:  # stay clear of exhausting the space
                    await s.free()

            u = await drive(unary_alloc, seconds)

        async def stream_alloc(w: int) -> None:
            await sessions[w].alloc(1, (1 << 20) - 1)
            count[w] += 1
            if count[w] % 500 == 0:
                await sessions[w].free()

        s = await drive(stream_alloc, seconds)
        for sess in sessions:
            await sess.close()
        return u, s


def main(quick: bool = False) -> int:
    seconds = 1.0 if quick else SECONDS
    d = tempfile.mkdtemp(prefix="pb-bench-", dir="/tmp")
    echo_path = os.path.join(d, "echo.sock")
    echo = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", echo_path],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    b = BrokerProcess("--quota-per-set", "0", "--log-level", "WARNING")
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        b.start()
        wait_until(lambda: b.health() == "SERVING", 10)
        eu, es = asyncio.run(echo_rates(echo_path, seconds))
        au, as_ = asyncio.run(broker_rates(b.address, seconds))
        print(
            f"{CONCURRENCY} concurrent callers, {seconds:.0f} s each, Unix socket, "
            f"grpcio {grpc.__version__}"
        )
        print(f"  unary : echo {eu:8.0f}/s   Alloc {au:8.0f}/s   ratio {au / eu:.2f}")
        print(
            f"  stream: echo {es:8.0f}/s   alloc {as_:8.0f}/s   ratio {as_ / es:.2f}"
            "   (target >= 0.85)"
        )
    finally:
        echo.kill()
        b.cleanup()
    return 0


if __name__ == "__main__":
    main()
