"""A session outlives its broker's restart (issue 19 point 4): real broker processes,
killed (SIGKILL) and stopped (SIGTERM) under sessions of this process.

The session reconnects and resumes by itself; the application hears of it only through
`on_state_change` and `state`; a request in flight when the broker died fails with
OutcomeUnknown and is never sent twice; requests made meanwhile wait for the resume; an
open waits for a broker that is starting; and after `reconnect_deadline_seconds` without a
broker the session is lost, with a typed error.

The broker keeps a verified holder's set, detached, for as long as the holder lives
(issue 19); the resumes here come within seconds anyway.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from pasid.v1 import broker_pb2 as pb
from pasid_client import (
    AsyncClient,
    Client,
    OutcomeUnknown,
    Session,
    SessionLost,
    SessionState,
    StateChange,
    Unavailable,
)
from pasid_client.errors import InvalidArgument, OutOfRange, PasidClientError, PermissionDenied
from pasid_client.reconnect import Backoff, HeldPasids, when_ready

from tests.harness import ROOT, BrokerProcess, wait_until

Make = Callable[..., BrokerProcess]


class Changes:
    """What on_state_change reported, from whichever thread."""

    def __init__(self) -> None:
        self.seen: list[StateChange] = []
        self._lock = threading.Lock()

    def __call__(self, change: StateChange) -> None:
        with self._lock:
            self.seen.append(change)

    def states(self) -> list[SessionState]:
        with self._lock:
            return [c.state for c in self.seen]


def wait_resumed(s: Session, b: BrokerProcess) -> None:
    """Until the session is RESUMED; failing, with the broker's log to say why."""
    try:
        wait_until(lambda: s.state is SessionState.RESUMED, 30, 0.02, "the resume")
    except AssertionError:
        log = b.read_log().splitlines()
        raise AssertionError(f"not resumed ({s.state}):\n" + "\n".join(log[-30:])) from None


def held_by_broker(b: BrokerProcess) -> dict[int, tuple[str, tuple[tuple[int, int], ...]]]:
    with Client(b.admin_address) as a:
        return {s.set_id: (s.state, s.ranges) for s in a.list_sets()}


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_a_session_resumes_its_set_after_a_broker_restart(make_broker: Make, how: str) -> None:
    b = make_broker()
    changes = Changes()
    with Client(b.address) as c, c.session("vmm", on_state_change=changes) as s:
        assert s.verified and s.grace_seconds == 0
        got = s.alloc(1, 100, count=4)
        s.free(2, 2)
        if how == "kill -9":
            b.kill(signal.SIGKILL)
        else:
            assert b.stop() == 0
        b.start()
        wait_resumed(s, b)
        assert changes.states() == [SessionState.RECONNECTING, SessionState.RESUMED]
        assert changes.seen[0].error is not None and changes.seen[1].conflicts == ()
        assert s.resumed and s.reconnects == 1 and s.held == [(1, 1), (3, 4)]
        assert held_by_broker(b) == {s.set_id: ("attached", ((1, 1), (3, 4)))}
        assert s.alloc(1, 100) == [2]  # the same stream serves again
        assert s.list().ranges == ((1, got[-1]),)
    assert held_by_broker(b) == {}  # leaving the block released the set


def test_an_async_session_resumes_and_waits_out_the_restart(make_broker: Make) -> None:
    """Requests made while the broker is away wait for the resume, then go."""
    b = make_broker()
    changes = Changes()

    async def run() -> None:
        async with (
            AsyncClient(b.address) as c,
            c.session("vmm-async", on_state_change=changes) as s,
        ):
            assert await s.alloc(1, 100, count=3) == [1, 2, 3]
            b.kill(signal.SIGKILL)
            await asyncio.sleep(0.3)  # the session has seen its stream break
            assert s.state is SessionState.RECONNECTING
            waiting = asyncio.ensure_future(s.alloc(1, 100))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            await asyncio.to_thread(b.start)
            assert await asyncio.wait_for(waiting, 30) == [4]
            assert s.state is SessionState.RESUMED and s.held == [(1, 4)]

    asyncio.run(run())
    assert changes.states() == [SessionState.RECONNECTING, SessionState.RESUMED]


def test_a_request_in_flight_when_the_broker_dies_is_not_sent_again(make_broker: Make) -> None:
    """The broker is frozen, an alloc sent, then the broker killed: the alloc's outcome is
    unknown to the client (here it never ran), so it fails OutcomeUnknown; the session
    resumes, and its listing says what the set holds."""
    b = make_broker()
    assert b.proc is not None
    with Client(b.address) as c, c.session("vmm") as s:
        assert s.alloc(1, 100, count=2) == [1, 2]
        pool = ThreadPoolExecutor(1)
        b.proc.send_signal(signal.SIGSTOP)
        in_flight = pool.submit(s.alloc, 1, 100)
        time.sleep(0.5)
        b.kill(signal.SIGKILL)
        with pytest.raises(OutcomeUnknown, match="may or may not have been applied"):
            in_flight.result(30)
        pool.shutdown()
        b.start()
        assert s.list().ranges == ((1, 2),)  # waits for the resume
        assert s.state is SessionState.RESUMED
        assert s.alloc(1, 100) == [3]  # sent once, by us, now


def test_the_session_is_lost_after_the_deadline(make_broker: Make) -> None:
    b = make_broker()
    changes = Changes()
    with Client(b.address, reconnect_deadline_seconds=2) as c:
        s = c.session("vmm", on_state_change=changes)
        s.alloc(1, 100)
        t0 = time.monotonic()  # the deadline starts once the stream breaks, after this
        b.kill(signal.SIGKILL)
        wait_until(lambda: s.state is SessionState.LOST, 30, 0.02, "the deadline")
        waited = time.monotonic() - t0
        assert changes.states() == [SessionState.RECONNECTING, SessionState.LOST]
        lost = changes.seen[-1].error
        assert isinstance(lost, SessionLost) and "not resumed within 2 s" in lost.message
        with pytest.raises(SessionLost):
            s.alloc(1, 100)
        assert isinstance(s.wait_ended(), SessionLost)
    assert waited >= 2.0  # it tried for the whole deadline


def test_an_open_waits_for_a_broker_that_is_starting(make_broker: Make) -> None:
    """Opened before the broker's socket exists: the open waits (gRPC wait-for-ready, the
    missing socket, then UNAVAILABLE while it recovers) and is verified, not anonymous."""
    b = make_broker(start=False)
    with Client(b.address) as c, ThreadPoolExecutor(1) as pool:
        opening = pool.submit(c.session, "early")
        time.sleep(1.0)
        assert not opening.done()
        b.start(wait=False)
        s = opening.result(60)
        assert s.verified and s.alloc(1, 10) == [1]
        s.close()


@pytest.mark.parametrize("api", ["sync", "async"])
def test_an_open_waits_for_a_broker_that_is_recovering(make_broker: Make, api: str) -> None:
    """Opened while the broker listens but still recovers (every call UNAVAILABLE,
    NOT_READY; held there by a test fault): the open, blocking and asyncio alike, waits
    for the recovery within the deadline instead of failing, and is verified."""
    b = make_broker(start=False)
    b.env["PASID_BROKER_TEST_FAULTS"] = "recovery_delay_ms=4000"
    b.start(wait=False)
    wait_until(lambda: b.health() == "NOT_SERVING", 30, 0.02, "the broker to recover")

    async def open_async() -> tuple[bool, list[int], str]:
        async with AsyncClient(b.address) as c, c.session("early-async") as s:
            state = b.health()  # what the broker said as the open returned
            return s.verified, await s.alloc(1, 10), state

    def open_sync() -> tuple[bool, list[int], str]:
        with Client(b.address) as c, c.session("early") as s:
            return s.verified, s.alloc(1, 10), b.health()

    verified, got, health = open_sync() if api == "sync" else asyncio.run(open_async())
    assert verified and got == [1] and health == "SERVING"


def test_an_async_session_is_lost_after_the_deadline(make_broker: Make) -> None:
    """AsyncSession gives up as Session does: LOST after reconnect_deadline_seconds,
    heard by on_state_change, and every later call raises SessionLost."""
    b = make_broker()
    changes = Changes()

    async def run() -> float:
        async with AsyncClient(b.address, reconnect_deadline_seconds=2) as c:
            s = await c.session("vmm-async", on_state_change=changes)
            await s.alloc(1, 100)
            t0 = time.monotonic()
            b.kill(signal.SIGKILL)
            ended = await asyncio.wait_for(s.wait_ended(), 30)
            waited = time.monotonic() - t0
            assert isinstance(ended, SessionLost) and s.state is SessionState.LOST
            with pytest.raises(SessionLost):
                await s.alloc(1, 100)
            return waited

    assert asyncio.run(run()) >= 2.0
    assert changes.states() == [SessionState.RECONNECTING, SessionState.LOST]


def test_an_open_gives_up_at_the_deadline(tmp_path: object) -> None:
    with Client(socket=f"{tmp_path}/none.sock", reconnect_deadline_seconds=1) as c:
        t0 = time.monotonic()
        with pytest.raises(Exception, match="UNAVAILABLE"):
            c.session("nobody")
        assert time.monotonic() - t0 >= 1.0


def test_when_ready_waits_for_a_starting_broker_and_says_so_once(make_broker: Make) -> None:
    """The wait pasidctl's watch and top start with: GetInfo before the broker's socket
    exists, retried (missing socket, then UNAVAILABLE while it recovers) until it answers;
    `waiting` hears the first failure only."""
    b = make_broker(start=False)
    heard: list[PasidClientError] = []
    with Client(b.address) as c, ThreadPoolExecutor(1) as pool:
        asking = pool.submit(when_ready, c.info, 60, waiting=heard.append)
        time.sleep(1.0)
        assert not asking.done()
        b.start(wait=False)
        assert asking.result(60).backend
    assert len(heard) == 1 and isinstance(heard[0], Unavailable), heard


@pytest.mark.parametrize(
    "final",
    [
        PermissionDenied(grpc.StatusCode.PERMISSION_DENIED, "not in its group", "SOCKET_ACCESS"),
        OutOfRange(grpc.StatusCode.OUT_OF_RANGE, "revision 3 compacted"),
        InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "bad"),
    ],
)
def test_when_ready_raises_a_refusal_at_once(final: PasidClientError) -> None:
    """Only "not there yet" is waited for: a call that no retry can help fails on its
    first try, without a sleep. (The call is a stand-in raising a typed error: which
    errors are final is the rule tested here, the real refusals in test_other_uid.)"""
    calls: list[int] = []
    slept: list[float] = []

    def call() -> None:
        calls.append(1)
        raise final

    with pytest.raises(type(final)):
        when_ready(call, 60, sleep=slept.append)
    assert (len(calls), slept) == (1, [])


def test_when_ready_with_no_deadline_tries_once(tmp_path: object) -> None:
    with Client(socket=f"{tmp_path}/none.sock") as c:
        heard: list[PasidClientError] = []
        with pytest.raises(Unavailable):
            when_ready(c.info, 0, waiting=heard.append)
        assert heard == []


def test_leaving_the_client_releases_its_sessions(make_broker: Make) -> None:
    """Every session the client opened ends by a release, before close() returns."""
    b = make_broker()
    with Client(b.address) as c:
        for name in ("a", "b"):
            c.session(name).alloc(1, 100, count=2)  # never closed by hand
        assert len(held_by_broker(b)) == 2
    assert held_by_broker(b) == {}


def test_held_follows_every_acknowledged_change() -> None:
    h = HeldPasids()
    h.add([1, 2, 3, 7, 8])
    h.free(2, 2)
    assert h.ranges() == [(1, 1), (3, 3), (7, 8)]
    h.free(0, 2**32 - 1)
    assert h.ranges() == []
    h.replace([(5, 6)])
    h.drop([(6, 6)])
    assert h.ranges() == [(5, 5)]
    h.add([9, 10, 11])
    req = h.witness(pb.OpenSession(resume_token="t"))
    assert req.witness and [(r.min, r.max) for r in req.held] == [(5, 5), (9, 11)]
    assert not HeldPasids().witness(pb.OpenSession()).held  # "I hold nothing", said
    delays = [Backoff(0.05, 2.0).next() for _ in range(1)] + [
        d for b in [Backoff(0.05, 2.0)] for d in [b.next() for _ in range(10)]
    ]
    assert all(0 < d <= 2.0 for d in delays) and max(delays) > 0.5


def test_release_and_detach_are_explicit(make_broker: Make) -> None:
    """release() ends the set now and says how many PASIDs it held; detach() lets go of
    the stream without releasing (the verified set lives on, detached) and stops
    reconnecting; a later session re-attaches it without its token."""
    b = make_broker()
    with Client(b.address) as c:
        s = c.session("released", grace_seconds=30)
        s.alloc(1, 100, count=3)
        assert s.release() == 3 and s.state is SessionState.CLOSED
        assert held_by_broker(b) == {}  # whatever its grace
        with pytest.raises(Unavailable, match="released"):
            s.alloc(1, 100)
        d = c.session("detached")
        d.alloc(1, 100, count=2)
        d.detach()
        assert d.state is SessionState.CLOSED
        wait_until(lambda: held_by_broker(b) == {d.set_id: ("detached", ((1, 2),))}, 10)
        (view,) = c.held_sets()
        assert view.set_id == d.set_id and view.state == "detached"
        with c.session(reattach_set_id=d.set_id) as again:
            assert again.resumed and again.held == [(1, 2)]  # re-read on the re-attach
            assert again.alloc(1, 100) == [3]
    assert held_by_broker(b) == {}


def test_the_session_witnesses_its_set_after_a_restore(tmp_path: Path) -> None:
    """Issue 22 point 2 through the library: the broker is restored from a backup that
    predates half of the session's PASIDs; the session resumes by itself, states what it
    holds, and hears (RESUMED: reclaimed) that the broker took the lost ones back."""
    b = BrokerProcess("--restart-grace", "300")
    changes = Changes()
    b.start()
    try:
        with Client(b.address) as c:
            a = c.session("vm-a", on_state_change=changes)
            assert a.alloc(1, 100, count=4) == [1, 2, 3, 4]
            backup = tmp_path / "backup.db"
            assert _broker("backup", "--db", b.db, str(backup)).returncode == 0
            assert a.alloc(1, 100, count=4) == [5, 6, 7, 8]  # after the backup
            assert b.stop() == 0
            r = _broker("restore", "--db", b.db, "--socket", b.socket, str(backup))
            assert r.returncode == 0, r.stderr
            b.start()
            wait_resumed(a, b)
            resumed = changes.seen[-1]
            assert (resumed.reclaimed, resumed.conflicts) == (((5, 8),), ())
            assert a.held == [(1, 8)] and a.list().ranges == ((1, 8),)
            assert a.alloc(1, 100) == [9]
    finally:
        b.cleanup()


def _broker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
