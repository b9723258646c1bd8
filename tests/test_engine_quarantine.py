"""The engine keeps quarantined PASIDs held in the backend until they leave quarantine.

In process, with the real simulator backend and a real SQLite file: the property under
test (what the backend holds) is not visible over the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from broker.backends.simulator import SimulatorBackend
from broker.core import Quarantine
from broker.engine import Broker
from broker.store import AddPasids, CreateSet, SetRow, SqliteStore, Withhold


def backend_holds(b: SimulatorBackend) -> list[int]:
    ns = b._ns
    assert ns is not None
    return list(ns.iter_used())


def test_backend_holds_quarantined_pasids_until_they_leave(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = SimulatorBackend(pasid_bits=8)
        broker = Broker(backend, SqliteStore(tmp_path / "b.db"), quarantine=Quarantine(allocs=2))
        await broker.start()
        try:
            s1, _, _, created1 = broker.open_session("vm1")
            s2, _, _, created2 = broker.open_session("vm2")
            await created1
            await created2
            assert await broker.alloc(s1, 1, 255, 3) == [1, 2, 3]
            assert await broker.free(s1, 1, 2) == 2
            assert broker.info().quarantined == 2
            assert backend_holds(backend) == [1, 2, 3]  # the kernel cannot reissue 1, 2
            assert await broker.alloc(s2, 1, 255, 2) == [4, 5]
            assert backend_holds(backend) == [1, 2, 3, 4, 5]
            # 2 PASIDs handed out since the free: 1 and 2 leave quarantine, and the
            # backend lets go of them before it is asked for 1 again.
            assert await broker.alloc(s2, 1, 255) == [1]
            assert backend_holds(backend) == [1, 3, 4, 5]
            broker.end_session(s2, "test")  # set-destroy-on-exit quarantines too
            await broker.journal.drain()
            assert broker.info().quarantined == 3
            assert backend_holds(backend) == [1, 3, 4, 5]
            assert broker.info().in_use == 1
        finally:
            await broker.stop()

    asyncio.run(scenario())


async def _retried_free_lets_go(broker: Broker) -> None:
    """Gives the retried free (every stuck.RETRY_SECONDS) 3 s to empty the quarantine;
    the test then asserts what it let go."""
    for _ in range(60):
        if broker.info().quarantined == 0:
            return
        await asyncio.sleep(0.05)


def test_recovery_withholds_stored_pasids_and_drops_stale_rows(tmp_path: Path) -> None:
    """What a restart finds in the store (issue 22, point 7): a "free" row for a PASID no
    set holds is withheld again, held in the backend, and let go once the retried free
    succeeds; a "detach" row for a PASID a set holds is stale (the set's alloc came after
    the release, whose row change was lost) and is deleted; a "contested" row for a held
    PASID contests it again."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit(
        [
            CreateSet(SetRow(1, "vm", 0, 1000, 0, "h", 1.0)),
            AddPasids(1, (5, 6)),
            Withhold((5,), "detach", 9, 1, 1),
            Withhold((6,), "contested"),
            Withhold((7,), "free", 9),
        ]
    )
    st.close()

    async def scenario() -> None:
        backend = SimulatorBackend(pasid_bits=8)
        broker = Broker(backend, SqliteStore(db))
        await broker.start()
        try:
            assert broker.info().quarantined == 1  # 7
            assert backend_holds(backend) == [5, 6, 7]
            assert broker.allocator.withheld == [7]
            await _retried_free_lets_go(broker)
            assert broker.info().quarantined == 0
            assert backend_holds(backend) == [5, 6]
            (sess,) = broker.sessions()
            await broker.revoke(sess.session_id, "test")  # 6 is contested: withheld
            assert broker.allocator.withheld == [6]
            await broker.journal.drain()
        finally:
            await broker.stop()

    asyncio.run(scenario())
    with contextlib.closing(sqlite3.connect(db)) as c:
        assert c.execute("SELECT pasid, kind FROM quarantine").fetchall() == [(6, "contested")]


def test_claims_of_a_witness_set_that_is_gone_end_at_the_start(tmp_path: Path) -> None:
    """The witness's set's destroy was durable, the end of its claims not (a crash between
    the two commits): the start ends them. 5 (its set holds it) is no longer contested, 6
    goes back to the pool, 7 still waits for its retried free, then goes back too."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit(
        [
            CreateSet(SetRow(1, "vm", 0, 1000, 0, "h", 1.0)),
            AddPasids(1, (5,)),
            Withhold((5, 6), "contested", 3, claimant=3),  # set 3: gone
            Withhold((7,), "free", 9, claimant=3),
        ]
    )
    st.close()

    async def scenario() -> None:
        backend = SimulatorBackend(pasid_bits=8)
        broker = Broker(backend, SqliteStore(db))
        await broker.start()
        try:
            assert broker.allocator.withheld == [7]  # 6 is free at once
            await _retried_free_lets_go(broker)  # of 7
            assert broker.allocator.withheld == []
            (sess,) = broker.sessions()
            await broker.revoke(sess.session_id, "test")
            assert broker.allocator.withheld == []  # 5: nobody claims it any more
            await broker.journal.drain()
            broker.allocator.check()
        finally:
            await broker.stop()

    asyncio.run(scenario())
    with contextlib.closing(sqlite3.connect(db)) as c:
        assert c.execute("SELECT pasid, kind FROM quarantine").fetchall() == []
