"""A PeerServer on a real SOCK_SEQPACKET socket, served by an event loop in a thread;
clients are separate processes (tests/peer/peer_client.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from broker.peer import PeerServer, TicketBook
from broker.peer.handshake import FdCheck
from tests.harness import ROOT

T = TypeVar("T")


class ManualClock:
    """A monotonic clock that moves only when a test says so: a ticket's expiry is then
    the test's decision, not a race between a short TTL and a loaded machine."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class PeerFixture:
    def __init__(
        self,
        ttl: float = 30.0,
        fd_checks: dict[str, FdCheck] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix="pp-", dir="/tmp")
        os.chmod(self.dir, 0o755)  # other uids (setpriv) must reach the socket
        self.path = os.path.join(self.dir, "peer.sock")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.book = TicketBook(ttl, clock=clock)
        self.server = PeerServer(self.path, self.book, mode=0o666, fd_checks=fd_checks)
        self.call(self._start())

    async def _start(self) -> None:
        self.server.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.call(run())

    def client(self, *args: str, prefix: tuple[str, ...] = (), linger: bool = False) -> Any:
        """Run a handshake client process; its JSON answer (and the process if lingering)."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if linger:
            env["PEER_CLIENT_LINGER"] = "1"
        cmd = [*prefix, sys.executable, "-m", "tests.peer.peer_client", self.path, *args]
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        assert p.stdout is not None
        line = p.stdout.readline()
        if not linger:
            p.communicate(timeout=10)
        assert line, f"client {cmd} printed nothing (exit {p.poll()})"
        ans = json.loads(line)
        return (ans, p) if linger else ans

    def close(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def peer() -> Iterator[PeerFixture]:
    f = PeerFixture()
    yield f
    f.close()


def need(tool: str, *probe: str) -> None:
    """Skip (saying why) where a tool the test runs is missing or not permitted."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    r = subprocess.run([tool, *probe, "true"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"{tool} {' '.join(probe)} is not permitted here: {r.stderr.strip()}")
