"""Issue 20, point 1: peer.sock as a hardened boundary, attacked by uid 65534 (setpriv).

Real processes throughout: a broker daemon over its real peer socket, and the hostile
client (tests/hostile/peer_hostile.py) as another uid. After every attack the broker
holds the descriptors it held before (counted in /proc/<pid>/fd), every handshake got
a precise refusal, the log holds no traceback and at most a rate-limited line per uid,
and other uids are still served.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from pasid_client import Client
from pasid_client.handshake import obtain_ticket

from tests.e2e.other_uid import NOBODY, open_for_nobody, require_setpriv, setpriv
from tests.harness import ROOT, BrokerProcess, wait_until
from tests.hostile.common import assert_no_traceback

OTHER = 4242  # a third uid, beside root and the attacker


class Attacker:
    """tests/hostile/peer_hostile.py running as `uid`, fed cases one JSON line each."""

    def __init__(self, peer_path: str, mode: str = "cases", *args: str, uid: int = NOBODY):
        argv = [sys.executable, "-m", "tests.hostile.peer_hostile", peer_path, mode, *args]
        self.proc = subprocess.Popen(
            [*setpriv(uid), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def send(self, data: bytes, fds: Sequence[str] = (), repeat: int = 1) -> Counter[str]:
        """The broker's replies to `repeat` handshakes of `data` with fds of `fds` kinds."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        spec = {"data": base64.b64encode(data).decode(), "fds": list(fds), "repeat": repeat}
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the attacker died (exit {self.proc.poll()})"
        return Counter(json.loads(line)["replies"])

    def line(self) -> Any:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        finally:
            self.proc.kill()


def fd_count(b: BrokerProcess) -> int:
    assert b.proc is not None
    return len(os.listdir(f"/proc/{b.proc.pid}/fd"))


def peer_path(b: BrokerProcess) -> str:
    return str(b.dir / "peer.sock")


def served_as(b: BrokerProcess, uid: int) -> dict[str, Any]:
    """A handshake as `uid` (its own process): the broker's answer."""
    out = subprocess.run(
        [*setpriv(uid), sys.executable, "-m", "tests.peer.peer_client", peer_path(b)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert out.stdout, out.stderr
    ans: dict[str, Any] = json.loads(out.stdout)
    return ans


def assert_fds_back(b: BrokerProcess, baseline: int, what: str) -> None:
    """The broker's descriptors return to `baseline` (a moment for closes in flight)."""
    wait_until(
        lambda: fd_count(b) <= baseline,
        10,
        0.05,
        f"broker fds back to {baseline} after {what} (now {fd_count(b)})",
    )


def refusal_lines(b: BrokerProcess, uid: int) -> list[dict[str, Any]]:
    out = []
    for line in b.read_log().splitlines():
        if '"handshake refused"' in line:
            rec = json.loads(line)
            if rec.get("uid") == uid:
                out.append(rec)
    return out


@pytest.fixture
def exposed() -> Iterator[BrokerProcess]:
    """A broker whose sockets every local user may reach (0666), as in the issue."""
    require_setpriv()
    b = BrokerProcess("--socket-mode", "0666")
    open_for_nobody(b.dir)
    b.start()
    # One honest handshake first, so that whatever the broker opens lazily is counted.
    obtain_ticket(peer_path(b))
    yield b
    b.cleanup()


def test_deep_json_with_16_fds_leaks_nothing_and_logs_one_line(exposed: BrokerProcess) -> None:
    """The issue's attack: b"[" * 4000 with 16 fds, from uid 65534, over and over."""
    b = exposed
    baseline = fd_count(b)
    a = Attacker(peer_path(b))
    try:
        got = a.send(b"[" * 4000, ["null", "pipe", "socket", "eventfd"] * 4, repeat=400)
    finally:
        a.close()
    assert got == Counter(
        {"INVALID_ARGUMENT: handshake nests deeper than 4 levels of JSON": 400}
    ), got
    assert_fds_back(b, baseline, "400 deep handshakes with 16 fds each")
    # One line for the first refusal; the other 399 are counted, not logged (10 s window).
    assert 1 <= len(refusal_lines(b, NOBODY)) <= 2, refusal_lines(b, NOBODY)
    assert_no_traceback(b)
    assert served_as(b, OTHER)["ok"]
    assert obtain_ticket(peer_path(b)).uid == 0


BAD = [
    # (message, fds, the refusal's code and the start of its message)
    (b"[" * 4000, ["null"] * 16, "INVALID_ARGUMENT: handshake nests deeper"),
    (b"{" * 20 + b"}" * 20, ["pipe"], "INVALID_ARGUMENT: handshake nests deeper"),
    (b"\xff\xfe{}", ["eventfd"], "INVALID_ARGUMENT: handshake is not UTF-8"),
    (b'{"v": NaN}', ["null"], "INVALID_ARGUMENT: handshake is not a UTF-8 JSON object"),
    (b'{"v": 1, "fds": ["pidfd"]', ["pidfd:self"], "INVALID_ARGUMENT: handshake is not"),
    (b"x" * 5000, ["null"] * 3, "INVALID_ARGUMENT: handshake longer than 4096 bytes"),
    (b'{"v": 1, "fds": []}', ["null"] * 20, "INVALID_ARGUMENT: at most 16 fds"),
    (b'{"v": 1}', ["socket", "memfd"], "INVALID_ARGUMENT: fds names 0 roles but 2 fds"),
    (b'{"v": 2, "fds": ["pidfd"]}', ["pidfd:self"], "INVALID_ARGUMENT: handshake version 2"),
    (b'{"v": 1, "fds": ["x"]}', ["memfd"], "INVALID_ARGUMENT: fd role 'x' is not accepted"),
    (b'{"v": 1, "fds": ["pidfd"]}', ["eventfd"], "INVALID_ARGUMENT: the fd sent as pidfd"),
    (b'{"v": 1, "fds": ["pidfd"]}', ["pidfd:1"], "PERMISSION_DENIED: uid 65534 may not"),
    (b'{"v": 1, "pid": 1, "fds": ["pidfd"]}', ["pidfd:self"], "PERMISSION_DENIED: declared"),
    (b"", [], "INVALID_ARGUMENT: empty handshake"),
]


def test_every_refusal_closes_every_fd_it_was_sent(exposed: BrokerProcess) -> None:
    b = exposed
    baseline = fd_count(b)
    a = Attacker(peer_path(b))
    try:
        for data, fds, says in BAD:
            got = a.send(data, fds, repeat=25)
            assert len(got) == 1 and next(iter(got)).startswith(says), (data[:40], got)
            assert got.total() == 25
            assert_fds_back(b, baseline, f"{data[:40]!r} with {fds}")
    finally:
        a.close()
    assert len(refusal_lines(b, NOBODY)) <= 2  # 350 refusals, rate-limited per uid
    assert_no_traceback(b)
    assert served_as(b, OTHER)["ok"]
    with Client(b.address) as c:  # and the gRPC side is unaffected
        assert c.info().in_use == 0
