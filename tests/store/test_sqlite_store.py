"""The store on a real SQLite file: records in, snapshot and event log out."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from broker.core import StoreError
from broker.store import (
    AddPasids,
    AwaitWitnesses,
    CreateSet,
    DeferRefrees,
    DestroySet,
    RemovePasids,
    SetRow,
    SqliteStore,
)


def row(set_id: int) -> SetRow:
    return SetRow(set_id, f"c{set_id}", 100 + set_id, 1000, 0, "h" * 64, 1.0)


def test_commit_load_and_event_log(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "b.db")
    assert st.open().sets == []
    evs = st.commit([CreateSet(row(1)), AddPasids(1, (1, 2, 3, 7))])
    assert [(e.revision, e.kind, e.pasids) for e in evs] == [
        (1, "set_created", ()),
        (2, "alloc", (1, 2, 3, 7)),
    ]
    evs = st.commit([RemovePasids(1, (2,)), CreateSet(row(2)), AddPasids(2, (2,))])
    assert [e.revision for e in evs] == [3, 4, 5]
    st.close()
    st = SqliteStore(tmp_path / "b.db")
    snap = st.open()
    assert snap.holdings == {1: [1, 3, 7], 2: [2]}
    assert snap.revision == 5 and snap.next_set_id == 3
    [ev] = st.commit([DestroySet(1, "client disconnected")])
    assert (ev.kind, ev.pasids, ev.reason) == ("set_destroyed", (1, 3, 7), "client disconnected")
    assert [e.revision for e in st.read_events(after=4)] == [5, 6]
    assert st.read_events(after=0, limit=2)[1].pasids == (1, 2, 3, 7)
    st.close()


def test_database_refuses_a_pasid_in_two_sets(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "b.db")
    st.open()
    st.commit([CreateSet(row(1)), CreateSet(row(2)), AddPasids(1, (5,))])
    with pytest.raises(StoreError, match=r"UNIQUE constraint failed: allocations\.pasid"):
        st.commit([AddPasids(2, (9,)), AddPasids(2, (5,))])
    st.close()
    snap = SqliteStore(tmp_path / "b.db").open()
    assert snap.holdings == {1: [5], 2: []}  # the failed batch left nothing behind
    assert snap.revision == 3


def test_destroy_with_the_engines_pasids_and_the_holder_in_the_log(tmp_path: Path) -> None:
    """A DestroySet may carry what the set held (no query per set when many die at once);
    a set_created event names a verified holder (migration 0003)."""
    st = SqliteStore(tmp_path / "b.db")
    st.open()
    verified = SetRow(1, "vm", 4242, 1000, 0, "h" * 64, 1.0, 777, 1000, 1, 99)
    [created, _, _] = st.commit([CreateSet(verified), AddPasids(1, (5, 6)), CreateSet(row(2))])
    assert (created.pid, created.uid, created.ns_pid) == (4242, 1000, 1)
    [ev] = st.commit([DestroySet(1, "holder process 4242 exited", "set_reclaimed", (6, 5))])
    assert ev.pasids == (5, 6)
    st.close()
    st = SqliteStore(tmp_path / "b.db")
    snap = st.open()
    assert snap.holdings == {2: []}
    [r2] = snap.sets
    assert not r2.verified and r2.start_time is None
    replayed = st.read_events(0)
    assert (replayed[0].pid, replayed[0].uid, replayed[0].ns_pid) == (4242, 1000, 1)
    assert replayed[2].uid is None  # set 2 had no verified holder
    st.close()


def test_the_store_holds_its_file_exclusively_and_makes_no_shm(tmp_path: Path) -> None:
    """Exclusive locking (issue 22): no -shm file (its mapping faulted SIGBUS on a full
    disk); another connection cannot even read while the store is open; reads (Watch's)
    and backups go through the store's own connection."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(row(1)), AddPasids(1, (5, 6))])
    assert not Path(f"{db}-shm").exists()
    with pytest.raises(sqlite3.OperationalError, match=r"locked|unable to open"):
        other = sqlite3.connect(db, timeout=0)
        try:
            other.execute("SELECT count(*) FROM allocations").fetchall()
        finally:
            other.close()
    assert [e.kind for e in st.read_events(0)] == ["set_created", "alloc"]
    assert st.oldest_revision() == 1
    pages, data = st.backup(None)  # in memory: the bytes of a database file
    (tmp_path / "copy.db").write_bytes(data)
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("SELECT pasid FROM allocations ORDER BY pasid").fetchall() == [(5,), (6,)]
    assert copy.execute("PRAGMA page_count").fetchone() == (pages,)
    copy.close()
    st.checkpoint()
    st.close()
    assert SqliteStore(db).open().holdings == {1: [5, 6]}


def test_a_batch_applies_its_records_in_order(tmp_path: Path) -> None:
    """Single-PASID allocs are inserted together (one statement per batch), but never
    past a record that frees, destroys or reads what they hold: a PASID freed or
    destroyed in a batch may be allocated again later in the same batch."""
    st = SqliteStore(tmp_path / "b.db")
    st.open()
    evs = st.commit(
        [
            CreateSet(row(1)),
            AddPasids(1, (8,)),
            AddPasids(1, (9,)),
            RemovePasids(1, (8,)),
            CreateSet(row(2)),
            AddPasids(2, (8,)),
            AddPasids(1, (10, 12)),  # scattered: joins the single-PASID inserts
            AddPasids(1, (20, 21, 22)),  # a run: one statement of its own
            DestroySet(1, "bye"),  # pasids=None: the store reads what set 1 holds
            CreateSet(row(3)),
            AddPasids(3, (9,)),
        ]
    )
    assert [(e.revision, e.kind, e.set_id, e.pasids) for e in evs] == [
        (1, "set_created", 1, ()),
        (2, "alloc", 1, (8,)),
        (3, "alloc", 1, (9,)),
        (4, "free", 1, (8,)),
        (5, "set_created", 2, ()),
        (6, "alloc", 2, (8,)),
        (7, "alloc", 1, (10, 12)),
        (8, "alloc", 1, (20, 21, 22)),
        (9, "set_destroyed", 1, (9, 10, 12, 20, 21, 22)),
        (10, "set_created", 3, ()),
        (11, "alloc", 3, (9,)),
    ]
    assert st.read_events(after=0) == evs  # what Watch replays is what was published
    st.close()
    snap = SqliteStore(tmp_path / "b.db").open()
    assert snap.holdings == {2: [8], 3: [9]}


def test_destroy_deletes_only_its_own_rows_and_the_foreign_key_check_returns(
    tmp_path: Path,
) -> None:
    """Without a set_id index (migration 0006) a destroy deletes the PASIDs the engine
    says the set held, by run, with foreign_keys off for that batch only: a row of
    another set's is never deleted, and the next batch refuses an orphan again."""
    st = SqliteStore(tmp_path / "b.db")
    st.open()
    st.commit([CreateSet(row(1)), CreateSet(row(2)), AddPasids(1, (5, 7)), AddPasids(2, (6,))])
    # The run 5-7 spans set 2's PASID 6: it stays.
    [ev] = st.commit([DestroySet(1, "bye", pasids=(5, 6, 7))])
    assert ev.pasids == (5, 6, 7)
    with pytest.raises(StoreError, match="FOREIGN KEY constraint failed"):
        st.commit([AddPasids(1, (9,))])  # set 1 is gone
    st.close()
    assert SqliteStore(tmp_path / "b.db").open().holdings == {2: [6]}


def test_batches_wider_than_one_insert_statement(tmp_path: Path) -> None:
    """Rows go in by multi-row INSERTs of at most 64 rows: a bigger batch is split, and
    its revisions still follow one another."""
    st = SqliteStore(tmp_path / "b.db")
    st.open()
    scattered = tuple(range(1000, 1300, 2))  # 150 PASIDs, no two adjacent
    evs = st.commit(
        [CreateSet(row(1)), AddPasids(1, scattered)] + [AddPasids(1, (p,)) for p in range(1, 151)]
    )
    assert [e.revision for e in evs] == list(range(1, 153))
    assert evs[1].pasids == scattered and evs[-1].pasids == (150,)
    assert st.read_events(after=0) == evs
    st.close()
    snap = SqliteStore(tmp_path / "b.db").open()
    assert snap.holdings == {1: sorted(range(1, 151)) + list(scattered)}


def test_an_orphan_allocation_is_refused_at_open(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(row(1)), AddPasids(1, (5,))])
    st.close()
    with sqlite3.connect(db) as c:
        c.execute("INSERT INTO allocations VALUES (9, 42)")
        c.execute("INSERT INTO allocations VALUES (3, 43)")
    c.close()
    msg = "foreign key check failed: allocations rowid 3 -> sets, allocations rowid 9 -> sets"
    with pytest.raises(StoreError, match=msg):
        SqliteStore(db).open()


def test_deferred_frees_are_replaced_per_set_and_go_with_their_set(tmp_path: Path) -> None:
    """DeferRefrees replaces the set's deferred frees (none: forgets them); a set's
    destroy deletes its own, and only its own; the witness wait goes with its row."""
    st = SqliteStore(tmp_path / "b.db")
    st.open()
    st.commit([CreateSet(row(1)), CreateSet(row(2)), AddPasids(1, (1, 2, 3)), AddPasids(2, (4,))])
    st.commit([DeferRefrees(1, (1, 2)), DeferRefrees(2, (4,)), AwaitWitnesses((1, 2), True)])
    st.commit([DeferRefrees(1, (2, 3))])
    st.close()
    st = SqliteStore(tmp_path / "b.db")
    snap = st.open()
    assert snap.deferred_refrees == {1: [2, 3], 2: [4]}
    assert [bool(r.witness_wait) for r in snap.sets] == [True, True]
    st.commit([DestroySet(2, "gone", pasids=(4,))])
    st.close()
    st = SqliteStore(tmp_path / "b.db")
    snap = st.open()
    assert snap.deferred_refrees == {1: [2, 3]} and [r.set_id for r in snap.sets] == [1]
    st.commit([DeferRefrees(1, ())])
    st.close()
    st = SqliteStore(tmp_path / "b.db")
    assert st.open().deferred_refrees == {}
    st.close()
