"""The event log as stored: PASIDs as runs text ("1-3,7"), and the reads Watch replays.

Each read opens a connection of its own: WAL lets it run beside the writer, whose
connection belongs to the writer alone.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from broker.core.namespace import runs
from broker.store.records import Event


def encode_runs(pasids: Sequence[int]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs(pasids))


def decode_runs(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def read_events(path: Path, after: int, limit: int) -> list[Event]:
    """Logged events with revision > after, oldest first, at most `limit`."""
    conn = sqlite3.connect(path, check_same_thread=False)
    try:
        rows = conn.execute(
            "SELECT revision, ts, kind, set_id, pasids, reason, holder_pid, holder_uid,"
            " holder_ns_pid FROM events WHERE revision > ? ORDER BY revision LIMIT ?",
            (after, limit),
        ).fetchall()
    finally:
        conn.close()
    return [
        Event(rev, ts, k, sid, decode_runs(ps), why, hpid, huid, hns)
        for rev, ts, k, sid, ps, why, hpid, huid, hns in rows
    ]


def oldest_revision(path: Path) -> int:
    """The first revision still in the log (0 when it is empty)."""
    conn = sqlite3.connect(path, check_same_thread=False)
    try:
        (v,) = conn.execute("SELECT COALESCE(MIN(revision), 0) FROM events").fetchone()
    finally:
        conn.close()
    return int(v or 0)
