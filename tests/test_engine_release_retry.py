"""A failed release (a set's destroy) is retried until it lands, and says why it failed.

In process, with the real simulator backend and a real SQLite file. The failure itself
is injected at a boundary nothing here can make on demand: a MemoryError from the
store's commit (what `prlimit --as` produced in issue 22), and one from the allocator
while the failed destroy is being undone. Everything else is the engine's own code.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from broker.backends.simulator import SimulatorBackend
from broker.core import StoreError, describe_error
from broker.engine import Broker
from broker.store import DestroySet, Event, Record, SqliteStore


class FailingDestroys(SqliteStore):
    """The first `failures` commits that destroy a set raise MemoryError() (no text)."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def commit(self, records: Sequence[Record]) -> list[Event]:
        if self.failures and any(isinstance(r, DestroySet) for r in records):
            self.failures -= 1
            raise MemoryError()
        return super().commit(records)


def stored(db: Path, store: SqliteStore | None = None) -> tuple[list[int], list[int]]:
    """Sets and PASIDs in the file; while `store` holds it (exclusively), in a copy
    made by SQLite's backup API on the store's own connection."""
    if store is not None:
        _, data = store.backup(None)
        db = db.with_name("copy.db")
        db.write_bytes(data)
    conn = sqlite3.connect(db)
    try:
        sets = [r for (r,) in conn.execute("SELECT set_id FROM sets ORDER BY set_id")]
        pasids = [p for (p,) in conn.execute("SELECT pasid FROM allocations ORDER BY pasid")]
    finally:
        conn.close()
    return sets, pasids


async def wait_for(pred: Callable[[], bool], seconds: float) -> None:
    """Poll: the retries are timers inside the engine, with no event to wait on."""
    for _ in range(int(seconds / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def test_describe_error_is_never_empty() -> None:
    assert describe_error(MemoryError()) == "MemoryError"
    assert describe_error(OSError(5, "Input/output error")) == "OSError EIO: Input/output error"
    err = sqlite3.OperationalError("disk I/O error")
    err.sqlite_errorname = "SQLITE_IOERR_FSYNC"  # type: ignore[attr-defined]
    assert describe_error(err) == "SQLITE_IOERR_FSYNC: disk I/O error"
    assert describe_error(ValueError("bad")) == "ValueError: bad"


def test_failed_release_is_retried_until_it_lands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "b.db"

    async def scenario() -> None:
        store = FailingDestroys(db, failures=2)
        broker = Broker(SimulatorBackend(pasid_bits=8), store)
        await broker.start()
        try:
            s1, _, _, created = broker.open_session("vm1")
            await created
            assert await broker.alloc(s1, 1, 255, 5) == [1, 2, 3, 4, 5]
            with pytest.raises(StoreError) as exc:
                await broker.sets.destroy_set(s1, "holder exited", "set_reclaimed")
            assert exc.value.message == "store commit failed: MemoryError"
            # Undone: held again in memory (detached), and still on disk.
            assert broker.session_of(s1.session_id) is s1 and not s1.attached
            assert broker.info().in_use == 5
            assert stored(db, store) == ([1], [1, 2, 3, 4, 5])
            # Retried each second: the second try fails too, the third lands.
            await wait_for(lambda: broker.session_of(s1.session_id) is None, 10)
            await broker.journal.drain()
            assert store.failures == 0
            assert broker.info().in_use == 0
            assert stored(db, store) == ([], [])
        finally:
            await broker.stop()

    with caplog.at_level(logging.ERROR, logger="pasid_broker"):
        asyncio.run(scenario())
    failed = [r for r in caplog.records if r.getMessage().startswith("store commit failed")]
    assert len(failed) == 2
    assert all(r.error == "store commit failed: MemoryError" for r in failed)


def test_release_retried_after_an_undo_that_failed_too(tmp_path: Path) -> None:
    """The undo of the failed destroy fails too (the allocator cannot take the set's
    PASIDs back): memory holds less of the set than the store. The retry deletes what the
    store holds, not what memory remembers: no allocation row is left without its set."""
    db = tmp_path / "b.db"

    async def scenario() -> None:
        store = FailingDestroys(db, failures=1)
        broker = Broker(SimulatorBackend(pasid_bits=8), store)
        await broker.start()
        try:
            s1, _, _, created = broker.open_session("vm1")
            await created
            s2, _, _, created = broker.open_session("vm2")
            await created
            await broker.alloc(s1, 1, 255, 4)
            await broker.alloc(s2, 1, 255, 2)
            claim = broker.allocator.claim

            def claim_fails_once(set_id: int, pasids: object) -> list[int]:
                broker.allocator.claim = claim  # type: ignore[method-assign]
                raise MemoryError()

            broker.allocator.claim = claim_fails_once  # type: ignore[method-assign]
            with pytest.raises(StoreError):
                await broker.sets.destroy_set(s1, "holder exited", "set_reclaimed")
            assert s1.release_partial and len(s1.set) == 0
            await wait_for(lambda: broker.session_of(s1.session_id) is None, 10)
            await broker.journal.drain()
            assert stored(db, store) == ([2], [5, 6])
        finally:
            await broker.stop()

    asyncio.run(scenario())
    # The file opens again: no allocation row left without its set (the start-up check).
    store = SqliteStore(db)
    snap = store.open()
    store.close()
    assert snap.holdings == {2: [5, 6]}
