"""While commits fail, the journal says so, probes the disk, and gives up on an I/O error
that lasts (issue 22: a broker that can change nothing must not look ready).

In process, with the real simulator backend and a real SQLite file. The write errors
are injected at the store's boundary, as the sqlite3 errors SQLite raises for them
(SQLITE_FULL, SQLITE_IOERR_WRITE): a full or read-only disk on demand, in process, is
what nothing here can make (the real ones are made for a real broker process in
tests/e2e/test_faults.py and tests/e2e/test_device_faults.py). Everything else is the
engine's own code: the journal, its probe writes on the store's writer thread, the
release retry.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from broker.backends.simulator import SimulatorBackend
from broker.core import NotReady, StoreError, StoreFailed
from broker.engine import Broker
from broker.engine import journal as journal_mod
from broker.store import Event, Record, SqliteStore
from broker.store.writer import PROBE_KEY
from tests.test_engine_release_retry import stored, wait_for


def sqlite_error(code: str, text: str) -> sqlite3.OperationalError:
    """The error SQLite raises for `code` (its name is how the store tells them apart)."""
    err = sqlite3.OperationalError(text)
    err.sqlite_errorname = code  # type: ignore[attr-defined]
    return err


class RefusingDisk(SqliteStore):
    """Every write (commit and probe) raises `code` while `refusing`; counts the probes."""

    def __init__(self, path: Path, code: str, text: str) -> None:
        super().__init__(path)
        self.code, self.text = code, text
        self.refusing = False
        self.probes = 0

    def commit(self, records: Sequence[Record]) -> list[Event]:
        if self.refusing:
            raise StoreError(f"store commit failed: {self.code}: {self.text}", self.code)
        return super().commit(records)

    def probe(self) -> None:
        self.probes += 1
        if self.refusing:
            raise StoreError(f"store write probe failed: {self.code}: {self.text}", self.code)
        super().probe()


@pytest.fixture(autouse=True)
def quick_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "PROBE_SECONDS", 0.1)


async def started(
    db: Path, code: str, text: str, store_error_exit: float
) -> tuple[RefusingDisk, Broker]:
    """A started broker (simulator) over a disk that, once told to, refuses with `code`."""
    store = RefusingDisk(db, code, text)
    broker = Broker(SimulatorBackend(pasid_bits=8), store, store_error_exit=store_error_exit)
    await broker.start()
    return store, broker


def test_commits_failing_until_a_probe_lands_without_any_request(tmp_path: Path) -> None:
    """A full disk: the failed alloc starts the clock; while it fails the journal probes
    (no request comes: an unready broker is sent none); once there is room the probe
    lands and the clock stops. SQLITE_FULL never gives up, however long it lasts. The
    probe's write is a real one (its row is in the file)."""
    db = tmp_path / "b.db"
    failures: list[StoreFailed] = []

    async def scenario() -> None:
        store, broker = await started(db, "SQLITE_FULL", "database or disk is full", 0.3)
        broker.journal._on_failure = failures.append
        try:
            s1, _, _, created = broker.open_session("vm1")
            await created
            assert await broker.alloc(s1, 1, 255, 2) == [1, 2]
            assert broker.store_failing_seconds() == 0.0
            store.refusing = True
            with pytest.raises(StoreError) as exc:
                await broker.alloc(s1, 1, 255, 1)
            assert exc.value.code == "SQLITE_FULL"
            assert broker.store_failing_seconds() > 0
            assert broker.journal.failing_error is not None
            assert broker.journal.failing_error.code == "SQLITE_FULL"
            await asyncio.sleep(1.0)  # past store_error_exit: a full disk is waited for
            assert store.probes >= 3 and not failures and broker.failure is None
            assert broker.store_failing_seconds() >= 1.0
            store.refusing = False
            await wait_for(lambda: broker.store_failing_seconds() == 0.0, 5)
            assert broker.journal.failing_error is None
            probes = store.probes
            await asyncio.sleep(0.5)
            assert store.probes == probes  # no probing while commits land
            assert await broker.alloc(s1, 1, 255, 1) == [3]
            assert stored(db, store) == ([1], [1, 2, 3])
            (row,) = store._require().read("SELECT value FROM meta WHERE key = ?", (PROBE_KEY,))
            assert float(str(row[0])) > 0
        finally:
            await broker.stop()

    asyncio.run(scenario())


def test_a_landed_commit_ends_the_failing_state_too(tmp_path: Path) -> None:
    db = tmp_path / "b.db"

    async def scenario() -> None:
        store, broker = await started(db, "SQLITE_IOERR_WRITE", "disk I/O error", 60)
        try:
            s1, _, _, created = broker.open_session("vm1")
            await created
            store.refusing = True
            with pytest.raises(StoreError):
                await broker.alloc(s1, 1, 255, 1)
            assert broker.store_failing_seconds() > 0
            store.refusing = False
            assert await broker.alloc(s1, 1, 255, 1) == [1]
            assert broker.store_failing_seconds() == 0.0
        finally:
            await broker.stop()

    asyncio.run(scenario())


def test_an_io_error_that_lasts_gives_up_like_a_failed_fsync(tmp_path: Path) -> None:
    """SQLITE_IOERR_WRITE (a filesystem turned read-only answers EROFS) for longer than
    store_error_exit: the probes keep failing, and then the journal fails for good
    (StoreFailed, once: the server exits 3 on it); every later change is refused at once.
    A dead holder's release that failed meanwhile is not lost: it is in the store still,
    and the restart's recovery reclaims it."""
    db = tmp_path / "b.db"
    failures: list[StoreFailed] = []

    async def scenario() -> None:
        store, broker = await started(db, "SQLITE_IOERR_WRITE", "disk I/O error", 0.5)
        on_failure = broker.journal._on_failure
        assert on_failure is not None

        def seen(exc: StoreFailed) -> None:
            failures.append(exc)
            on_failure(exc)

        broker.journal._on_failure = seen
        try:
            s1, _, _, created = broker.open_session("vm1")
            await created
            assert await broker.alloc(s1, 1, 255, 2) == [1, 2]
            store.refusing = True
            with pytest.raises(StoreError):
                await broker.sets.destroy_set(s1, "holder exited", "set_reclaimed")
            await wait_for(lambda: bool(failures), 5)
            (failure,) = failures
            assert failure.code == "SQLITE_IOERR_WRITE"
            assert failure.message.startswith("store writes failed for ")
            assert failure.message.endswith("SQLITE_IOERR_WRITE: disk I/O error"), failure
            assert broker.failure is failure and broker.failed.is_set()
            with pytest.raises(NotReady, match="store writes failed"):
                broker.open_session("vm2")
            await asyncio.sleep(0.3)
            assert len(failures) == 1
            # The set whose release failed is still stored (read through the store's
            # own connection: after a StoreFailed nothing closes it, as before an exit).
            assert stored(db, store) == ([1], [1, 2])
        finally:
            await broker.stop()

    asyncio.run(scenario())
