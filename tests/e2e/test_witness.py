"""Clients are witnesses (issue 22, point 2), on a real broker restored from an older
backup: a resuming client states what it holds (OpenSession.held, witness=true).

- after the restore, new allocations wait (bounded) for the live holders to re-attach;
- PASIDs the store lost that are still free are claimed for the set again, durably
  (SessionOpened.reclaimed);
- PASIDs the store has meanwhile given to another set are conflicts: SessionOpened.
  conflicts, a pasid_conflict event on both sets, the conflicts metric, an ERROR log; when
  the other set gives one up it is withheld, never handed out again silently.

The open is sent with the raw stub: the client library's witness support is another
engineer's work (clients/pasid_client); the wire is what is tested here.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pasid.v1 import broker_pb2 as pb
from pasid_client import Client, ResourceExhausted
from pasid_client.handshake import open_request, ticket_for

from broker.core import runs
from tests.faults.ledger import Ledger
from tests.harness import LAUNCHER, ROOT, BrokerProcess, api_holdings, db_holdings, open_db


def _pb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", LAUNCHER, *args], capture_output=True, text=True, cwd=ROOT,
        timeout=120,
    )  # fmt: skip


def _pasids(ranges: Any) -> list[int]:
    return [p for r in ranges for p in range(r.min, r.max + 1)]


def witnessed_resume(c: Client, token: str, held: list[int]) -> tuple[Any, Any, Any]:
    """Resume `token`'s session stating `held`: (SessionOpened, request queue, call)."""
    req = open_request("vm-a", None, 300, token, ticket_for(c.target, timeout=5))
    req.held.extend(pb.PasidRange(min=lo, max=hi) for lo, hi in runs(held))
    req.witness = True
    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    q.put(pb.SessionRequest(tag=0, open=req))
    call = c._stub.Session(iter(q.get, None))
    resp = next(call)
    assert resp.WhichOneof("result") == "opened", resp
    return resp.opened, q, call


def _restored(
    tmp_path: Path, grace: str, env: dict[str, str] | None = None
) -> tuple[BrokerProcess, Ledger, str, int]:
    """A broker whose set A got 1-4 before a backup and 5-8 after, restored from it:
    (the restarted broker, the ledger, A's token, A's set). `env`: the broker's."""
    b = BrokerProcess("--restart-grace", grace, env=env)
    ledger = Ledger()
    b.start()
    with Client(b.address) as c:
        a = c.session("vm-a", grace_seconds=300)
        token, set_a = a.token, a.set_id
        assert ledger.alloc(a, 1, 100, count=4) == [1, 2, 3, 4]
        backup = tmp_path / "backup.db"
        assert _pb("backup", "--db", b.db, str(backup)).returncode == 0
        assert ledger.alloc(a, 1, 100, count=4) == [5, 6, 7, 8]  # after the backup
    assert b.stop() == 0
    assert _pb("restore", "--db", b.db, "--socket", b.socket, str(backup)).returncode == 0
    b.start()
    return b, ledger, token, set_a


def test_after_a_restore_allocations_wait_for_the_witness(tmp_path: Path) -> None:
    """The live holder re-attaches within the bound: it reclaims what the store lost
    before anyone else may allocate, and no PASID is held twice."""
    b, ledger, token, set_a = _restored(tmp_path, "300")
    try:
        assert "new allocations wait up to 30 s for 1 live holders" in b.read_log()
        with Client(b.address) as c:
            other = c.session("vm-b", grace_seconds=300)
            got: list[int] = []
            t = threading.Thread(target=lambda: got.extend(other.alloc(1, 100, count=2)))
            t.start()
            time.sleep(1.0)
            assert not got  # waiting for the witness
            opened, q, call = witnessed_resume(c, token, sorted(ledger.held[set_a]))
            assert _pasids(opened.reclaimed) == [5, 6, 7, 8]
            assert not opened.conflicts
            t.join(30)
            assert got == [9, 10]
            served = api_holdings(b.address)
            ledger.audit({set_a: served[set_a]}).assert_clean()  # 0 lost
            assert served[other.set_id] == [9, 10]  # 0 held twice
            q.put(None)
            for _ in call:
                pass
        assert "allocations open after the restore: every live holder re-attached" in (b.read_log())
    finally:
        b.cleanup()


def test_a_witness_after_the_bound_reclaims_what_is_free_and_reports_conflicts(
    tmp_path: Path,
) -> None:
    """The holder comes back only after the bound: another set got two of its PASIDs
    meanwhile. Those are conflicts, reported loudly and contested; the rest is claimed."""
    b, ledger, token, set_a = _restored(tmp_path, "2")
    try:
        with Client(b.address) as c:
            other = c.session("vm-b", grace_seconds=300)
            # The restored store lost 5-8: after the 2 s bound they look free.
            assert other.alloc(1, 100, count=2) == [5, 6]
            opened, q, call = witnessed_resume(c, token, sorted(ledger.held[set_a]))
            assert opened.resumed and opened.set_id == set_a
            assert _pasids(opened.reclaimed) == [7, 8]
            assert _pasids(opened.conflicts) == [5, 6]
            served = api_holdings(b.address)
            assert served[set_a] == [1, 2, 3, 4, 7, 8]
            assert db_holdings(b.db)[set_a] == served[set_a]  # durable before the answer
            assert served[other.set_id] == [5, 6]  # never in two sets in the store
            # The other set gives 5 up: withheld, not back in the pool silently.
            assert other.free(5, 5) == 1
            assert c.info().quarantined >= 1
            third = c.session("vm-c")
            got = third.alloc(1, 100, count=3)
            assert 5 not in got and 6 not in got, got
            with pytest.raises(ResourceExhausted):
                third.alloc(5, 5)
            q.put(None)
            for _ in call:
                pass
        log = b.read_log()
        assert "allocations open after the restore: bound reached" in log
        assert "pasid conflict" in log
        assert "claimed for their set again" in log
        metrics = urllib.request.urlopen(b.metrics_url, timeout=5).read().decode()
        assert "pasid_broker_pasid_conflicts_total 2.0" in metrics
        with open_db(b.db) as con:  # through the broker: it holds the file exclusively
            events = con.execute(
                "SELECT set_id, pasids FROM events WHERE kind = 'pasid_conflict' ORDER BY set_id"
            ).fetchall()
        assert events == sorted([(set_a, "5-6"), (other.set_id, "5-6")]), events
    finally:
        b.cleanup()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_the_contest_outlives_a_broker_restart(tmp_path: Path, sig: int) -> None:
    """A contested PASID is stored (a quarantine row of kind "contested"): after a kill -9
    or a SIGTERM restart, one the other set gave up is still withheld, and one it still
    holds is withheld when it gives it up: never back in the pool silently. Only once
    the witness's set is gone too do they go back."""
    b, ledger, token, set_a = _restored(tmp_path, "2")
    # Not closed before the restart: leaving its `with` would release its sets.
    holder = Client(b.address)
    try:
        other = holder.session("vm-b", grace_seconds=300)
        other_id = other.set_id
        assert other.alloc(1, 100, count=2) == [5, 6]  # lost by the store: "free"
        with Client(b.address) as c:
            opened, _q, call = witnessed_resume(c, token, sorted(ledger.held[set_a]))
            assert _pasids(opened.conflicts) == [5, 6]
            assert other.free(5, 5) == 1  # withheld: a witness claims it
            # No half-close (that would release the witness's set, and with it the
            # contest): the stream just breaks, and the verified set lives on, detached.
            call.cancel()
        with open_db(b.db) as con:
            rows = con.execute("SELECT pasid, kind FROM quarantine ORDER BY pasid").fetchall()
        assert rows == [(5, "contested"), (6, "contested")]
        b.kill(sig)
        b.start()
        with Client(b.address) as c, Client(b.admin_address) as admin:
            assert api_holdings(b.address)[other_id] == [6]  # its holder (us) lives
            assert c.info().quarantined == 1  # 5, withheld again
            third = c.session("vm-c")
            with pytest.raises(ResourceExhausted):
                third.alloc(5, 5)
            assert admin.revoke(other_id, "test") == 1  # 6 leaves its set: withheld
            assert c.info().quarantined == 2
            with pytest.raises(ResourceExhausted):
                third.alloc(5, 6)
            got = third.alloc(1, 100, count=3)
            assert 5 not in got and 6 not in got, got
            # The witness's set ends too: nobody claims them any more; back in the pool.
            assert admin.revoke(set_a, "test") == 6
            assert c.info().quarantined == 0
            assert third.alloc(5, 6, count=2) == [5, 6]
        assert "contested PASIDs released" in b.read_log()
    finally:
        holder.close()
        b.cleanup()
