"""After an unclean start, allocations wait for the live holders (issue 22, point 2), on a
real broker killed with SIGKILL while a live, verified holder (this test process) holds a
set; after a clean SIGTERM stop they do not.

The broker records a clean stop in `<db>.clean-stop`, written after the last commit and a
clean close, and removed at the next start before anything may write: a crash never leaves
one behind. The re-attach is sent with the raw stub (tests/e2e/test_witness.py).
"""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from pasid_client import Client

from tests.e2e.test_peer_sessions import event_of, events
from tests.e2e.test_witness import witnessed_resume
from tests.faults.ledger import Ledger
from tests.harness import BrokerProcess, api_holdings


def _held_set(b: BrokerProcess, ledger: Ledger) -> tuple[str, int]:
    """Start `b`; set A, held by this process, gets 1-4 and is detached: (token, set)."""
    b.start()
    with Client(b.address) as c:
        a = c.session("vm-a", grace_seconds=300)
        assert ledger.alloc(a, 1, 100, count=4) == [1, 2, 3, 4]
        a.detach()  # kept, held by this process (leaving the client releases)
        return a.token, a.set_id


def _restart_log(b: BrokerProcess) -> str:
    """Start `b` again; the log lines of this run only (the log is appended to)."""
    before = len(b.read_log())
    b.start()
    return b.read_log()[before:]


def test_after_a_kill_allocations_wait_for_the_live_holder() -> None:
    b = BrokerProcess("--restart-grace", "300")
    ledger = Ledger()
    try:
        token, set_a = _held_set(b, ledger)
        assert b.kill() != 0  # SIGKILL: no clean stop recorded
        assert not Path(b.db + ".clean-stop").exists()
        log = _restart_log(b)
        assert "unclean start: no clean-stop marker" in log
        assert "unclean start: new allocations wait up to 30 s for 1 live holders" in log
        order: list[str] = []
        with Client(b.address) as c:
            other = c.session("vm-b", grace_seconds=300)
            got: list[int] = []

            def alloc() -> None:
                got.extend(other.alloc(1, 100, count=2))
                order.append("other's alloc answered")

            t = threading.Thread(target=alloc)
            t.start()
            t.join(1.0)
            assert t.is_alive() and not order, "the alloc waits for the live holder"
            opened, q, call = witnessed_resume(c, token, sorted(ledger.held[set_a]))
            assert opened.resumed and opened.set_id == set_a
            assert not opened.reclaimed and not opened.conflicts  # fsync: nothing lost
            t.join(30)
            assert order == ["other's alloc answered"], order
            assert got == [5, 6]
            # The broker's own order, not this process's threads' (which of the two replies
            # this process reads first is up to its scheduler under load): the alloc was
            # made after the holder's re-attach.
            reattached = event_of(b, "set_reattached", set_a)
            [alloc_ev] = [e for e in events(b, "alloc") if e.set_id == other.set_id]
            assert reattached.revision < alloc_ev.revision
            served = api_holdings(b.address)
            ledger.audit({set_a: served[set_a]}).assert_clean()  # 0 lost
            assert served[other.set_id] == [5, 6]  # 0 held twice
            q.put(None)
            for _ in call:
                pass
        assert "allocations open after the unclean start: every live holder re-attached" in (
            b.read_log()
        )
    finally:
        b.cleanup()


def test_after_a_clean_stop_allocations_do_not_wait() -> None:
    b = BrokerProcess("--restart-grace", "300")
    ledger = Ledger()
    try:
        _, set_a = _held_set(b, ledger)
        assert b.stop() == 0
        marker = Path(b.db + ".clean-stop")
        assert stat.S_IMODE(marker.stat().st_mode) == 0o600
        log = _restart_log(b)
        assert "clean start: the last stop was clean at revision" in log
        assert "unclean start" not in log and "new allocations wait" not in log
        assert not marker.exists()  # taken at start: a crash from now on leaves none
        with Client(b.address) as c:
            other = c.session("vm-b", grace_seconds=300)
            # Answered while the holder of set A has not re-attached at all.
            assert other.alloc(1, 100, count=2) == [5, 6]
            served = api_holdings(b.address)
            assert served[set_a] == [1, 2, 3, 4]
            other.detach()
        # A marker that does not match the store (here: a revision it never reached) is
        # no clean stop: the start waits.
        assert b.stop() == 0
        marker.write_text(f"{10**9:020d}\n")
        log = _restart_log(b)
        assert "unclean start: the clean-stop marker names revision 1000000000" in log
        assert "new allocations wait up to 30 s for 2 live holders" in log  # A and B
    finally:
        b.cleanup()


def test_a_new_database_is_a_first_start_and_a_kill_before_any_commit_too() -> None:
    """A store nothing was ever committed to has nothing a client can have been told: its
    start is "first start", not an unclean one, even after a kill -9 of that first run."""
    b = BrokerProcess()
    try:
        b.start()
        log = b.read_log()
        assert "first start: a new database" in log
        assert "unclean start" not in log
        assert b.kill() != 0
        log = _restart_log(b)
        assert "first start: a new database" in log and "unclean start" not in log
        with Client(b.address) as c, c.session("vm-a") as s:
            assert s.alloc(1, 100) == [1]  # nothing waits
        assert b.kill() != 0  # now something was committed: a kill is unclean
        assert "unclean start: no clean-stop marker" in _restart_log(b)
    finally:
        b.stop()
