"""A contested PASID (issue 22, point 2: a witness claims what the store gave another set)
is withheld when its set gives it up, across restarts, until the witness's set is gone.

In process, with the real simulator backend and a real SQLite file: the backend's
holdings (that a released PASID can really be allocated again) are not visible over the
wire. The witness's claim is made by calling Witnesses.reconcile directly, as a resume
with OpenSession.witness does (tests/e2e/test_witness.py sends it over the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from broker.backends.simulator import SimulatorBackend
from broker.engine import Broker, Session
from broker.store import SqliteStore


async def _opened(broker: Broker, client: str) -> Session:
    sess, _, _, created = broker.open_session(client)
    await created
    return sess


def test_the_witness_sets_end_lets_go_of_its_contest(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(tmp_path / "b.db"))
        await broker.start()
        try:
            owner = await _opened(broker, "owner")
            witness = await _opened(broker, "witness")
            assert await broker.alloc(owner, 1, 255, 2) == [1, 2]
            await broker.witnesses.reconcile(witness, [1, 2])
            assert witness.conflicts == [1, 2]
            assert await broker.free(owner, 1, 1) == 1
            assert broker.allocator.withheld == [1]  # contested: not back in the pool
            await broker.revoke(witness.session_id, "test")
            await broker.journal.drain()
            assert broker.allocator.withheld == []  # nobody else claims it now
            assert await broker.free(owner, 2, 2) == 1  # no longer contested: to the pool
            other = await _opened(broker, "other")
            assert await broker.alloc(other, 1, 255, 2) == [1, 2]  # the backend agrees
            broker.allocator.check()
        finally:
            await broker.stop()

    asyncio.run(scenario())


def test_the_contest_and_its_claimant_outlive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "b.db"

    async def before() -> tuple[int, int]:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db))
        await broker.start()
        try:
            owner = await _opened(broker, "owner")
            witness = await _opened(broker, "witness")
            assert await broker.alloc(owner, 1, 255, 2) == [1, 2]
            await broker.witnesses.reconcile(witness, [1, 2])
            assert await broker.free(owner, 1, 1) == 1
            return owner.session_id, witness.session_id
        finally:
            await broker.stop()  # keeps both sets (a restart is not their end)

    async def after(owner_id: int, witness_id: int) -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db), restart_grace=60)
        await broker.start()
        try:
            assert broker.allocator.withheld == [1]
            await broker.revoke(owner_id, "test")  # 2 leaves its set: contested, withheld
            assert broker.allocator.withheld == [1, 2]
            other = await _opened(broker, "other")
            assert await broker.alloc(other, 1, 255) == [3]
            await broker.revoke(witness_id, "test")
            await broker.journal.drain()
            assert broker.allocator.withheld == []
            assert await broker.alloc(other, 1, 2, 2) == [1, 2]  # the backend agrees
            broker.allocator.check()
        finally:
            await broker.stop()

    ids = asyncio.run(before())
    asyncio.run(after(*ids))


def test_a_witness_claim_on_a_withheld_pasid_outlasts_the_retried_free(tmp_path: Path) -> None:
    """A PASID withheld after a failed backend free, then claimed by a witness: the retried
    free succeeding must not put it back in the pool while the witness's set lives, nor
    may a restart. The backend's failure is the simulator's own fault injection."""
    db = tmp_path / "b.db"

    async def before() -> int:
        backend = SimulatorBackend(pasid_bits=8)
        broker = Broker(backend, SqliteStore(db))
        await broker.start()
        try:
            owner = await _opened(broker, "owner")
            witness = await _opened(broker, "witness")
            other = await _opened(broker, "other")
            assert await broker.alloc(owner, 1, 255, 2) == [1, 2]
            backend.fail_next = 2  # free_many, then the run-by-run free
            await broker.revoke(owner.session_id, "test")
            assert broker.allocator.withheld == [1, 2]
            await broker.witnesses.reconcile(witness, [1])
            assert witness.conflicts == [1]
            # The retry (every second) frees both in the backend; only 2 goes back.
            await asyncio.sleep(2.5)
            assert backend.fail_next == 0
            assert broker.allocator.withheld == [1]
            assert await broker.alloc(other, 1, 255, 2) == [2, 3]
            return witness.session_id
        finally:
            await broker.stop()

    async def after(witness_id: int) -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db), restart_grace=60)
        await broker.start()
        try:
            assert broker.allocator.withheld == [1]  # stored as the witness's contest
            other = await _opened(broker, "other2")
            assert await broker.alloc(other, 1, 255) == [4]
            await broker.revoke(witness_id, "test")
            await broker.journal.drain()
            assert broker.allocator.withheld == []
            assert await broker.alloc(other, 1, 255) == [1]  # the backend agrees
            broker.allocator.check()
        finally:
            await broker.stop()

    witness_id = asyncio.run(before())
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT pasid, kind, set_id FROM quarantine").fetchall()
    assert rows == [(1, "contested", witness_id)]
    asyncio.run(after(witness_id))
