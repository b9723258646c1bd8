"""SetQuotas records: stored in the same journal as holdings, but they are configuration,
so they log no event (Watch and revisions are about holdings)."""

from __future__ import annotations

from pathlib import Path

from broker.store import CreateSet, SaveQuotas, SaveSetQuota, SetRow, SqliteStore


def test_saved_quotas_come_back_and_log_no_event(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "b.db")
    assert st.open().quotas is None
    [ev] = st.commit([CreateSet(SetRow(1, "vm", 0, 1000, 0, "h", 1.0, owner="uid:1000"))])
    assert st.commit([SaveQuotas(10, 20, 30), SaveSetQuota(1, 7)]) == []
    st.commit([SaveQuotas(11, 21, 31)])
    st.close()
    snap = SqliteStore(tmp_path / "b.db").open()
    assert snap.quotas == (11, 21, 31)
    assert snap.revision == ev.revision
    [row] = snap.sets
    assert (row.quota, row.owner) == (7, "uid:1000")
