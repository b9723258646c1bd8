"""sd_notify over a real datagram socket standing in for systemd's NOTIFY_SOCKET: the
broker says STATUS while starting, READY=1 only after recovery, pings WATCHDOG=1 at half
WATCHDOG_USEC, STOPPING=1 when it drains, and "not ready" while its commits fail."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pasid_client import Client, Unavailable

from broker.systemd import Notifier
from tests.harness import LAUNCHER, ROOT, BrokerProcess, wait_until


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp(prefix="pbn-", dir="/tmp")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.05)
    yield s, path
    s.close()
    os.unlink(path)
    os.rmdir(d)


def _drain(s: socket.socket, into: list[str]) -> list[str]:
    while True:
        try:
            into.append(s.recv(4096).decode())
        except TimeoutError:
            return into


def test_ready_after_recovery_watchdog_and_stopping(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    b = BrokerProcess(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    try:
        b.start(wait=False)
        got: list[str] = []
        wait_until(lambda: any("READY=1" in m for m in _drain(sock, got)), 30, 0.01, "READY=1")
        ready = next(i for i, m in enumerate(got) if "READY=1" in m)
        # Health says SERVING when READY=1 is sent: recovery is over.
        assert b.health() == "SERVING"
        statuses = [m for m in got[:ready] if m.startswith("STATUS=")]
        assert any("recovering" in m for m in statuses), got
        assert "STATUS=serving on unix:" in got[ready]
        # Watchdog: pings every 0.1 s (half of 0.2 s).
        time.sleep(0.6)
        pings = sum(m == "WATCHDOG=1" for m in _drain(sock, got))
        assert pings >= 3, got
        assert b.stop() == 0
        after: list[str] = []
        _drain(sock, after)
        assert any(m.startswith("STOPPING=1\nSTATUS=draining") for m in after), after
    finally:
        b.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chattr)")
def test_status_and_readiness_while_commits_fail(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """Commits failing (the database and its WAL made immutable: every write EPERM,
    SQLITE_IOERR_WRITE): STATUS says so and `pasid-broker health` exits 1 NOT_SERVING
    (its --service liveness 0 SERVING); writable again, the broker's probe write lands
    and both say it serves again, with no request."""
    sock, path = notify_socket
    b = BrokerProcess(env={"NOTIFY_SOCKET": path})
    try:
        b.start()
        got: list[str] = []
        wait_until(lambda: any("READY=1" in m for m in _drain(sock, got)), 30, 0.01, "READY=1")
        assert _health(b) == (0, f"unix:{b.socket}: SERVING")
        files = [b.db, b.db + "-wal"]
        subprocess.run(["chattr", "+i", *files], check=True)
        try:
            with (
                Client(b.address, reconnect_deadline_seconds=0) as c,
                pytest.raises(Unavailable, match="SQLITE_IOERR"),
            ):
                c.session("vm")

            def failing() -> bool:
                return any(
                    m.startswith(
                        "STATUS=not ready: commits are failing (store commit failed:"
                        " SQLITE_IOERR_WRITE"
                    )
                    for m in _drain(sock, got)
                )

            wait_until(failing, 10, 0.01, "STATUS not ready")
            assert _health(b) == (1, f"unix:{b.socket}: NOT_SERVING")
            assert _health(b, "--service", "liveness") == (0, f"unix:{b.socket}: SERVING")
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)
        n = len(got)
        wait_until(
            lambda: any(m.startswith("STATUS=serving on unix:") for m in _drain(sock, got)[n:]),
            10, 0.01, "STATUS serving again",
        )  # fmt: skip
        assert _health(b) == (0, f"unix:{b.socket}: SERVING")
    finally:
        b.cleanup()


def _health(b: BrokerProcess, *args: str) -> tuple[int, str]:
    """`pasid-broker health` (through the test launcher) on `b`: exit status, output."""
    r = subprocess.run(
        [sys.executable, "-m", LAUNCHER, "health", "--address", b.address, *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    return r.returncode, r.stdout.strip()


def test_refused_start_says_why_in_status(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    first = BrokerProcess().start()
    try:
        second = BrokerProcess(workdir=str(Path(first.socket).parent), env={"NOTIFY_SOCKET": path})
        second.db = second.db + "2"
        second.start(wait=False)
        assert second.proc is not None and second.proc.wait(30) == 2
        got = _drain(sock, [])
        assert not any("READY=1" in m for m in got)
        assert any(m.startswith("STATUS=cannot start:") and "in use by pid" in m for m in got)
    finally:
        first.cleanup()


def test_abstract_address_and_no_listener() -> None:
    name = f"pasid-broker-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert Notifier("@" + name).ready("ok")
        assert s.recv(100) == b"READY=1\nSTATUS=ok"
    assert not Notifier("").ready("ok")  # outside systemd: nothing, no error
    assert not Notifier("/nonexistent/notify").status("x")  # a broken socket: logged, not fatal


def test_watchdog_only_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/x")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_env().watchdog_seconds == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier.from_env().watchdog_seconds == 0.0
