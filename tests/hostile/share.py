"""The most of the namespace one uid can take, run as another uid by
tests/hostile/test_other_uid_floods.py.

argv: ADDRESS (a broker with 12-bit PASIDs). Allocates on a verified session (the
client library's handshake) until refused, then on an anonymous one (a stock gRPC
Session stream, no ticket) until refused; prints a JSON object with how many each got
and the refusal's message.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client, QuotaExceeded


def verified(address: str, out: dict[str, Any]) -> Client:
    c = Client(address, timeout=10)
    s = c.session("mine", grace_seconds=60)
    got = 0
    for count in (64, 1):  # all-or-nothing: in large steps, then the last few
        try:
            while True:
                got += len(s.alloc(1, 4095, count=count))
        except QuotaExceeded as exc:
            out["verified"], out["verified_refusal"] = got, exc.message
    return c


def anonymous(address: str, out: dict[str, Any]) -> None:
    def requests() -> Iterator[pb.SessionRequest]:
        yield pb.SessionRequest(tag=0, open=pb.OpenSession(client="anon", grace_seconds=60))
        for tag in range(1, 1000):
            yield pb.SessionRequest(tag=tag, alloc=pb.AllocRequest(min=1, max=4095, count=1))

    got = 0
    with grpc.insecure_channel(address) as ch:
        for resp in pb_grpc.PasidBrokerStub(ch).Session(requests(), timeout=60):
            if resp.HasField("opened"):
                out["anonymous_verified"] = resp.opened.verified
            elif resp.HasField("error"):
                out["anonymous_refusal"] = [resp.error.reason, resp.error.message]
                break
            else:
                got += len(resp.alloc.pasids)
    out["anonymous"] = got


def main() -> None:
    out: dict[str, Any] = {}
    c = verified(sys.argv[1], out)
    anonymous(sys.argv[1], out)
    c.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
