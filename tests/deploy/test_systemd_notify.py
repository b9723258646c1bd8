"""sd_notify over a real datagram socket standing in for systemd's NOTIFY_SOCKET: the
broker says STATUS while starting, READY=1 only after recovery, pings WATCHDOG=1 at half
WATCHDOG_USEC, and STOPPING=1 when it drains."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.systemd import Notifier
from tests.harness import BrokerProcess, wait_until


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
