"""Opens a flood of sessions and abandons each at a random point (tests/e2e).

    python -m tests.e2e.open_storm ADDRESS N SEED      (N = 0: until killed)

Each open is cancelled before its request is written, right after, after a random
short wait, or once `opened` has arrived; a quarter present a handshake ticket. Prints
{"opens": N} at the end. Tests also SIGKILL it mid-flood.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import sys

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client.handshake import obtain_ticket, peer_socket_for

CONCURRENCY = 12


async def one(stub: pb_grpc.PasidBrokerStub, rnd: random.Random, peer: str | None) -> None:
    ticket = ""
    if peer is not None and rnd.random() < 0.25:
        ticket = (await asyncio.to_thread(obtain_ticket, peer)).ticket
    call = stub.Session()
    where = rnd.randrange(4)
    try:
        if where == 0:
            call.cancel()
            return
        await call.write(
            pb.SessionRequest(tag=0, open=pb.OpenSession(client="storm", ticket=ticket))
        )
        if where == 2:
            await asyncio.sleep(rnd.random() * 0.003)
        elif where == 3:
            await call.read()
    except grpc.RpcError:
        pass
    finally:
        call.cancel()


async def main(address: str, n: int, seed: int) -> None:
    rnd = random.Random(seed)
    peer = peer_socket_for(address)
    count = itertools.count() if n == 0 else iter(range(n))
    done = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.PasidBrokerStub(ch)

        async def worker() -> None:
            nonlocal done
            for _ in count:
                await one(stub, rnd, peer)
                done += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    print(json.dumps({"opens": done, "pid": os.getpid()}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
