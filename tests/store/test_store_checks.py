"""The store's own records that the start-up checks rest on (broker/store/checks.py): the
digest follows every kind of commit, the witness follows the log, the checkpoint timer
keeps the main file close behind the WAL; and what each check refuses. Real SQLite files.
(The damage a real broker's files suffer is in tests/e2e/test_store_corruption.py.)
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from broker.core.errors import StoreError
from broker.store import (
    AddPasids,
    CreateSet,
    DestroySet,
    RemovePasids,
    SetRow,
    SqliteStore,
    checks,
)
from broker.store.opening import WAL_BYTES


def _row(set_id: int) -> SetRow:
    return SetRow(set_id, f"vm{set_id}", 0, 10_000, 0, "h", 1.0)


def _table_digest(db: Path) -> checks.Digest:
    con = sqlite3.connect(db)
    held: dict[int, list[int]] = {}
    for set_id, pasid in con.execute("SELECT set_id, pasid FROM allocations"):
        held.setdefault(set_id, []).append(pasid)
    con.close()
    return checks.Digest.of(held)


def _stored(db: Path) -> tuple[int | None, int]:
    con = sqlite3.connect(db)
    digest = checks.read_digest(con)
    (rev,) = con.execute("SELECT MAX(revision) FROM events").fetchone()
    con.close()
    return digest, int(rev)


def test_digest_and_witness_follow_every_kind_of_commit(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(_row(1)), CreateSet(_row(2)), AddPasids(1, (1,)), AddPasids(1, (2,))])
    st.commit([AddPasids(2, tuple(range(10, 200))), AddPasids(2, (300, 302, 304))])
    st.commit([RemovePasids(2, (11, 12, 13, 302)), AddPasids(1, (3,))])
    st.commit([RemovePasids(1, (2,), quarantine_until=time.time() + 60)])
    st.commit([CreateSet(_row(3)), AddPasids(3, (500, 501)), DestroySet(3, "gone", pasids=None)])
    st.commit([DestroySet(2, "gone", pasids=(*tuple(range(14, 200)), 10, 300, 304))])
    st.close()  # the store holds its file exclusively while open
    digest, rev = _stored(db)
    assert digest == _table_digest(db).total
    assert checks.read_witness(db) == rev
    for _ in range(2):  # reopened as it is: nothing refused, the state as committed
        st = SqliteStore(db)
        snap = st.open()
        assert snap.holdings == {1: [1, 3]}
        st.close()


def test_the_digest_adds_no_page_to_a_commit(tmp_path: Path) -> None:
    """Its rows live in sqlite_sequence, which the events' AUTOINCREMENT writes anyway:
    an alloc's commit appends as many WAL frames as without the digest."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(_row(1)), AddPasids(1, (1,))])
    wal = Path(f"{db}-wal")
    before = wal.stat().st_size
    st.commit([AddPasids(1, (2,))])
    grown = wal.stat().st_size - before
    page = 4096 + 24  # a frame: its header and a page
    # allocations' leaf, events' leaf, sqlite_sequence: three frames (the WAL may also
    # have restarted: then it shrank).
    assert grown <= 3 * page, grown
    st.close()


def test_the_wal_keeps_its_file_across_a_checkpoint_and_a_crash_reads_the_live_log(
    tmp_path: Path,
) -> None:
    """After a checkpoint the WAL restarts from its beginning but keeps its file (up to
    opening.WAL_BYTES): the next commits overwrite blocks it already has, so their fsync
    writes data only (no new file size to journal). The files a crash leaves then (the
    new log, followed by an older log's frames) open as exactly what was committed."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(_row(1))])
    for p in range(1, 201):
        st.commit([AddPasids(1, (p,))])
    wal = Path(f"{db}-wal")
    grown = wal.stat().st_size
    assert 200 * 4096 < grown < WAL_BYTES
    st.checkpoint()
    st.commit([RemovePasids(1, (1, 2))])
    st.commit([AddPasids(1, (500,))])
    # Restarted (the two commits wrote over its first frames), not cut back to them.
    assert wal.stat().st_size == grown
    crash = tmp_path / "crash"
    crash.mkdir()
    for f in (db, wal, checks.witness_path(db)):  # as a SIGKILL would leave them
        shutil.copyfile(f, crash / f.name)
    st.close()
    snap = SqliteStore(crash / db.name).open()
    assert snap.holdings == {1: [*range(3, 201), 500]}


def test_a_free_of_rows_not_stored_recounts_the_digest(tmp_path: Path) -> None:
    """The engine naming a row the file lacks must not leave a digest that refuses the
    next start: the writer counts it again from the table (and logs the disagreement)."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(_row(1)), AddPasids(1, (1, 2))])
    st.commit([RemovePasids(1, (2, 7))])  # 7 was never stored
    st.close()
    assert _stored(db)[0] == _table_digest(db).total
    st = SqliteStore(db)
    assert st.open().holdings == {1: [1]}
    st.close()


def test_a_lagging_witness_is_accepted_and_brought_up(tmp_path: Path) -> None:
    """A crash between a commit and the witness's rewrite leaves it behind: allowed."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(_row(1)), AddPasids(1, (1,))])
    st.close()
    rev = checks.read_witness(db)
    assert rev == 2
    checks.write_witness(db, 1)
    st = SqliteStore(db)
    st.open()
    assert checks.read_witness(db) == 2
    st.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [("garbage", "not a revision"), ("99", "logged changes are missing")],
)
def test_a_bad_or_leading_witness_is_refused(tmp_path: Path, text: str, message: str) -> None:
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(_row(1)), AddPasids(1, (1,))])
    st.close()
    checks.witness_path(db).write_text(text)
    with pytest.raises(StoreError, match=message):
        SqliteStore(db).open()
    (kept,) = tmp_path.glob("b.db.corrupt-*")
    assert (kept / "b.db.revision").read_text() == text


def test_a_deleted_digest_row_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.close()
    con = sqlite3.connect(db)
    con.execute("DELETE FROM sqlite_sequence WHERE name = ?", (checks.DIGEST_ROW,))
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="digest row is missing"):
        SqliteStore(db).open()


def test_a_cant_open_is_not_called_corruption(tmp_path: Path) -> None:
    """A directory where the file should be: refused, but nothing is copied aside."""
    db = tmp_path / "b.db"
    db.mkdir()
    with pytest.raises(StoreError) as err:
        SqliteStore(db).open()
    assert "cannot be trusted" not in str(err.value)
    assert not list(tmp_path.glob("b.db.corrupt-*"))


def _verified(set_id: int) -> SetRow:
    """A set with a kernel-verified holder, as the broker stores one."""
    return SetRow(set_id, f"vm{set_id}", 4242, 100, 0, "h", 1.5, 987654, 0, 4242, 0, "uid:0")


def test_the_sets_digest_follows_creates_and_destroys(tmp_path: Path) -> None:
    """Each set's created row counts in the sets' digest until the set is destroyed;
    the updates a set's row gets later (quota, detach time, witness epoch) do not."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(_verified(1)), CreateSet(_row(2)), AddPasids(1, (1, 2))])
    st.commit([CreateSet(_row(3)), DestroySet(2, "gone", pasids=None)])
    st.commit([DestroySet(3, "gone", pasids=()), CreateSet(_verified(4))])
    st.close()
    con = sqlite3.connect(db)
    assert checks.read_sets_digest(con) == checks.count_sets_digest(con) != 0
    con.close()
    st = SqliteStore(db)
    assert sorted(r.set_id for r in st.open().sets) == [1, 4]
    st.close()


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE sets SET holder_start_time = holder_start_time + 1 WHERE set_id = 1",
        "UPDATE sets SET pid = 4243, holder_ns_pid = 4243 WHERE set_id = 1",
        "UPDATE sets SET owner = 'uid:1000' WHERE set_id = 1",
        "DELETE FROM sets WHERE set_id = 4",
    ],
    ids=["holder-start-time", "holder-pid", "owner", "set-deleted"],
)
def test_a_set_changed_outside_the_broker_is_refused(tmp_path: Path, edit: str) -> None:
    """One flipped bit in a holder's start time (or pid) passes SQLite's checks and the
    allocations' digest; recovery would take the live holder for a gone one and hand
    its PASIDs out again. The sets' digest refuses it, the files kept aside."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(_verified(1)), AddPasids(1, (1, 2)), CreateSet(_verified(4))])
    st.close()
    con = sqlite3.connect(db)
    con.execute(edit)
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="the sets do not match their digest"):
        SqliteStore(db).open()
    assert len(list(tmp_path.glob("b.db.corrupt-*"))) == 1


def test_a_store_from_before_the_sets_digest_is_sealed(tmp_path: Path) -> None:
    """A store written before the sets' digest existed has no row for it: accepted as
    it is, and the digest stored, so that the next start checks it."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(_verified(1)), AddPasids(1, (1, 2))])
    st.close()
    con = sqlite3.connect(db)
    con.execute("DELETE FROM sqlite_sequence WHERE name = ?", (checks.SETS_DIGEST_ROW,))
    con.commit()
    con.close()
    st = SqliteStore(db)
    assert [r.set_id for r in st.open().sets] == [1]
    st.close()
    con = sqlite3.connect(db)
    assert checks.read_sets_digest(con) == checks.count_sets_digest(con)
    con.execute("UPDATE sets SET holder_start_time = 1 WHERE set_id = 1")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="the sets do not match their digest"):
        SqliteStore(db).open()
