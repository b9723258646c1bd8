"""Quarantine rows: written in the free's (or the destroy's) own commit, read back at
open, and kept as small as the quarantine; withheld and contested PASIDs' rows, and the
sets' detach times (migration 0007)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from broker.store import (
    AddPasids,
    CreateSet,
    DestroySet,
    NoteSetState,
    ReleaseWithheld,
    RemovePasids,
    SetRow,
    SqliteStore,
    WithheldRow,
    Withhold,
)


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


def test_withheld_rows_outlive_time_and_a_later_quarantine(tmp_path: Path) -> None:
    """Withheld and contested PASIDs (issue 22, point 7) are rows no clock releases: the
    lazy delete of past "time" rows leaves them, and a free into quarantine of a
    contested PASID keeps its kind (the engine withholds it, not a timer)."""
    db = tmp_path / "b.db"
    st = _store_with_set(db)
    st.commit(
        [
            Withhold((10, 11), "detach", 7, 4242, 99, devices="c:511:0,c:511:1"),
            Withhold((12,), "free", 7),
            Withhold((2,), "contested"),  # set 1 still holds it
            Withhold((13,), "free", 7, claimant=5),  # a witness's set claims it too
        ]
    )
    st.commit([RemovePasids(1, (1,), 1.0)])  # a past row: the lazy delete runs
    st.commit([RemovePasids(1, (2,), 4_000_000_000.0)])  # contested: stays contested
    st.close()
    snap = SqliteStore(db).open()
    assert snap.withheld == {
        10: WithheldRow("detach", 7, 4242, 99, devices="c:511:0,c:511:1"),
        11: WithheldRow("detach", 7, 4242, 99, devices="c:511:0,c:511:1"),
        12: WithheldRow("free", 7),
        13: WithheldRow("free", 7, claimant=5),
        2: WithheldRow("contested"),
    }
    assert snap.quarantine == {}  # 1's row was past its time; 2 is not a "time" row


def test_released_withheld_rows_go_or_become_quarantine(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    st = _store_with_set(db)
    st.commit([Withhold((10, 11, 12), "detach", 7, 4242, 99)])
    st.commit([ReleaseWithheld((10,)), ReleaseWithheld((11,), 4_000_000_000.0)])
    st.commit([Withhold((12,), "free")])  # detached, then its free failed
    st.close()
    snap = SqliteStore(db).open()
    assert snap.withheld == {12: WithheldRow("free")}
    assert snap.quarantine == {11: 4_000_000_000.0}


def test_detach_times_are_stored(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    st = _store_with_set(db)
    st.commit([CreateSet(SetRow(2, "vm2", 0, 1000, 0, "h2", 1.0))])
    st.commit([NoteSetState(1, "set_detached", "stream broken", 1234.5)])
    st.commit([NoteSetState(2, "set_detached", "broker restarted", 99.0)])
    st.close()
    st = SqliteStore(db)
    assert [r.detached_unix for r in st.open().sets] == [1234.5, 99.0]
    st.commit([NoteSetState(1, "set_reattached", "")])
    st.close()
    assert [r.detached_unix for r in SqliteStore(db).open().sets] == [None, 99.0]
