"""A session-holding client process for the peer-identity tests.

    python -m tests.e2e.peer_holder ADDRESS [--count N] [--grace S] [--delegate-pid P]
        [--keepalive S] [--stock]

Opens a session (with the library's handshake, or with --stock a plain gRPC stub that
does none), allocates, prints one JSON line, then answers each stdin line "alloc" with
another JSON line. Tests SIGKILL, SIGSTOP or close its stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client, PasidClientError


def stock(args: argparse.Namespace) -> None:
    """What grpcurl or a client in another language does: no handshake, no ticket."""
    with grpc.insecure_channel(args.address) as ch:
        q: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()
        q.put(pb.SessionRequest(tag=0, open=pb.OpenSession(client="stock", pid=os.getpid())))
        replies = pb_grpc.PasidBrokerStub(ch).Session(iter(q.get, None))
        try:
            opened = next(replies).opened
            q.put(
                pb.SessionRequest(tag=1, alloc=pb.AllocRequest(min=1, max=1000, count=args.count))
            )
            got = list(next(replies).alloc.pasids)
        except grpc.RpcError as exc:
            print(json.dumps({"error": exc.code().name, "details": exc.details()}), flush=True)
            return
        out = {"session_id": opened.set_id, "verified": opened.verified, "pasids": got}
        print(json.dumps({**out, "getpid": os.getpid()}), flush=True)
        sys.stdin.read()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--grace", type=int, default=0)
    p.add_argument("--delegate-pid", type=int, default=None)
    p.add_argument("--keepalive", type=float, default=10.0)
    p.add_argument("--stock", action="store_true")
    args = p.parse_args()
    if args.stock:
        return stock(args)
    try:
        with (
            # No reconnect of its own: the tests look at what the broker keeps by itself.
            Client(
                args.address, keepalive_seconds=args.keepalive, reconnect_deadline_seconds=0
            ) as c,
            c.session("peer-holder", grace_seconds=args.grace, delegate_pid=args.delegate_pid) as s,
        ):
            got = s.alloc(1, 1000, args.count)
            print(
                json.dumps(
                    {
                        "session_id": s.session_id,
                        "verified": s.verified,
                        "pasids": got,
                        "getpid": os.getpid(),
                    }
                ),
                flush=True,
            )
            for line in sys.stdin:
                if line.strip() == "alloc":
                    try:
                        print(json.dumps({"pasids": s.alloc(1, 1000, 1)}), flush=True)
                    except PasidClientError as exc:
                        print(
                            json.dumps({"error": exc.code.name, "details": exc.message}), flush=True
                        )
    except PasidClientError as exc:
        print(json.dumps({"error": exc.code.name, "details": exc.message}), flush=True)


if __name__ == "__main__":
    main()
