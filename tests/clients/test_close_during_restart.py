"""An explicit release is not lost because the broker was restarting (issue 19 point 1):
real broker processes, killed (SIGKILL), drained (SIGTERM) or frozen under sessions that
are closed meanwhile.

close() (of a session, of its client; pasidctl hold's Ctrl-C) goes on reconnecting,
resumes or re-attaches the set as a reconnect does, and releases it once the broker is
back, within `reconnect_deadline_seconds` (plus the client's timeout). A broker that
never comes back does not hold close() longer: it returns, `kept` set, and the broker
keeps the set as after any broken stream (until its holder exits). The holder here is
this test process (or a `sleep` a pasidctl delegates), alive throughout: only the
release can have freed the sets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pasid_client import Client, Session, SessionState

from tests.clients.test_pasidctl_restart import Command
from tests.harness import ROOT, BrokerProcess, wait_until

Make = Callable[..., BrokerProcess]


def sets_json(b: BrokerProcess) -> list[dict[str, object]]:
    """`pasidctl sets --json`, as an operator would look."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASID_")}
    done = subprocess.run(
        [sys.executable, "-m", "pasid_client.cli", "sets", "--json", "--socket", b.socket],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    sets: list[dict[str, object]] = json.loads(done.stdout)["sets"]
    return sets


def set_ids(b: BrokerProcess) -> set[object]:
    return {s["set_id"] for s in sets_json(b)}


def reconnecting(s: Session) -> None:
    wait_until(lambda: s.state is SessionState.RECONNECTING, 30, 0.02, "the stream to break")


@pytest.mark.parametrize(
    "closed_by",
    [
        "session.close()",
        "leaving the client's with",
        "a re-attached session (no token)",
        "an anonymous session (token)",
    ],
)
def test_a_set_closed_while_the_broker_is_down_is_released_after_its_restart(
    make_broker: Make, closed_by: str
) -> None:
    """Each way back to the set: the token, the holder's ticket for a session that was
    re-attached (it has no token), and the token of an anonymous session (no peer
    socket), whose set would otherwise wait out --restart-grace (120 s here)."""
    b = make_broker("--restart-grace", "120")
    anonymous = closed_by.startswith("an anonymous")
    c = Client(b.address, peer_socket="/nonexistent/peer.sock" if anonymous else None)
    try:
        s = c.session("vmm")
        assert s.verified is not anonymous
        pasids = s.alloc(1, 100, count=3)
        if closed_by.startswith("a re-attached"):
            s.detach()
            s = c.session("vmm", reattach_set_id=s.set_id)
            assert not s.token and s.verified
        set_id = s.set_id
        b.kill(signal.SIGKILL)
        reconnecting(s)
        with ThreadPoolExecutor(1) as pool:
            closing = pool.submit(s.close if closed_by != "leaving the client's with" else c.close)
            time.sleep(1.0)
            assert not closing.done(), "close() gave up on the release while the broker was down"
            b.start()
            closing.result(60)
        assert s.state is SessionState.CLOSED and not s.kept
        assert set_id not in set_ids(b)  # this process, its holder, still runs
        with Client(b.address) as other, other.session("next") as n:
            assert n.alloc(1, 100, count=3) == pasids  # free for another client
    finally:
        c.close()


def test_a_set_closed_during_a_sigterm_drain_is_released(tmp_path: object) -> None:
    """A SIGTERM drain held open by an alloc whose commit the test-only fault slows. Two
    sessions are closed while it drains. `idle` had its stream ended by the drain: its
    close waits for the restart and releases there. `busy` still has its stream (its
    alloc is owed a reply): the draining broker reads its half-close and honours it,
    durably, before it exits; that session may not reconnect at all (deadline 0), so only
    the broker can have released it."""
    b = BrokerProcess("--drain-seconds", "30")
    slow = b.dir / "slow-commits"  # commits take 4 s while it exists (tests/faults)
    b.env["PASID_BROKER_TEST_FAULTS"] = f"commit_delay_ms=4000,commit_delay_file={slow}"
    try:
        b.start()
        with Client(b.address) as c, Client(b.address, reconnect_deadline_seconds=0) as c0:
            idle = c.session("idle")
            idle.alloc(1, 100, count=2)
            busy = c0.session("busy")
            assert idle.verified and busy.verified
            done: list[object] = []
            t = threading.Thread(target=lambda: done.append(busy.alloc(1, 100)), daemon=True)
            slow.touch()
            t.start()
            time.sleep(1.0)  # the alloc now waits for its slow commit (4 s)
            assert b.proc is not None
            b.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining" in b.read_log(), what="draining")
            busy.close()  # half-closed while its alloc's reply is owed
            t.join(30)
            assert done == [[3]], "the in-flight alloc was answered"
            assert busy.state is SessionState.CLOSED and not busy.kept
            reconnecting(idle)
            with ThreadPoolExecutor(1) as pool:
                closing = pool.submit(idle.close)
                assert b.proc.wait(40) == 0
                assert not closing.done()
                slow.unlink()  # the restarted broker commits at speed
                b.start()
                closing.result(60)
            assert idle.state is SessionState.CLOSED and not idle.kept
        log = b.read_log()
        assert set_ids(b) == set(), log
    finally:
        b.cleanup()


@contextlib.contextmanager
def _hold_for_a_vmm(b: BrokerProcess) -> Iterator[tuple[subprocess.Popen[bytes], Command, Any]]:
    """pasidctl hold --delegate-pid of a live VMM (a sleep), once hold has printed its
    JSON: (the VMM, hold, the JSON). Both are killed on the way out, whatever happened."""
    vmm = subprocess.Popen(["sleep", "300"])
    hold = Command(
        "hold", "--count", "2", "--json", "--delegate-pid", str(vmm.pid), "--socket", b.socket
    )
    try:
        hold.wait(lambda: hold.out or hold.proc.poll() is not None, 60, "hold's JSON")
        yield vmm, hold, json.loads(hold.out[0])
    finally:
        hold.kill()
        vmm.kill()
        vmm.wait()


def _ctrl_c_while_the_broker_is_down(b: BrokerProcess, hold: Command, sid: int) -> None:
    """The broker is killed (SIGKILL); once hold has noticed, it is Ctrl-C'd and says it
    will release set `sid` when the broker is back."""
    b.kill(signal.SIGKILL)
    hold.wait(lambda: hold.said("broker went away"), 30, "hold to notice")
    hold.proc.send_signal(signal.SIGINT)
    hold.wait(lambda: hold.said(f"releasing set {sid} once the broker is back"), 30, "hold")


def test_hold_ctrl_c_while_the_broker_is_down_releases_the_delegated_set(
    make_broker: Make,
) -> None:
    """pasidctl hold --delegate-pid of a live VMM (a sleep), Ctrl-C'd while the broker is
    down: hold says it releases once the broker is back, does so after the restart, and
    exits 0; the VMM's set is gone while the VMM runs on."""
    b = make_broker()
    with _hold_for_a_vmm(b) as (vmm, hold, doc):
        sid = doc["session_id"]
        assert doc["verified"] and [s["pid"] for s in sets_json(b)] == [vmm.pid]
        _ctrl_c_while_the_broker_is_down(b, hold, sid)
        time.sleep(1.0)
        assert hold.proc.poll() is None, "hold gave up on the release while the broker was down"
        b.start()
        assert hold.proc.wait(60) == 0, hold.err
        assert hold.said(f"released set {sid} after the broker came back"), hold.err
        assert vmm.poll() is None
        assert sets_json(b) == []
        with Client(b.address) as c, c.session("next") as n:
            assert n.alloc(1, 100, count=2) == doc["pasids"]


def test_a_second_ctrl_c_stops_waiting_and_says_the_set_stays(make_broker: Make) -> None:
    """The release of a Ctrl-C'd hold may wait up to --reconnect-deadline for a broker
    that is away; a second Ctrl-C gives up on it at once (exit 130), saying that the
    VMM's set stays: after the restart it is detached, held while the VMM lives, and
    goes with the VMM's exit."""
    b = make_broker()
    with _hold_for_a_vmm(b) as (vmm, hold, doc):
        sid = doc["session_id"]
        _ctrl_c_while_the_broker_is_down(b, hold, sid)
        hold.proc.send_signal(signal.SIGINT)
        assert hold.proc.wait(30) == 130, hold.err
        assert hold.said(f"second Ctrl-C: not waiting for the release; set {sid} stays"), hold.err
        b.start()
        [kept] = sets_json(b)
        assert (kept["set_id"], kept["pid"], kept["state"]) == (sid, vmm.pid, "detached")
        vmm.kill()
        vmm.wait()
        wait_until(lambda: sets_json(b) == [], 10, 0.05, "the set to go with the VMM")


@pytest.mark.parametrize("broker", ["killed", "frozen"])
def test_a_close_whose_broker_never_comes_back_returns_within_the_bound(
    make_broker: Make, broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed: the session is reconnecting when closed. Frozen (SIGSTOP): its stream
    looks alive, the half-close is never answered. Either way close() returns within
    reconnect_deadline_seconds plus the client's timeout, says the set is kept, raises
    nothing; the broker keeps the set (its holder lives)."""
    deadline, timeout = 2.0, 2.0
    b = make_broker()
    assert b.proc is not None
    with Client(b.address, reconnect_deadline_seconds=deadline, timeout=timeout) as c:
        s = c.session("vmm")
        s.alloc(1, 100)
        if broker == "killed":
            b.kill(signal.SIGKILL)
            reconnecting(s)
        else:
            b.proc.send_signal(signal.SIGSTOP)
        try:
            with caplog.at_level(logging.WARNING, logger="pasid_client"):
                t0 = time.monotonic()
                s.close()
                took = time.monotonic() - t0
        finally:
            if broker == "frozen":
                b.proc.send_signal(signal.SIGCONT)
        assert s.state is SessionState.CLOSED and s.kept
        assert "the broker keeps the set until its holder process exits" in caplog.text
        # The stated bound, with a generous margin for a loaded machine.
        assert took <= deadline + timeout + 10, took
        if broker == "frozen":
            assert took >= timeout  # it waited for the answer, then tried to reconnect
    if broker == "frozen":
        # Thawed, the broker sees the cancelled stream: the set is detached, kept for its
        # holder (this process), as after any broken stream.
        wait_until(
            lambda: [(s["set_id"], s["state"]) for s in sets_json(b)] == [(s.set_id, "detached")],
            30,
            0.1,
            "the detach",
        )
