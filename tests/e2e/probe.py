"""A hostile caller's probe, run as another uid by tests/e2e/test_other_uid.py.

argv[1]: JSON list of {"address", "tls": [ca, cert, key] or null, "call"}. Prints a JSON
list with, for each call, "OK" or the gRPC status name it ended with, the result or the
message, the seconds it took, and (for an error) the library's reason.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client, PasidClientError


def run(c: Client, call: str) -> Any:
    if call == "info":
        return c.info().in_use
    if call == "session_alloc":
        with c.session("intruder") as s:
            return s.alloc(1, 100)
    if call == "list_all":
        return c_list_all(c)
    if call == "list_sets":
        return [v.set_id for v in c.list_sets()]
    if call == "list_sets_stock":  # a stock gRPC client: no handshake, no ticket
        try:
            resp = pb_grpc.PasidAdminStub(c._channel).ListSets(pb.ListSetsRequest(), timeout=5)
        except grpc.RpcError as exc:
            raise PasidClientError(exc.code(), exc.details() or "") from None
        return [s.set_id for s in resp.sets]
    if call == "set_quotas":
        return c.set_quotas(per_set=1_000_000, per_client=0, global_=0).quotas.per_set
    if call == "revoke":
        return c.revoke(1, "intruder")
    if call.startswith("resume:"):  # a token it should not have: root's, stolen
        with c.session(resume_token=call.split(":", 1)[1], reconnect_deadline_seconds=0) as s:
            return s.set_id
    if call == "watch":
        with c.watch(1) as w:
            return [(e.kind, e.set_id) for e in itertools.islice(w, 1)]
    raise ValueError(call)


def c_list_all(c: Client) -> Any:
    """List all_sets as a stock client asks it (the library has no call for it)."""
    try:
        stub = pb_grpc.PasidBrokerStub(c._channel)
        resp = stub.List(pb.ListRequest(all_sets=True), timeout=5)
    except grpc.RpcError as exc:
        raise PasidClientError(exc.code(), exc.details() or "") from None
    return [s.set_id for s in resp.sets]


def main() -> None:
    out = []
    for spec in json.loads(sys.argv[1]):
        tls = tuple(spec["tls"]) if spec.get("tls") else None
        t0 = time.monotonic()
        try:
            # The library's own reconnect deadline (60 s): a refused caller must be told
            # at once, not after waiting for a broker as if it were starting.
            with Client(spec["address"], tls=tls, timeout=5) as c:
                got = run(c, spec["call"])
            out.append(["OK", got, time.monotonic() - t0, ""])
        except PasidClientError as exc:
            out.append([exc.code.name, exc.message, time.monotonic() - t0, exc.reason])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
