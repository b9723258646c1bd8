"""A hostile peer-socket client, run as another uid (setpriv) by tests/hostile.

It speaks the handshake socket raw (never through pasid_client): any bytes, any fds.

python -m tests.hostile.peer_hostile PATH cases
    reads JSON lines {"data": <base64>, "fds": [kind, ...], "repeat": N} from stdin and
    answers each with one JSON line {"replies": {"<code>: <error>": count, ...}}: the
    broker's reply to each of the N handshakes ("SILENT" when it closed unanswered).
    Kinds: null, pipe, socket, eventfd, memfd, pidfd:self, pidfd:<pid>.
python -m tests.hostile.peer_hostile PATH halfopen N
    connects N times and never sends; prints {"open": n, "answered_at_once": m} (m: those
    the broker answered and closed within 1.5 s), holds them until stdin closes, then
    prints {"replies": {code: count}}: what the broker had answered each.
python -m tests.hostile.peer_hostile PATH churn
    connects and hangs up in a loop until stdin closes; prints {"connects": n}.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack


def make_fds(kinds: list[str], stack: ExitStack) -> list[int]:
    """Fresh fds of the kinds named (closed by `stack`): the kernel gives the broker copies."""
    out: list[int] = []
    for kind in kinds:
        if kind == "null":
            fds = [os.open("/dev/null", os.O_RDONLY)]
        elif kind == "pipe":
            fds = list(os.pipe())
        elif kind == "socket":
            a, b = socket.socketpair()
            fds = [a.detach(), b.detach()]
        elif kind == "eventfd":
            fds = [os.eventfd(0)]
        elif kind == "memfd":
            fds = [os.memfd_create("hostile")]
        elif kind.startswith("pidfd:"):
            target = kind.split(":", 1)[1]
            fds = [os.pidfd_open(os.getpid() if target == "self" else int(target))]
        else:
            raise ValueError(kind)
        for fd in fds:
            stack.callback(os.close, fd)
        out.append(fds[0])
    return out


def handshake(path: str, data: bytes, fds: list[int]) -> str:
    """One raw handshake: "CODE: error" from the reply, "OK", or "SILENT"."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(30)
        s.connect(path)
        try:
            if fds:
                socket.send_fds(s, [data], fds)
            else:
                s.send(data)
            reply = s.recv(65536)
        except OSError as exc:
            return f"SILENT: {exc.strerror}"
    if not reply:
        return "SILENT"
    ans = json.loads(reply)
    return "OK" if ans.get("ok") else f"{ans['code']}: {ans['error']}"


def cases(path: str) -> None:
    for line in sys.stdin:
        spec = json.loads(line)
        data = base64.b64decode(spec["data"])
        got: Counter[str] = Counter()
        for _ in range(spec.get("repeat", 1)):
            with ExitStack() as stack:
                got[handshake(path, data, make_fds(spec.get("fds", []), stack))] += 1
        print(json.dumps({"replies": dict(got)}), flush=True)


def halfopen(path: str, n: int) -> None:
    held: list[socket.socket] = []
    answered = 0
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:  # the backlog is full: that connection never got in
            s.close()
            continue
        held.append(s)
    p = select.poll()
    for s in held:
        p.register(s.fileno(), select.POLLIN | select.POLLHUP)
    ready: set[int] = set()
    deadline = time.monotonic() + 1.5  # the broker's deadline for silent ones is 2 s
    while len(ready) < len(held) and (left := deadline - time.monotonic()) > 0:
        for fd, _ in p.poll(left * 1000):
            ready.add(fd)
            p.unregister(fd)
    answered = len(ready)
    print(json.dumps({"open": len(held), "answered_at_once": answered}), flush=True)
    sys.stdin.read()
    got: Counter[str] = Counter()
    for s in held:
        try:
            reply = s.recv(65536)
            got[json.loads(reply)["code"] if reply else "SILENT"] += 1
        except BlockingIOError:
            got["UNANSWERED"] += 1
        except OSError as exc:
            got[f"SILENT: {exc.strerror}"] += 1
        s.close()
    print(json.dumps({"replies": dict(got)}), flush=True)


def churn(path: str) -> None:
    stop = threading.Event()
    n = 0

    def loop() -> None:
        nonlocal n
        while not stop.is_set():
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.setblocking(False)
                try:
                    s.connect(path)
                    n += 1
                except BlockingIOError:
                    pass

    t = threading.Thread(target=loop)
    t.start()
    print(json.dumps({"started": True}), flush=True)
    sys.stdin.read()
    stop.set()
    t.join()
    print(json.dumps({"connects": n}), flush=True)


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "cases":
        cases(path)
    elif mode == "halfopen":
        halfopen(path, int(sys.argv[3]))
    elif mode == "churn":
        churn(path)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
