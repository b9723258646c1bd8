"""A handshake client run as its own process (tests/peer): prints one JSON line.

python -m tests.peer.peer_client PATH [--delegate PID] [--raw JSON] [--claim PID]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from pasid_client.errors import PasidClientError
from pasid_client.handshake import obtain_ticket


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--delegate", type=int, default=0)
    p.add_argument("--raw", default="")
    p.add_argument("--fd-role", default="")  # send an eventfd under this role
    args = p.parse_args()
    me = {"getpid": os.getpid(), "uid": os.getuid()}
    if args.raw:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(args.path)
            s.send(args.raw.encode())
            print(json.dumps({**me, **json.loads(s.recv(4096))}), flush=True)
        return
    try:
        fds = [(args.fd_role, os.eventfd(0))] if args.fd_role else []
        pidfd = os.pidfd_open(args.delegate) if args.delegate else None
        t = obtain_ticket(args.path, delegate_pidfd=pidfd, fds=fds)
        out = {**me, "ok": True, **vars(t)}
    except PasidClientError as exc:
        out = {**me, "ok": False, "code": exc.code.name, "error": exc.message}
    print(json.dumps(out), flush=True)
    if os.environ.get("PEER_CLIENT_LINGER"):
        sys.stdin.read()  # stay alive until the test closes our stdin


if __name__ == "__main__":
    main()
