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
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.backends.simulator import SimulatorBackend
from broker.engine import Broker, Session
from broker.engine.lifecycle import SetEvent
from broker.engine.observers import Observer
from broker.store import SqliteStore
from tests.test_engine_witness import _resume_detached


class _Resolved(Observer):
    """Records each resolved conflict (claimant set, PASIDs), as the metrics see it."""

    def __init__(self, out: list[tuple[int, int]]) -> None:
        self.out = out

    def pasid_conflict_resolved(self, set_id: int, pasids: int) -> None:
        self.out.append((set_id, pasids))


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
        async with _restarted(db) as broker:
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
        async with _restarted(db) as broker:
            assert broker.allocator.withheld == [1]  # stored as the witness's contest
            other = await _opened(broker, "other2")
            assert await broker.alloc(other, 1, 255) == [4]
            await broker.revoke(witness_id, "test")
            await broker.journal.drain()
            assert broker.allocator.withheld == []
            assert await broker.alloc(other, 1, 255) == [1]  # the backend agrees
            broker.allocator.check()

    witness_id = asyncio.run(before())
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT pasid, kind, set_id FROM quarantine").fetchall()
    assert rows == [(1, "contested", witness_id)]
    asyncio.run(after(witness_id))


_Set = tuple[int, str, int]  # (set, resume token, witness epoch)


def _lost_free_and_alloc_db(tmp_path: Path) -> tuple[Path, _Set, _Set, _Set]:
    """A store left by a run without a clean stop where set S holds 1-3, T holds 4 and U
    holds 5: as if S's client had freed 2 and T's client had then been given it, both
    acknowledged and both lost. Returns the db and S's, T's and U's (set, token, epoch)."""
    db = tmp_path / "b.db"

    async def before() -> dict[str, tuple[int, str, int]]:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db))
        await broker.start()
        try:
            out = {}
            for name, (lo, hi) in {"s": (1, 3), "t": (4, 4), "u": (5, 5)}.items():
                sess, token, _, created = broker.open_session(name, grace_seconds=300)
                await created
                assert await broker.alloc(sess, lo, hi, hi - lo + 1) == list(range(lo, hi + 1))
                out[name] = (sess.session_id, token, sess.tell_witness_epoch())
            return out
        finally:
            await broker.stop()

    sets = asyncio.run(before())
    Path(f"{db}.clean-stop").unlink()  # as after a kill -9: the next start is unclean
    return db, sets["s"], sets["t"], sets["u"]


@contextlib.asynccontextmanager
async def _restarted(
    store: Path | SqliteStore, observer: Observer | None = None
) -> AsyncIterator[Broker]:
    """The broker started again on a store a previous run left (a db path, or a store
    the test injects faults into), with the restart grace these tests wait within;
    stopped on the way out, whatever the test asserted."""
    if isinstance(store, Path):
        store = SqliteStore(store)
    broker = Broker(SimulatorBackend(pasid_bits=8), store, restart_grace=60)
    if observer is not None:
        broker.observers.subscribe(observer)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def _events(db: Path, kind: str) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(
            "SELECT set_id, pasids FROM events WHERE kind = ? ORDER BY set_id", (kind,)
        ).fetchall()


@pytest.mark.parametrize("u_last", [False, True], ids=["at-once", "deferred"])
def test_the_freers_complete_witness_hands_a_contested_pasid_to_its_claimant(
    tmp_path: Path, u_last: bool
) -> None:
    """T resumes first claiming 2, which the store gives to S: a conflict. Then S's
    complete witness omits 2: its client let go of it, so it is T's (whose client holds
    it), straight from S to T, and the conflict is resolved (reported: an event on both
    sets and the observer's count). `deferred`: U has not resumed when S does, so S's
    free waits; it lands as the hand-over once U resumes. 2 is never free meanwhile."""
    db, (s_id, s_token, s_epoch), (t_id, t_token, _), (u_id, u_token, _) = _lost_free_and_alloc_db(
        tmp_path
    )
    resolved: list[tuple[int, int]] = []

    async def after() -> None:
        async with _restarted(db, observer=_Resolved(resolved)) as broker:
            if not u_last:
                await _resume_detached(broker, u_token, [5])
            t = await _resume_detached(broker, t_token, [2, 4])
            assert t.conflicts == [2] and list(t.set.pasids) == [4]
            t_epoch = t.tell_witness_epoch()
            s = await _resume_detached(broker, s_token, [1, 3], s_epoch)
            assert s.witness_complete
            other, _, _, created = broker.open_session("other")
            await created
            if u_last:
                assert list(s.set.pasids) == [1, 2, 3]  # waits for U
                assert await broker.alloc(other, 1, 255) == [6]  # not 2
                await _resume_detached(broker, u_token, [5])
                await asyncio.sleep(0)
            await broker.journal.drain()
            assert list(s.set.pasids) == [1, 3] and list(t.set.pasids) == [2, 4]
            # T's client was told 2 was not its own: its next witness relies on a listing.
            assert t.witness_epoch != t_epoch
            assert broker.allocator.withheld == []
            assert 2 not in await broker.alloc(other, 1, 255, 2)
            broker.allocator.check()
        assert resolved == [(t_id, 1)]
        assert _events(db, "pasid_conflict_resolved") == sorted([(s_id, "2"), (t_id, "2")])
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("SELECT pasid FROM quarantine").fetchall() == []
            rows = conn.execute("SELECT pasid, set_id FROM allocations WHERE pasid = 2")
            assert rows.fetchall() == [(2, t_id)]
        assert u_id not in (s_id, t_id)

    asyncio.run(after())


def test_a_pasid_two_witnesses_claim_goes_to_neither(tmp_path: Path) -> None:
    """T and U both claim 2 (one of them from a stale, partial witness), which the store
    gives to S; S's complete witness then omits it. Nobody's word settles whose it is:
    it is withheld, handed to neither; and it stays withheld until both claimants' sets
    are gone (the first one's end passes the claim on), then it is free."""
    db, (_s_id, s_token, s_epoch), (_t_id, t_token, _), (_u_id, u_token, _) = (
        _lost_free_and_alloc_db(tmp_path)
    )

    async def after() -> None:
        async with _restarted(db) as broker:
            t = await _resume_detached(broker, t_token, [2, 4])
            u = await _resume_detached(broker, u_token, [2, 5])
            assert t.conflicts == [2] and u.conflicts == [2]
            s = await _resume_detached(broker, s_token, [1, 3], s_epoch)
            await broker.journal.drain()
            assert list(s.set.pasids) == [1, 3]
            assert list(t.set.pasids) == [4] and list(u.set.pasids) == [5]
            assert broker.allocator.withheld == [2]
            broker.allocator.check()
            await broker.revoke(u.session_id, "test")  # the claimant the row names
            await broker.journal.drain()
            assert broker.allocator.withheld == [2]  # T still claims it
            assert broker.stuck.sole_claimant(2) == t.session_id
            await broker.revoke(t.session_id, "test")
            await broker.journal.drain()
            assert broker.allocator.withheld == []
            other, _, _, created = broker.open_session("other")
            await created
            assert await broker.alloc(other, 2, 2) == [2]
            broker.allocator.check()

    asyncio.run(after())


def test_once_one_of_two_claimants_is_gone_the_other_is_handed_the_pasid(
    tmp_path: Path,
) -> None:
    """T and U both claim 2 while S holds it; U's set ends (its claim passes to T, the
    only claimant left); then S's complete witness omits 2: it is T's."""
    db, (_s_id, s_token, s_epoch), (_t_id, t_token, _), (_u_id, u_token, _) = (
        _lost_free_and_alloc_db(tmp_path)
    )

    async def after() -> None:
        async with _restarted(db) as broker:
            u = await _resume_detached(broker, u_token, [2, 5])
            t = await _resume_detached(broker, t_token, [2, 4])
            await broker.revoke(u.session_id, "test")
            await broker.journal.drain()
            assert broker.stuck.sole_claimant(2) == t.session_id
            s = await _resume_detached(broker, s_token, [1, 3], s_epoch)
            await broker.journal.drain()
            assert list(s.set.pasids) == [1, 3] and list(t.set.pasids) == [2, 4]
            assert broker.allocator.withheld == []
            broker.allocator.check()

    asyncio.run(after())


def test_a_hand_over_whose_commit_fails_leaves_the_contest_as_it_was(tmp_path: Path) -> None:
    """The hand-over's batch fails (a full disk: injected at the store's boundary, as in
    test_engine_commits_failing): 2 is back in S's set, contested, T still its claimant,
    and nobody can be given it; once the disk has room, S's next complete witness hands
    it over."""
    from broker.core import StoreError
    from tests.test_engine_commits_failing import RefusingDisk

    db, (s_id, s_token, s_epoch), (t_id, t_token, _), (_u_id, u_token, _) = _lost_free_and_alloc_db(
        tmp_path
    )

    async def after() -> None:
        store = RefusingDisk(db, "SQLITE_FULL", "database or disk is full")
        async with _restarted(store) as broker:
            await _resume_detached(broker, u_token, [5])
            t = await _resume_detached(broker, t_token, [2, 4])
            assert t.conflicts == [2]
            store.refusing = True
            with pytest.raises(StoreError):
                await _resume_detached(broker, s_token, [1, 3], s_epoch)
            s = broker.session_of(s_id)
            assert s is not None and list(s.set.pasids) == [1, 2, 3]
            assert list(t.set.pasids) == [4]
            assert broker.stuck.sole_claimant(2) == t_id
            broker.allocator.check()
            store.refusing = False
            # The open's stream ends on its failure (session_stream does this).
            broker.end_session(s, "test: its open failed", SetEvent.STREAM_BROKEN)
            await _resume_detached(broker, s_token, [1, 3], s_epoch)
            await broker.journal.drain()
            assert list(s.set.pasids) == [1, 3] and list(t.set.pasids) == [2, 4]
            broker.allocator.check()
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("SELECT pasid, set_id FROM allocations WHERE pasid = 2")
            assert rows.fetchall() == [(2, t_id)]
            assert conn.execute("SELECT pasid FROM quarantine").fetchall() == []

    asyncio.run(after())


def test_both_claimants_outlive_a_clean_restart(tmp_path: Path) -> None:
    """As above, with a clean restart once 2 is withheld for both claimants: the row
    names U and keeps T too (quarantine.also_claimed), so U's end after the restart
    passes the claim on to T instead of letting 2 go."""
    db, (_s_id, s_token, s_epoch), (t_id, t_token, _), (u_id, u_token, _) = _lost_free_and_alloc_db(
        tmp_path
    )

    async def before() -> None:
        async with _restarted(db) as broker:
            await _resume_detached(broker, t_token, [2, 4])
            await _resume_detached(broker, u_token, [2, 5])
            await _resume_detached(broker, s_token, [1, 3], s_epoch)
            assert broker.allocator.withheld == [2]

    async def after() -> None:
        async with _restarted(db) as broker:
            assert broker.allocator.withheld == [2]
            assert broker.stuck.sole_claimant(2) is None  # two claim it
            await broker.revoke(u_id, "test")
            await broker.journal.drain()
            assert broker.allocator.withheld == [2]
            assert broker.stuck.sole_claimant(2) == t_id

    async def last() -> None:
        async with _restarted(db) as broker:
            assert broker.allocator.withheld == [2]  # T's claim, stored alone now
            await broker.revoke(t_id, "test")
            await broker.journal.drain()
            assert broker.allocator.withheld == []
            broker.allocator.check()

    asyncio.run(before())
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT pasid, kind, claimant, also_claimed FROM quarantine")
        assert rows.fetchall() == [(2, "contested", u_id, str(t_id))]
    asyncio.run(after())
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT pasid, kind, claimant, also_claimed FROM quarantine")
        assert rows.fetchall() == [(2, "contested", t_id, None)]
    asyncio.run(last())
