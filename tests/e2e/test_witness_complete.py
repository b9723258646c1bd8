"""A complete witness undoes a lost free (issue 22, point 2), on a real broker restored
from a backup under a live client library session.

The client allocates, a backup is taken, the client frees some of its PASIDs (each free
acknowledged) and allocates more, then the broker is stopped and the backup restored:
the store has lost the frees (the set holds them again) and the later allocation. The
client's session resumes by itself stating everything it holds (witness_complete, with
the set's epoch): the broker claims back what it lost and frees again what the client
had freed. 0 acknowledged operations lost, 0 PASIDs held twice, the listing matches the
client, and another client can have the freed PASIDs.

And the rule's other side: a session with an outcome it never heard states a partial
witness (nothing freed on it) until a listing settles the doubt.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pasid_client import Client, OutcomeUnknown, Session
from pasid_client.reconnect import SessionState, StateChange

from tests.faults.ledger import Ledger
from tests.harness import LAUNCHER, ROOT, BrokerProcess, api_holdings, db_holdings, wait_until


def _pb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", LAUNCHER, *args], capture_output=True, text=True, cwd=ROOT,
        timeout=120,
    )  # fmt: skip


def _resumes(changes: list[StateChange]) -> list[StateChange]:
    return [c for c in changes if c.state is SessionState.RESUMED]


def _metric(b: BrokerProcess, name: str) -> float:
    text = urllib.request.urlopen(b.metrics_url, timeout=5).read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


@contextlib.contextmanager
def _a_session_holding_1_and_2() -> Iterator[tuple[BrokerProcess, Session, list[StateChange]]]:
    """A broker that keeps a lost set 300 s, and a library session of this process that
    holds PASIDs 1 and 2 and records its state changes; both closed at the end."""
    b = BrokerProcess("--restart-grace", "300")
    b.start()
    changes: list[StateChange] = []
    holder = Client(b.address)
    try:
        a = holder.session("vm-a", grace_seconds=300, on_state_change=changes.append)
        assert a.alloc(1, 100, count=2) == [1, 2]
        yield b, a, changes
    finally:
        holder.close()
        b.cleanup()


@pytest.mark.parametrize("how", ["token", "reattach"])
def test_a_restored_backup_loses_frees_and_the_live_clients_witness_undoes_them(
    tmp_path: Path, how: str
) -> None:
    """`token`: a session opened by the library resumes with its token. `reattach`: the
    set was taken back by hand without its token (verified re-attach: a restarted
    sidecar's way), so the library lists it whole first, and its reconnects re-attach."""
    b = BrokerProcess("--restart-grace", "300")
    b.start()
    changes: list[StateChange] = []
    ledger = Ledger()
    holder = Client(b.address)  # this process holds the set: it lives across the restore
    try:
        a = holder.session("vm-a", grace_seconds=300, on_state_change=changes.append)
        assert ledger.alloc(a, 1, 100, count=5) == [1, 2, 3, 4, 5]
        assert a.witness_complete  # a new set, every change answered
        if how == "reattach":
            set_id = a.set_id
            a.detach()  # the verified set lives on, detached, with its holder (us)
            a = holder.session("vm-a", reattach_set_id=set_id, on_state_change=changes.append)
            assert a.set_id == set_id and not a.token
            assert a.witness_complete  # by hand, then listed whole
        assert ledger.alloc(a, 1, 100) == [6]
        backup = tmp_path / "backup.db"
        r = _pb("backup", "--db", b.db, str(backup))
        assert r.returncode == 0, r.stderr
        assert ledger.free(a, 2, 3) == 2  # acknowledged, then lost by the restore
        assert ledger.free(a, 5, 5) == 1
        assert ledger.alloc(a, 1, 100) == [2]  # lost too: the witness claims it back
        assert a.held == [(1, 2), (4, 4), (6, 6)]
        assert b.stop() == 0
        r = _pb("restore", "--db", b.db, "--socket", b.socket, str(backup))
        assert r.returncode == 0, r.stderr
        assert db_holdings(b.db)[a.set_id] == [1, 2, 3, 4, 5, 6]  # the frees are lost
        b.start()
        wait_until(lambda: bool(_resumes(changes)), 60, 0.05, "the session to resume")
        (resumed,) = _resumes(changes)
        assert resumed.witness_complete
        assert resumed.refreed == ((3, 3), (5, 5))
        assert resumed.reclaimed == ()  # 2 was in the backup's set: kept, not reclaimed
        assert resumed.conflicts == ()
        served = api_holdings(b.address)
        assert served[a.set_id] == [1, 2, 4, 6]
        ledger.audit(served).assert_clean()  # 0 lost, 0 frees lost, 0 held twice
        assert db_holdings(b.db)[a.set_id] == [1, 2, 4, 6]  # durable before the answer
        assert list(a.list().pasids()) == [1, 2, 4, 6]  # the listing matches the client
        assert a.witness_complete
        with Client(b.address) as c:
            other = c.session("vm-b")
            assert other.alloc(1, 100, count=3) == [3, 5, 7]  # the freed ones are free
            served = api_holdings(b.address)
            ledger.audit({a.set_id: served[a.set_id]}).assert_clean()
            assert not set(served[a.set_id]) & set(served[other.set_id])
        log = b.read_log()
        assert "freed again" in log
        assert "allocations open after the restore: every live holder re-attached" in log
        assert _metric(b, "pasid_broker_pasids_refreed_total") == 2.0
    finally:
        holder.close()
        b.cleanup()


def test_an_outcome_never_heard_makes_the_witness_partial_until_a_listing(
    tmp_path: Path,
) -> None:
    """The broker is stopped (SIGSTOP) with an alloc in flight and killed: the alloc's
    outcome is unknown to the client, whose next witness is partial (nothing freed on
    it, whatever the set holds); the listing the library takes once resumed makes it
    complete again, and the next restart's resume is complete."""
    with _a_session_holding_1_and_2() as (b, a, changes):
        assert b.proc is not None
        b.proc.send_signal(signal.SIGSTOP)
        outcome: list[BaseException] = []

        def in_flight() -> None:
            try:
                a.alloc(1, 100)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=in_flight)
        t.start()
        time.sleep(0.5)  # sent, unanswered
        b.kill(signal.SIGKILL)
        t.join(30)
        assert outcome and isinstance(outcome[0], OutcomeUnknown), outcome
        assert not a.witness_complete
        b.start()
        wait_until(lambda: bool(_resumes(changes)), 60, 0.05, "the session to resume")
        assert not _resumes(changes)[0].witness_complete  # partial: in doubt
        wait_until(lambda: a.witness_complete, 30, 0.05, "the listing after the resume")
        assert a.held == [(1, 2)]
        assert b.stop() == 0
        b.start()
        wait_until(lambda: len(_resumes(changes)) == 2, 60, 0.05, "the second resume")
        second = _resumes(changes)[1]
        assert second.witness_complete and second.refreed == ()
        assert api_holdings(b.address)[a.set_id] == [1, 2]


def test_a_change_by_token_makes_the_sessions_witness_partial() -> None:
    """A tool allocates in the set by token (a unary call the session's stream never
    sees): the session's next witness states an old epoch, so the broker frees nothing
    on it (the tool's PASID stays), and the session learns the whole set again.
    (A resume by hand changes the epoch too: tests/test_engine_witness.py.)"""
    with _a_session_holding_1_and_2() as (b, a, changes):
        with Client(b.address) as tool:
            assert tool.alloc(a.session_id, a.token, 1, 100) == [3]
        assert a.witness_complete and a.held == [(1, 2)]  # it cannot know
        assert b.stop() == 0
        b.start()
        wait_until(lambda: bool(_resumes(changes)), 60, 0.05, "the resume")
        (resumed,) = _resumes(changes)
        assert not resumed.witness_complete and resumed.refreed == ()
        assert api_holdings(b.address)[a.set_id] == [1, 2, 3]  # the tool's 3 stays
        wait_until(lambda: a.witness_complete, 30, 0.05, "the listing after the resume")
        assert a.held == [(1, 3)]
        assert "a complete witness states an old epoch" in b.read_log()
