"""A delegating client, run as another uid (setpriv) by tests/hostile/test_delegation.py.

python -m tests.hostile.delegate_probe ADDRESS PEER_SOCKET PID [--thread] ACTION...

Each action does its own delegating handshake for process PID (a pidfd opened here,
with PIDFD_THREAD under --thread, so that PID may be a thread's id) and prints one JSON
line per action: {"action", "status": "OK" or a status name, "detail"}.

- handshake: the broker's answer (uid, gid, pid, delegated) or its refusal;
- list_all: List(all_sets) with the delegated ticket in pasid-ticket;
- watch_all: Watch with no session, the same way (DEADLINE_EXCEEDED: it was let in);
- alloc: a session for PID through the client library (delegate_pid), 5 PASIDs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client, PasidClientError
from pasid_client.handshake import TICKET_METADATA, obtain_ticket

PIDFD_THREAD = os.O_EXCL  # include/uapi/linux/pidfd.h (Linux 6.9)


def delegated_ticket(peer: str, pid: int, thread: bool) -> str:
    fd = os.pidfd_open(pid, PIDFD_THREAD if thread else 0)
    try:
        return obtain_ticket(peer, delegate_pidfd=fd).ticket
    finally:
        os.close(fd)


def act(address: str, peer: str, pid: int, thread: bool, action: str) -> Any:
    if action == "handshake":
        fd = os.pidfd_open(pid, PIDFD_THREAD if thread else 0)
        try:
            t = obtain_ticket(peer, delegate_pidfd=fd)
        finally:
            os.close(fd)
        return {"uid": t.uid, "gid": t.gid, "pid": t.pid, "delegated": t.delegated}
    if action == "alloc":
        with Client(address, timeout=5) as c, c.session("delegated", delegate_pid=pid) as s:
            return s.alloc(1, 1000, 5)
    md = ((TICKET_METADATA, delegated_ticket(peer, pid, thread)),)
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.PasidBrokerStub(ch)
        if action == "list_all":
            resp = stub.List(pb.ListRequest(all_sets=True), metadata=md)
            return [s.set_id for s in resp.sets]
        if action == "watch_all":
            return [e.set_id for e in stub.Watch(pb.WatchRequest(), metadata=md, timeout=1)]
    raise ValueError(action)


def main() -> None:
    address, peer, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    thread = "--thread" in sys.argv
    for action in [a for a in sys.argv[4:] if a != "--thread"]:
        try:
            out = {"status": "OK", "detail": act(address, peer, pid, thread, action)}
        except PasidClientError as exc:
            out = {"status": exc.code.name, "detail": exc.message}
        except grpc.RpcError as exc:
            out = {"status": exc.code().name, "detail": exc.details()}
        print(json.dumps({"action": action, **out}), flush=True)


if __name__ == "__main__":
    main()
