"""A conflict is told to both clients (issue 22, point 2), on a real broker restored from an
older backup.

Set A got 1-4 before the backup and 5-8 after; the restore loses 5-8, and after the
allocation wait's bound a client library session B is given 5 and 6. A's client resumes
stating 1-8 (its witness): 5 and 6 are a conflict. A is told in SessionOpened.conflicts
(tests/e2e/test_witness.py); B, which holds them, is told at once on its stream (a
SessionResponse.notice with tag 0): its library logs it, lists them in
`session.contested`, calls on_state_change, and keeps them in what it holds and states.
B re-attached by hand, or resumed after a broker restart, hears it again in
SessionOpened.contested. (The claimant told at a hand-over: test_witness_deferred.py.)

A is resumed with the raw stub (as test_witness.py) so that the test decides when.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pasid.v1 import broker_pb2 as pb
from pasid_client import Client
from pasid_client.reconnect import SessionState, StateChange

from tests.e2e.test_witness import _pasids, _pb, witnessed_resume
from tests.harness import ROOT, BrokerProcess, api_holdings, wait_until


def _resume_stating(c: Client, token: str, held: list[int]) -> tuple[pb.SessionOpened, Any]:
    """Resume `token`'s session stating `held` (a partial witness): (SessionOpened, call).
    Cancelling the call breaks the stream: the verified set lives on, detached."""
    opened, _, call = witnessed_resume(c, token, held)
    return opened, call


def _restored(tmp_path: Path) -> tuple[BrokerProcess, str, int]:
    """A broker (started) whose set A got 1-4 before a backup and 5-8 after, restored from
    it, with a 2 s allocation wait: (the broker, A's token, A's set)."""
    b = BrokerProcess("--restart-grace", "2")
    b.start()
    with Client(b.address) as c:
        a = c.session("vm-a", grace_seconds=300)
        token_a, set_a = a.token, a.set_id
        assert a.alloc(1, 100, count=4) == [1, 2, 3, 4]
        backup = tmp_path / "backup.db"
        r = _pb("backup", "--db", b.db, str(backup))
        assert r.returncode == 0, r.stderr
        assert a.alloc(1, 100, count=4) == [5, 6, 7, 8]
    assert b.stop() == 0
    r = _pb("restore", "--db", b.db, "--socket", b.socket, str(backup))
    assert r.returncode == 0, r.stderr
    b.start()
    return b, token_a, set_a


def test_the_set_holding_a_claimed_pasid_is_told_on_its_stream_and_at_its_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b, token_a, set_a = _restored(tmp_path)
    holder = Client(b.address)  # this process holds A and B: A lives across the restore
    changes: list[StateChange] = []
    try:
        s = holder.session("vm-b", grace_seconds=300, on_state_change=changes.append)
        set_b = s.set_id
        assert s.alloc(1, 100, count=2) == [5, 6]  # lost by the store: "free" after the bound
        assert s.contested == []
        with caplog.at_level(logging.WARNING, logger="pasid_client"):
            opened, call = _resume_stating(holder, token_a, [1, 2, 3, 4, 5, 6, 7, 8])
            assert _pasids(opened.conflicts) == [5, 6]

            def told() -> list[StateChange]:
                return [ch for ch in changes if ch.notice == "pasid_contested"]

            wait_until(told, 30, 0.02, "B's library to be told of the conflict")
        (notice,) = told()
        assert notice.contested == ((5, 6),) and notice.other_set_id == set_a
        assert notice.state is SessionState.CONNECTED  # a notice, not a state change
        assert s.contested == [(5, 6)]
        assert s.held == [(5, 6)]  # kept: B's device may still use them
        assert s.witness_complete  # its witness is unchanged
        assert any(
            "claims PASIDs [(5, 6)]" in m and f"set {set_a}'s client" in m for m in caplog.messages
        ), caplog.messages
        served = api_holdings(b.address)
        assert served[set_b] == [5, 6] and served[set_a] == [1, 2, 3, 4, 7, 8]
        call.cancel()  # A detached: it lives on (its holder is this process)

        # B taken back by hand (a restarted sidecar's re-attach): told in SessionOpened.
        s.detach()
        s = holder.session("vm-b", reattach_set_id=set_b, on_state_change=changes.append)
        assert s.set_id == set_b and s.contested == [(5, 6)] and s.held == [(5, 6)]

        # B resumed by its library after a kill -9: the stored contest is told again.
        b.kill(signal.SIGKILL)
        b.start()

        def resumed() -> list[StateChange]:
            return [ch for ch in changes if ch.state is SessionState.RESUMED]

        wait_until(resumed, 60, 0.05, "B's library to resume")
        (back,) = resumed()
        assert back.contested == ((5, 6),) and back.conflicts == ()
        assert s.contested == [(5, 6)] and s.held == [(5, 6)]
        served = api_holdings(b.address)
        assert served[set_b] == [5, 6] and served[set_a] == [1, 2, 3, 4, 7, 8]
    finally:
        holder.close()
        b.cleanup()


def test_pasidctl_hold_says_the_conflict_on_stderr(tmp_path: Path) -> None:
    """`pasidctl hold` is B: it is given 5 and 6, and says on stderr when A claims them."""
    b, token_a, set_a = _restored(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASID_SESSION_")}
    hold = subprocess.Popen(
        [
            *(sys.executable, "-m", "pasid_client.cli", "hold", "--socket", b.socket),
            *("--count", "2", "--json", "--grace", "300"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    try:
        assert hold.stdout is not None and hold.stderr is not None
        err = hold.stderr
        threading.Thread(target=lambda: [lines.put(ln) for ln in err], daemon=True).start()
        held = json.loads(hold.stdout.readline())
        assert held["pasids"] == [5, 6]
        with Client(b.address) as c:
            opened, call = _resume_stating(c, token_a, [1, 2, 3, 4, 5, 6, 7, 8])
            assert _pasids(opened.conflicts) == [5, 6]
            said: list[str] = []
            deadline = time.monotonic() + 30
            while not any("claims PASIDs" in ln for ln in said):
                assert time.monotonic() < deadline, said
                with contextlib.suppress(queue.Empty):
                    said.append(lines.get(timeout=0.5))
            call.cancel()
        line = next(ln for ln in said if "claims PASIDs" in ln)
        assert f"set {set_a}'s client claims PASIDs 5-6 of set {held['session_id']}" in line
        assert "still held" in line
    finally:
        hold.send_signal(signal.SIGINT)
        hold.wait(30)
        b.cleanup()
