"""Watch streams as many as one uid can open, run as another uid by
tests/hostile/test_other_uid_floods.py.

argv: ADDRESS N. Opens one session (verified: the client library's handshake), then N
Watches of it presenting a peer ticket each and N more without one (all count under the
uid, the set's owner); then an anonymous session (no ticket) and N Watches of it (the
anonymous share). Prints a JSON object: how many of each were admitted, and the status
and message of the first refusal of each kind.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client


def admitted(calls: list[Any], out: dict[str, Any], kind: str) -> None:
    """A refused Watch ends at once; an admitted one stays open (nothing to send)."""
    time.sleep(3.0)
    done = [c for c in calls if c.done()]
    out[kind] = len(calls) - len(done)
    if done:
        out[f"{kind}_refusal"] = [done[0].code().name, done[0].details()]


def main() -> None:
    address, n = sys.argv[1], int(sys.argv[2])
    out: dict[str, Any] = {}
    with Client(address, timeout=10) as c, c.session("watcher", grace_seconds=0) as s:
        stub = pb_grpc.PasidBrokerStub(c._channel)
        req = pb.WatchRequest(session=pb.SessionRef(session_id=s.session_id, token=s.token))
        ticketed = [stub.Watch(req, metadata=c._identity()) for _ in range(n)]
        admitted(ticketed, out, "ticketed")
        unticketed = [stub.Watch(req) for _ in range(n)]
        admitted(unticketed, out, "unticketed")
        out["verified"] = s.verified
        opened = threading.Event()
        hold = threading.Event()
        anon: dict[str, Any] = {}

        def requests() -> Iterator[pb.SessionRequest]:
            yield pb.SessionRequest(tag=0, open=pb.OpenSession(client="anon"))
            hold.wait()

        def anonymous_session() -> None:
            for resp in stub.Session(requests()):
                anon["ref"] = pb.SessionRef(
                    session_id=resp.opened.session_id, token=resp.opened.token
                )
                opened.set()

        t = threading.Thread(target=anonymous_session, daemon=True)
        t.start()
        opened.wait(10)
        anonymous = [stub.Watch(pb.WatchRequest(session=anon["ref"])) for _ in range(n)]
        admitted(anonymous, out, "anonymous")
        for call in ticketed + unticketed + anonymous:
            call.cancel()
        hold.set()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
