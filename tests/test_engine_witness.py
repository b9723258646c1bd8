"""A complete witness (issue 22, point 2): on a resume, a client that states everything it
holds, with the set's current witness epoch, has the set's PASIDs it omits freed (frees
it was acknowledged that the store lost); anything less frees nothing.

In process, with the real simulator backend and a real SQLite file: whether a refreed
PASID really went back to the backend's pool, and what the store holds, are not visible
over the wire. The resume is Broker.open_session with a witness, as the Session stream
calls it (tests/e2e/test_witness.py drives the same over a socket, with a real lost free).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from broker.backends.simulator import SimulatorBackend
from broker.core import PasidError, Quarantine
from broker.engine import Broker, Session
from broker.engine.lifecycle import SetEvent
from broker.store import SqliteStore


async def _opened(broker: Broker, client: str, grace: int = 0) -> tuple[Session, str]:
    sess, token, _, created = broker.open_session(client, grace_seconds=grace)
    await created
    return sess, token


async def _resumed(
    broker: Broker, sess: Session, token: str, held: list[int] | None, epoch: int = 0
) -> Session:
    """`sess`'s stream breaks, and its client resumes stating `held` (None: by hand)."""
    broker.end_session(sess, "test: stream broke", SetEvent.STREAM_BROKEN)
    assert not sess.attached
    again, _, resumed, done = broker.open_session(
        "vm", resume_token=token, held=held, complete_epoch=epoch
    )
    assert resumed and again is sess
    await done
    return again


def _rows(db: Path, set_id: int) -> list[int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [
            p
            for (p,) in conn.execute(
                "SELECT pasid FROM allocations WHERE set_id = ? ORDER BY pasid", (set_id,)
            )
        ]


def test_a_complete_witness_frees_what_its_client_no_longer_holds(tmp_path: Path) -> None:
    db = tmp_path / "b.db"

    async def before() -> tuple[int, str, int]:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db))
        await broker.start()
        try:
            sess, token = await _opened(broker, "vm", grace=300)
            assert await broker.alloc(sess, 1, 255, 6) == [1, 2, 3, 4, 5, 6]
            return sess.session_id, token, sess.tell_witness_epoch()
        finally:
            await broker.stop()  # keeps the set (and its epoch) for the restart

    async def after(set_id: int, token: str, epoch: int) -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db), restart_grace=60)
        await broker.start()
        try:
            sess = broker.session_of(set_id)
            assert sess is not None and sess.witness_epoch == epoch  # stored
            # The client freed 2 and 5 (acknowledged; the store lost it) and holds 7,
            # which the store lost too: 2 and 5 are freed again, 7 claimed back.
            await _resumed(broker, sess, token, [1, 3, 4, 6, 7], epoch)
            assert sess.witness_complete
            assert sess.refreed == [2, 5]
            assert sess.reclaimed == [7]
            assert list(sess.set.pasids) == [1, 3, 4, 6, 7]
            other, _ = await _opened(broker, "other")
            assert await broker.alloc(other, 1, 255, 2) == [2, 5]  # the backend agrees
            broker.allocator.check()
        finally:
            await broker.stop()
        assert _rows(db, set_id) == [1, 3, 4, 6, 7]
        with contextlib.closing(sqlite3.connect(db)) as conn:
            ev = conn.execute(
                "SELECT pasids, reason FROM events WHERE kind = 'free' AND set_id = ?", (set_id,)
            ).fetchall()
        assert ev == [("2,5", "witness: a free acknowledged to the set's client")], ev

    asyncio.run(after(*asyncio.run(before())))


def test_a_refreed_pasid_keeps_the_quarantine_rules(tmp_path: Path) -> None:
    """A refree is a free: with --quarantine-seconds the PASIDs wait before reuse."""

    async def scenario() -> None:
        broker = Broker(
            SimulatorBackend(pasid_bits=8),
            SqliteStore(tmp_path / "b.db"),
            quarantine=Quarantine(seconds=300),
        )
        await broker.start()
        try:
            sess, token = await _opened(broker, "vm", grace=300)
            assert await broker.alloc(sess, 1, 255, 3) == [1, 2, 3]
            epoch = sess.tell_witness_epoch()
            await _resumed(broker, sess, token, [1, 3], epoch)
            assert sess.refreed == [2]
            assert broker.allocator.quarantined == 1
            other, _ = await _opened(broker, "other")
            assert await broker.alloc(other, 1, 255) == [4]  # 2 waits out its quarantine
        finally:
            await broker.stop()

    asyncio.run(scenario())


def test_anything_short_of_a_complete_current_witness_frees_nothing(tmp_path: Path) -> None:
    """A partial witness; a complete one with no epoch; one with an epoch the set has left
    (a unary change by token, a resume by hand): each leaves the set's PASIDs alone."""

    async def scenario() -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(tmp_path / "b.db"))
        await broker.start()
        try:
            sess, token = await _opened(broker, "vm", grace=300)
            assert await broker.alloc(sess, 1, 255, 4) == [1, 2, 3, 4]
            epoch = sess.tell_witness_epoch()

            await _resumed(broker, sess, token, [1])  # partial
            assert not sess.witness_complete and sess.refreed == []
            await _resumed(broker, sess, token, [1], 0)  # complete, but no epoch
            assert not sess.witness_complete and len(sess.set) == 4

            # A tool allocates by token: the stream's client does not see it.
            broker.change_by_token(sess)
            assert await broker.alloc(sess, 1, 255) == [5]
            assert sess.witness_epoch != epoch
            await _resumed(broker, sess, token, [1, 2, 3, 4], epoch)
            assert not sess.witness_complete
            assert list(sess.set.pasids) == [1, 2, 3, 4, 5]  # the tool's 5 stays

            # A listing tells the new epoch (with the whole set); a resume by hand (no
            # witness) changes it again: whoever knew the old one may not free.
            epoch = sess.tell_witness_epoch()
            await _resumed(broker, sess, token, None)
            assert sess.witness_epoch != epoch
            await _resumed(broker, sess, token, [1], epoch)
            assert not sess.witness_complete and len(sess.set) == 5

            # Only a witness with the current epoch is complete.
            await _resumed(broker, sess, token, [1, 2, 3, 4, 5], sess.tell_witness_epoch())
            assert sess.witness_complete and sess.refreed == []
            broker.allocator.check()
        finally:
            await broker.stop()

    asyncio.run(scenario())


def _unclean_restart_db(tmp_path: Path) -> tuple[Path, int, str, int, int, str]:
    """A store where set S holds 1-3 and set T holds 4, left by a run that ended without
    a clean stop: (db, S, S's token, S's epoch, T, T's token)."""
    db = tmp_path / "b.db"

    async def before() -> tuple[int, str, int, int, str]:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db))
        await broker.start()
        try:
            s, s_token = await _opened(broker, "s", grace=300)
            t, t_token = await _opened(broker, "t", grace=300)
            assert await broker.alloc(s, 1, 3, 3) == [1, 2, 3]
            assert await broker.alloc(t, 4, 4) == [4]
            return s.session_id, s_token, s.tell_witness_epoch(), t.session_id, t_token
        finally:
            await broker.stop()

    out = asyncio.run(before())
    Path(f"{db}.clean-stop").unlink()  # as after a kill -9: the next start is unclean
    return (db, *out)


def test_after_a_loss_a_refree_waits_for_the_other_sets_and_hands_over_what_they_claim(
    tmp_path: Path,
) -> None:
    """S's client freed 2 and T's client was given 2; the store lost both (it shows 2 in
    S, which freed it). S resumes first with a complete witness: 2 is not freed while T,
    which may hold it, has not resumed (it could otherwise go to a third set first). T
    resumes claiming 2: it is freed from S and claimed for T, no conflict."""
    db, s_id, s_token, s_epoch, t_id, t_token = _unclean_restart_db(tmp_path)

    async def after() -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db), restart_grace=60)
        await broker.start()
        try:
            s, t = broker.session_of(s_id), broker.session_of(t_id)
            assert s is not None and t is not None
            await _resume_detached(broker, s_token, [1, 3], s_epoch)
            assert s.witness_complete and s.refreed == []  # deferred
            assert list(s.set.pasids) == [1, 2, 3]
            await _resume_detached(broker, t_token, [2, 4])
            assert t.reclaimed == [2] and t.conflicts == []
            await broker.journal.drain()
            assert list(s.set.pasids) == [1, 3] and list(t.set.pasids) == [2, 4]
            assert s.witness_epoch != s_epoch  # S's client did not see it: a new epoch
            broker.allocator.check()
        finally:
            await broker.stop()
        assert _rows(db, s_id) == [1, 3] and _rows(db, t_id) == [2, 4]

    asyncio.run(after())


def test_a_deferred_refree_lands_once_the_other_sets_are_gone(tmp_path: Path) -> None:
    db, s_id, s_token, s_epoch, t_id, _t_token = _unclean_restart_db(tmp_path)

    async def after() -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db), restart_grace=60)
        await broker.start()
        try:
            s = broker.session_of(s_id)
            assert s is not None
            await _resume_detached(broker, s_token, [1, 3], s_epoch)
            assert list(s.set.pasids) == [1, 2, 3]  # T has not resumed: 2 waits
            await broker.revoke(t_id, "test")
            await asyncio.sleep(0)  # the deferred free runs after T's destroy
            await broker.journal.drain()
            assert list(s.set.pasids) == [1, 3]
            other, _ = await _opened(broker, "other")
            assert await broker.alloc(other, 1, 255, 2) == [2, 4]
        finally:
            await broker.stop()

    asyncio.run(after())


async def _resume_detached(broker: Broker, token: str, held: list[int], epoch: int = 0) -> Session:
    """A recovered (detached) set's client resumes, stating `held`."""
    sess, _, resumed, done = broker.open_session(
        "vm", resume_token=token, held=held, complete_epoch=epoch
    )
    assert resumed
    await done
    return sess


async def _started_on_a_failable_backend(db: Path) -> tuple[SimulatorBackend, Broker]:
    """A started broker, and its simulator backend, whose next operations the test can
    make fail (fail_next: the simulator's own fault injection)."""
    backend = SimulatorBackend(pasid_bits=8)
    broker = Broker(backend, SqliteStore(db))
    await broker.start()
    return backend, broker


def test_a_refree_the_backend_refuses_leaves_the_set_whole_and_the_open_served(
    tmp_path: Path,
) -> None:
    """The backend's free fails (the simulator's own fault injection): the free undoes
    itself, the set keeps the PASIDs, the resume is still served (its set is attached),
    and the next complete witness frees them."""

    async def scenario() -> None:
        backend, broker = await _started_on_a_failable_backend(tmp_path / "b.db")
        try:
            sess, token = await _opened(broker, "vm", grace=300)
            assert await broker.alloc(sess, 1, 255, 3) == [1, 2, 3]
            epoch = sess.tell_witness_epoch()
            backend.fail_next = 1
            await _resumed(broker, sess, token, [1, 3], epoch)
            assert sess.attached and sess.witness_complete and sess.refreed == []
            assert list(sess.set.pasids) == [1, 2, 3]
            await _resumed(broker, sess, token, [1, 3], epoch)
            assert sess.refreed == [2] and list(sess.set.pasids) == [1, 3]
            other, _ = await _opened(broker, "other")
            assert await broker.alloc(other, 1, 255) == [2]  # the backend agrees
            broker.allocator.check()
        finally:
            await broker.stop()

    asyncio.run(scenario())


def test_a_resume_whose_reclaim_fails_leaves_the_set_detached_for_the_next(
    tmp_path: Path,
) -> None:
    """The backend refuses a witness's reclaim: the resume fails, and the set is detached
    again (not left attached to a stream that never was), so the next resume works."""

    async def scenario() -> None:
        backend, broker = await _started_on_a_failable_backend(tmp_path / "b.db")
        try:
            sess, token = await _opened(broker, "vm", grace=300)
            assert await broker.alloc(sess, 1, 255, 2) == [1, 2]
            broker.end_session(sess, "test: stream broke", SetEvent.STREAM_BROKEN)
            backend.fail_next = 1
            with pytest.raises(PasidError):
                broker.open_session("vm", resume_token=token, held=[1, 2, 3])
            assert not sess.attached and broker.session_of(sess.session_id) is sess
            again, _, resumed, done = broker.open_session("vm", resume_token=token, held=[1, 2, 3])
            await done
            assert resumed and again is sess and sess.reclaimed == [3]
        finally:
            await broker.stop()

    asyncio.run(scenario())


def _deferred_rows(db: Path) -> list[tuple[int, int]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [
            (p, s)
            for p, s in conn.execute("SELECT pasid, set_id FROM deferred_refrees ORDER BY pasid")
        ]


def _deferred_then_restart(tmp_path: Path, clean: bool) -> tuple[Path, int, str, int, int, str]:
    """_unclean_restart_db, then a run where S resumes first with a complete witness
    omitting 2 (deferred: T has not resumed), ended by a clean stop or (not `clean`) as a
    kill -9 would (no clean-stop marker)."""
    db, s_id, s_token, s_epoch, t_id, t_token = _unclean_restart_db(tmp_path)

    async def run() -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db), restart_grace=60)
        await broker.start()
        try:
            s = await _resume_detached(broker, s_token, [1, 3], s_epoch)
            assert s.witness_complete and s.refreed == [] and list(s.set.pasids) == [1, 2, 3]
        finally:
            await broker.stop()

    asyncio.run(run())
    assert _deferred_rows(db) == [(2, s_id)]
    if not clean:
        Path(f"{db}.clean-stop").unlink()
    return db, s_id, s_token, s_epoch, t_id, t_token


def test_a_deferred_refree_and_its_wait_outlive_a_clean_restart(tmp_path: Path) -> None:
    """A clean restart keeps both the deferred free and the sets it waits for: S's
    complete witness again, after the restart, still frees nothing while T is awaited,
    and no other set can have 2 meanwhile; once T has resumed, the free lands."""
    db, s_id, s_token, s_epoch, _t_id, t_token = _deferred_then_restart(tmp_path, clean=True)

    async def after() -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db), restart_grace=60)
        await broker.start()
        try:
            s = await _resume_detached(broker, s_token, [1, 3], s_epoch)
            assert s.witness_complete and s.refreed == [] and list(s.set.pasids) == [1, 2, 3]
            other, _ = await _opened(broker, "other")
            assert await broker.alloc(other, 1, 255) == [5]  # not 2: T may hold it
            await _resume_detached(broker, t_token, [4])
            await broker.journal.drain()
            assert list(s.set.pasids) == [1, 3]
            assert await broker.alloc(other, 1, 255) == [2]
            broker.allocator.check()
        finally:
            await broker.stop()
        assert _rows(db, s_id) == [1, 3] and _deferred_rows(db) == []

    asyncio.run(after())


def test_a_deferred_refree_outlives_a_kill_and_lands_without_a_new_witness(tmp_path: Path) -> None:
    """After a kill -9 every set is awaited again; the stored free lands once they have
    resumed, though S's client now states only a partial witness (which frees nothing
    by itself): its earlier complete word stands."""
    db, s_id, s_token, _s_epoch, _t_id, t_token = _deferred_then_restart(tmp_path, clean=False)

    async def after() -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db), restart_grace=60)
        await broker.start()
        try:
            s = await _resume_detached(broker, s_token, [1, 3])  # partial
            assert not s.witness_complete and list(s.set.pasids) == [1, 2, 3]
            await _resume_detached(broker, t_token, [4])
            await broker.journal.drain()
            assert list(s.set.pasids) == [1, 3]
            broker.allocator.check()
        finally:
            await broker.stop()
        assert _rows(db, s_id) == [1, 3] and _deferred_rows(db) == []

    asyncio.run(after())


@pytest.mark.parametrize("s_first", [True, False], ids=["s-first", "s-last"])
def test_a_witness_that_states_a_deferred_pasid_withdraws_its_free(
    tmp_path: Path, s_first: bool
) -> None:
    """A stored deferral is an older word: if S's client states 2 again (after a restore
    or a loss, it may hold it again), the free is withdrawn, whether S resumes before T
    or last (when the wait ends with S's own resume): 2 never leaves S."""
    db, s_id, s_token, _s_epoch, _t_id, t_token = _deferred_then_restart(tmp_path, clean=False)

    async def after() -> None:
        broker = Broker(SimulatorBackend(pasid_bits=8), SqliteStore(db), restart_grace=60)
        await broker.start()
        try:
            if not s_first:
                await _resume_detached(broker, t_token, [4])
            s = await _resume_detached(broker, s_token, [1, 2])  # partial, states 2
            if s_first:
                await _resume_detached(broker, t_token, [4])
            await asyncio.sleep(0)
            await broker.journal.drain()
            assert list(s.set.pasids) == [1, 2, 3] and s.reclaimed == []
        finally:
            await broker.stop()
        assert _rows(db, s_id) == [1, 2, 3] and _deferred_rows(db) == []
        with contextlib.closing(sqlite3.connect(db)) as conn:
            frees = conn.execute(
                "SELECT pasids FROM events WHERE kind = 'free' AND set_id = ?", (s_id,)
            ).fetchall()
        assert frees == []

    asyncio.run(after())
