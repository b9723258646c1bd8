"""Quarantine rows: written in the free's (or the destroy's) own commit, read back at
open, and kept as small as the quarantine."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from broker.store import AddPasids, CreateSet, DestroySet, RemovePasids, SetRow, SqliteStore


def _store_with_set(path: Path) -> SqliteStore:
    st = SqliteStore(path)
    st.open()
    st.commit([CreateSet(SetRow(1, "vm", 0, 1000, 0, "h", 1.0)), AddPasids(1, (1, 2, 3, 4))])
    return st


def test_free_and_destroy_keep_release_times(tmp_path: Path) -> None:
    st = _store_with_set(tmp_path / "b.db")
    far = 4_000_000_000.0  # a release time far ahead: nothing expires during the test
    st.commit([RemovePasids(1, (1, 2), far)])
    st.commit([DestroySet(1, "exit", pasids=(3, 4), quarantine_until=far + 1)])
    st.close()
    snap = SqliteStore(tmp_path / "b.db").open()
    assert snap.quarantine == {1: far, 2: far, 3: far + 1, 4: far + 1}
    assert snap.holdings == {}


def test_a_destroy_the_store_reads_quarantines_what_the_set_held(tmp_path: Path) -> None:
    st = _store_with_set(tmp_path / "b.db")
    st.commit([DestroySet(1, "exit", quarantine_until=4_000_000_000.0)])  # pasids=None
    st.close()
    assert sorted(SqliteStore(tmp_path / "b.db").open().quarantine) == [1, 2, 3, 4]


def test_no_quarantine_writes_no_row_and_a_later_free_deletes_expired_ones(
    tmp_path: Path,
) -> None:
    db = tmp_path / "b.db"
    st = _store_with_set(db)
    st.commit([RemovePasids(1, (1,))])  # quarantine off: no row
    st.close()  # the store holds its file exclusively while open
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)
    c.close()
    st = SqliteStore(db)
    st.open()
    st.commit([RemovePasids(1, (2,), 1.0)])  # already past (1970): deleted by a later free
    st.commit([RemovePasids(1, (3,), 4_000_000_000.0)])
    st.close()
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT pasid FROM quarantine").fetchall() == [(3,)]
    c.close()
