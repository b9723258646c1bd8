"""The event log as stored: PASIDs as runs text ("1-3,7"), and the reads Watch replays.

The reads run on the store's one connection, between commits: the broker holds the file
with exclusive locking (opening.connect), so no other connection could read it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


# A query on the store's one connection (Writer.read): rows of (sql, params).
Read = Callable[[str, Sequence[object]], list[tuple[Any, ...]]]


def read_events(read: Read, after: int, limit: int) -> list[Event]:
    """Logged events with revision > after, oldest first, at most `limit`."""
    rows = read(
        "SELECT revision, ts, kind, set_id, pasids, reason, holder_pid, holder_uid,"
        " holder_ns_pid FROM events WHERE revision > ? ORDER BY revision LIMIT ?",
        (after, limit),
    )
    return [
        Event(rev, ts, k, sid, decode_runs(ps), why, hpid, huid, hns)
        for rev, ts, k, sid, ps, why, hpid, huid, hns in rows
    ]


def oldest_revision(read: Read) -> int:
    """The first revision still in the log (0 when it is empty)."""
    ((v,),) = read("SELECT COALESCE(MIN(revision), 0) FROM events", ())
    return int(v or 0)
