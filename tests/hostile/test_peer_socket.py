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
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pasid_client import Client
from pasid_client.handshake import obtain_ticket

from broker.peer.handshake import HANDSHAKE_SECONDS, MAX_PER_UID
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

    def close(self) -> Any:
        """Close its stdin (its cue to stop); its last line of output, if any."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        assert self.proc.stdout is not None
        last = self.proc.stdout.read().strip().splitlines()
        try:
            self.proc.wait(30)
        finally:
            self.proc.kill()
        return json.loads(last[-1]) if last else None


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


def rate_limited(b: BrokerProcess, uid: int, since: float) -> None:
    """At most one "handshake refused" line for `uid` per 10 s window since `since`
    (time.monotonic()), however many refusals there were; at least one."""
    lines = refusal_lines(b, uid)
    windows = int((time.monotonic() - since) / 10) + 1
    assert 1 <= len(lines) <= windows, (windows, lines)


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
    # Tickets live 1 s: each unused one holds a pidfd until it expires, and the fd counts
    # below are taken once the honest handshakes' tickets are gone.
    b = BrokerProcess("--socket-mode", "0666", "--ticket-seconds", "1")
    open_for_nobody(b.dir)
    b.start()
    # One honest handshake first, so that whatever the broker opens lazily is counted;
    # then its ticket's expiry (1 s) and the sweep after it (every 0.5 s).
    obtain_ticket(peer_path(b))
    time.sleep(1.6)
    yield b
    b.cleanup()


def test_deep_json_with_16_fds_leaks_nothing_and_logs_one_line(exposed: BrokerProcess) -> None:
    """The issue's attack: b"[" * 4000 with 16 fds, from uid 65534, over and over."""
    b = exposed
    baseline = fd_count(b)
    since = time.monotonic()
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
    rate_limited(b, NOBODY, since)
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
    since = time.monotonic()
    a = Attacker(peer_path(b))
    try:
        for data, fds, says in BAD:
            got = a.send(data, fds, repeat=25)
            assert len(got) == 1 and next(iter(got)).startswith(says), (data[:40], got)
            assert got.total() == 25
            assert_fds_back(b, baseline, f"{data[:40]!r} with {fds}")
    finally:
        a.close()
    rate_limited(b, NOBODY, since)  # 350 refusals
    assert_no_traceback(b)
    assert served_as(b, OTHER)["ok"]
    with Client(b.address) as c:  # and the gRPC side is unaffected
        assert c.info().in_use == 0


def timed_handshakes(b: BrokerProcess, n: int = 20, timeout: float = 5.0) -> list[float]:
    """Seconds each of `n` handshakes of root's took, from connect to ticket."""
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert obtain_ticket(peer_path(b), timeout=timeout).uid == 0
        took.append(time.perf_counter() - t0)
    return took


def ms(took: list[float]) -> str:
    return f"median {statistics.median(took) * 1000:.1f} ms, max {max(took) * 1000:.1f} ms"


def test_half_open_connections_of_one_uid_leave_others_served(exposed: BrokerProcess) -> None:
    """Slowloris: uid 65534 holds 400 connections that never send. Those beyond its
    share of handshakes in progress are refused at once, the rest when their deadline
    passes, and root and uid 4242 are answered meanwhile (the issue asks for under
    100 ms: asserted with a generous bound for a loaded machine, and printed)."""
    b = exposed
    baseline = fd_count(b)
    since = time.monotonic()
    quiet = timed_handshakes(b)
    holder = Attacker(peer_path(b), "halfopen", "400")
    try:
        opened = holder.line()
        assert opened["open"] == 400, opened  # none left waiting in a full backlog
        assert opened["answered_at_once"] >= 400 - MAX_PER_UID, opened
        took = timed_handshakes(b)
        assert served_as(b, OTHER)["ok"]
        # Past the deadline, the connections that held a slot are answered too.
        time.sleep(HANDSHAKE_SECONDS + 0.5)
    finally:
        replies = holder.close()
    print(f"\nroot's handshake: alone {ms(quiet)}; beside 400 half-open of uid 65534 {ms(took)}")
    assert max(took) < 1.0, took
    # Each was answered precisely: over the cap at once, the rest at their deadline (more
    # than MAX_PER_UID of those where a slow machine took over 2 s to connect all 400).
    got = replies["replies"]
    assert set(got) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, got
    assert sum(got.values()) == 400 and got["DEADLINE_EXCEEDED"] >= MAX_PER_UID, got
    assert_fds_back(b, baseline, "400 half-open connections")
    rate_limited(b, NOBODY, since)  # hundreds of refusals
    assert_no_traceback(b)


def test_connect_flood_of_one_uid_does_not_starve_the_accept_loop(
    exposed: BrokerProcess,
) -> None:
    """uid 65534 connects and hangs up as fast as it can, beside 400 half-open
    connections: the accept loop never waits for a slot, so root's handshake still gets
    in and is answered. Its latency then grows with how fast the flood fills the listen
    backlog against the broker's CPU (printed; asserted only as answered, within 20 s)."""
    b = exposed
    baseline = fd_count(b)
    holder = Attacker(peer_path(b), "halfopen", "400")
    churn = Attacker(peer_path(b), "churn")
    try:
        holder.line()
        churn.line()
        took = timed_handshakes(b, timeout=20.0)
    finally:
        churned = churn.close()
        holder.close()
    assert served_as(b, OTHER)["ok"]
    print(f"\nroot's handshake during a connect flood ({churned['connects']} connects): {ms(took)}")
    assert max(took) < 20.0, took
    assert_fds_back(b, baseline, "a connect flood")
    assert_no_traceback(b)


def test_a_burst_of_honest_handshakes_from_one_uid_is_served(exposed: BrokerProcess) -> None:
    """The per-uid cap is on connections that have not sent: 100 handshakes of one uid at
    once (more than its MAX_PER_UID waiting slots), each sending as clients do, all get
    tickets."""
    b = exposed
    barrier = threading.Barrier(100)

    def one() -> int:
        barrier.wait(30)
        return obtain_ticket(peer_path(b), timeout=30).uid

    with ThreadPoolExecutor(100) as pool:
        uids = list(pool.map(lambda _: one(), range(100)))
    assert uids == [0] * 100
    assert_no_traceback(b)
