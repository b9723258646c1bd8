"""Idle connections held open on a Unix socket, run as another uid by
tests/hostile/test_other_uid_floods.py.

argv: PATH N SECONDS. Keeps N connections to PATH open for SECONDS: each sends the
HTTP/2 preface and an empty SETTINGS frame, then nothing; those the broker closes are
reopened once a second (non-blocking connects: a full backlog does not stall the
loop). Prints a JSON object: connections opened in all, most open at once, and how
many the broker closed.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def main() -> None:
    path, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    until = time.monotonic() + seconds
    open_: dict[int, socket.socket] = {}
    poller = select.epoll()
    out = {"opened": 0, "most_open": 0, "closed_by_broker": 0, "connect_failed": 0}
    refill = 0.0
    while time.monotonic() < until:
        while len(open_) < n and time.monotonic() >= refill:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
                s.send(PREFACE)
            except OSError:  # EAGAIN: the backlog is full
                out["connect_failed"] += 1
                s.close()
                break
            open_[s.fileno()] = s
            poller.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            out["opened"] += 1
        if len(open_) < n and time.monotonic() >= refill:
            refill = time.monotonic() + 1.0
        out["most_open"] = max(out["most_open"], len(open_))
        for fd, ev in poller.poll(0.2):
            s = open_[fd]
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data or ev & (select.EPOLLRDHUP | select.EPOLLHUP):
                poller.unregister(fd)
                del open_[fd]
                s.close()
                out["closed_by_broker"] += 1
    print(json.dumps(out))
    os._exit(0)  # thousands of sockets: let the kernel close them


if __name__ == "__main__":
    main()
