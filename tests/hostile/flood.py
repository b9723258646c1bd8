"""A refusal flood, run as another uid by tests/hostile/test_other_uid_floods.py.

argv: ADDRESS SECONDS. For SECONDS, pipelines Session allocs naming a 65,000-byte device
(each refused: the simulator attaches no devices) and unary Allocs with a bad token; prints
a JSON object with how many of each were sent and refused, and the statuses seen.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

DEVICE = "d" * 65_000


def pipelined(stub: pb_grpc.PasidBrokerStub, until: float, out: Counter[str]) -> None:
    def requests() -> Iterator[pb.SessionRequest]:
        yield pb.SessionRequest(tag=0, open=pb.OpenSession(client="flood"))
        tag = 1
        while time.monotonic() < until:
            out["stream_sent"] += 1
            yield pb.SessionRequest(tag=tag, alloc=pb.AllocRequest(min=1, max=100, device=DEVICE))
            tag += 1

    for resp in stub.Session(requests()):
        if resp.HasField("error"):
            out[f"stream_{resp.error.reason}"] += 1


def unary(stub: pb_grpc.PasidBrokerStub, until: float, out: Counter[str]) -> None:
    bad = pb.SessionRef(session_id=1, token="x" * 32)
    while time.monotonic() < until:
        try:
            stub.Alloc(pb.AllocRequest(session=bad, min=1, max=100, device=DEVICE), timeout=5)
            out["unary_OK"] += 1
        except grpc.RpcError as exc:
            out[f"unary_{exc.code().name}"] += 1


def main() -> None:
    address, seconds = sys.argv[1], float(sys.argv[2])
    until = time.monotonic() + seconds
    out: Counter[str] = Counter()
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.PasidBrokerStub(ch)
        threads = [threading.Thread(target=f, args=(stub, until, out)) for f in (pipelined, unary)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
