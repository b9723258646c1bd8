"""The write path: one batch of records per transaction on the writer's connection, and
the checkpoints that keep the WAL file small.

Durability argument (docs/durability.md): WAL, with synchronous=FULL by default
(--durability fsync): COMMIT returns only once the WAL is fsynced, so an acknowledged
commit is on the device. With --durability page-cache (synchronous=NORMAL) it returns
once the WAL is in the page cache, which survives a crash of the broker process but not
a device write error, a filesystem turning read-only or an OS crash. Either way, a
failed fsync (in a commit, or any I/O error in a checkpoint) raises StoreFailed: what the
page cache holds may never reach the device, and the broker must stop acknowledging and
restart from what is durable (fsyncgate). Writers use BEGIN IMMEDIATE, because a deferred
transaction that upgrades to a write gets SQLITE_BUSY at once in WAL mode, ignoring
busy_timeout. (The pragmas are set where the connection is made: opening.connect.)

Why plain sqlite3 and not SQLAlchemy: the commit is the broker's hot path, and SQLAlchemy
Core cost 5-6x raw sqlite3 per statement there (docs/performance.md); a multi-row INSERT
per table per batch is all the SQL the common commit needs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from broker.core.errors import StoreError, StoreFailed
from broker.core.namespace import runs
from broker.store.checks import (
    DIGEST_ROW,
    SET_DIGEST,
    SET_IDENTITY,
    SETS_DIGEST_ROW,
    Digest,
    P,
    Witness,
    row_identity,
    set_weight,
    weight,
)
from broker.store.event_log import encode_runs
from broker.store.opening import WAL_BYTES, describe
from broker.store.records import (
    AddPasids,
    AwaitWitnesses,
    CreateSet,
    DeferRefrees,
    DestroySet,
    Event,
    LogConflict,
    NoteSetState,
    Record,
    ReleaseWithheld,
    RemovePasids,
    SaveQuotas,
    SaveSetQuota,
    SetWitnessEpoch,
    Withhold,
)

log = logging.getLogger("pasid_broker")

# The WAL is checkpointed into the database once it passes this size (SQLite's own
# default is 1000 pages), by checkpoint() after a commit on the writer's thread. Its
# file is cut back to this size, not to nothing, when it restarts (opening.connect).
CHECKPOINT_BYTES = WAL_BYTES
# ... and this many seconds after a commit at the latest (the journal's timer, on the
# writer's thread), so that the main file is never far behind the WAL: a WAL lost or
# damaged then costs at most these seconds, and the start-up checks refuse it
# (broker/store/checks.py).
CHECKPOINT_SECONDS = 5.0

# The `meta` row that Writer.probe rewrites (when it last wrote: nothing reads it back).
PROBE_KEY = "write_probe"

# Errors of a commit after which the page cache can no longer be trusted: the fsync of
# the WAL (or of its directory) failed, so the kernel may have dropped the dirty pages it
# could not write while still serving them from memory; a retried fsync then "succeeds"
# over a hole. A corrupt page is no better. Other commit errors (SQLITE_FULL, a write
# refused with EPERM or EROFS, SQLITE_BUSY) leave what is already written intact: the
# batch is undone and the next one may succeed. In a checkpoint every I/O error counts
# (it writes and fsyncs the database file), but not SQLITE_FULL (nothing was lost).
# (Such errors that last are the journal's to judge: engine/journal.py, CommitHealth.)
FATAL_COMMIT_ERRORS = frozenset(
    {"SQLITE_IOERR_FSYNC", "SQLITE_IOERR_DIR_FSYNC", "SQLITE_IOERR_CORRUPTFS"}
)


def is_fatal(exc: sqlite3.Error, *, checkpoint: bool = False) -> bool:
    """Whether this error means that the store can no longer be trusted (StoreFailed)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name in FATAL_COMMIT_ERRORS or name.startswith("SQLITE_CORRUPT"):
        return True
    return checkpoint and name.startswith("SQLITE_IOERR")


def _commit_error(what: str, exc: sqlite3.Error) -> StoreError:
    """The StoreError for a failed write (StoreFailed if is_fatal), with SQLite's code."""
    code = getattr(exc, "sqlite_errorname", "") or ""
    cls = StoreFailed if is_fatal(exc) else StoreError
    return cls(f"{what}: {describe(exc)}", code)


# Rows lo..hi of one set in one statement (1,024 PASIDs: 0.6-0.7 ms vs 1.3-1.7 ms by
# executemany, which binds and steps once per row).
_INSERT_RUN = (
    "WITH RECURSIVE r(p) AS (SELECT ? UNION ALL SELECT p + 1 FROM r WHERE p < ?)"
    " INSERT INTO allocations (pasid, set_id) SELECT p, ? FROM r"
)


# Rows go in by multi-row INSERT ... VALUES (?, ?), (?, ?), ...: one statement per
# batch instead of one execution per row (executemany), which at 16 rows costs half as
# much in SQLite, and for events updates the AUTOINCREMENT counter once, not per row.
_ALLOC_HEAD = "INSERT INTO allocations (pasid, set_id) VALUES "
_EVENT_HEAD = (
    "INSERT INTO events (ts, kind, set_id, pasids, reason, holder_pid, holder_uid,"
    " holder_ns_pid) VALUES "
)
# Rows per statement: each size is its own prepared statement (the connection caches
# them, see opening.connect), and 64 x 8 parameters stay far below SQLite's limit.
_ROWS_PER_INSERT = 64
# The same event's fields after its revision (pasids as a tuple): an Event is
# (revision, *_EventFields).
_EventFields = tuple[float, str, int, tuple[int, ...], str, int | None, int | None, int | None]


@functools.cache
def _values_sql(head: str, width: int, rows: int) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return head + ", ".join([row] * rows)


def _insert(conn: sqlite3.Connection, head: str, width: int, params: list[object]) -> int:
    """Insert the rows whose `width` columns lie flat in `params`, at most
    _ROWS_PER_INSERT to a statement; returns the last row's rowid."""
    step = width * _ROWS_PER_INSERT
    last = 0
    for i in range(0, len(params), step):
        chunk = params if len(params) <= step else params[i : i + step]
        cur = conn.execute(_values_sql(head, width, len(chunk) // width), chunk)
        last = cur.lastrowid or 0
        cur.close()
    return last


def _add_many(conn: sqlite3.Connection, sid: int, pasids: Sequence[int], adds: list[object]) -> str:
    """An AddPasids of several PASIDs: scattered ones join `adds`; runs are counted
    out by SQLite, one statement each (half the cost of a row each). Returns the
    event's text for them."""
    rs = runs(pasids)
    if len(rs) == len(pasids):
        for p in pasids:
            adds += (p, sid)
    else:
        for lo, hi in rs:
            conn.execute(_INSERT_RUN, (lo, hi, sid)).close()
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in rs)


def _delete(conn: sqlite3.Connection, set_id: int, pasids: Sequence[int]) -> int:
    """Delete these allocation rows of the set's, by run: a set's free is usually a
    few runs, whatever it held. A run's every PASID is one of `pasids` (the PASID
    is the key), and a row of another set's is never touched. Returns the rows deleted."""
    cur = conn.executemany(
        "DELETE FROM allocations WHERE pasid BETWEEN ? AND ? AND set_id = ?",
        [(lo, hi, set_id) for lo, hi in runs(pasids)],
    )
    n = cur.rowcount
    cur.close()
    return n


def _count_digest(conn: sqlite3.Connection) -> tuple[int, int]:
    """The digest (checks.Digest) counted from the table: a scan, for the rare commit
    whose rows differ from what the engine named."""
    count = total = 0
    for set_id, n, s in conn.execute(
        "SELECT set_id, COUNT(*), SUM(pasid) FROM allocations GROUP BY set_id"
    ):
        count += n
        total = (total + weight(set_id) * s) % P
    return count, total


class Writer:
    """The writer's connection (opening.open_database made it) and what the write path
    remembers between commits: the pragmas it last set, the commits since the WAL was
    last looked at, whether quarantine rows may be due. One batch at a time goes
    through commit(), on the journal's writer thread."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, event_retention: int, digest: Digest
    ) -> None:
        self.path = path
        # Keep at least this many events; older ones are compacted away in chunks.
        self.event_retention = event_retention
        # The only connection to the file (exclusive locking): Watch reads through it.
        self._conn = conn
        self._fk = True  # foreign_keys, as opening.connect set it (see commit())
        self._last_batch = 0
        self._commits = 0
        # The connection is the only way into the file (exclusive locking): commits (the
        # journal's writer thread), Watch's reads and backups (worker threads) take turns.
        self.lock = threading.Lock()
        # The batch being written put PASIDs into the quarantine table (commit()).
        self._quarantined = False
        # The allocations' digest as committed, and the batch's change to it (written in
        # the batch's own transaction), and the witness of the last revision
        # (broker/store/checks.py: what opening checks them against).
        self._digest = digest
        self._dcount = 0
        self._dtotal = 0
        self._dsets = 0  # the batch's change to the sets' digest
        self._recount = False
        (rev,) = conn.execute("SELECT COALESCE(MAX(revision), 0) FROM events").fetchone()
        self._witness = Witness(path, int(rev or 0))

    def close(self) -> None:
        with self.lock:
            self._conn.close()
        self._witness.close()

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """Rows of a query on the writer's connection, between commits (Watch's replay:
        no other connection can read the file)."""
        with self.lock:
            return self._conn.execute(sql, params).fetchall()

    def backup(self, dest: Path | None) -> tuple[int, bytes]:
        """A consistent copy of the database (SQLite's backup API on the writer's
        connection, between commits; they wait meanwhile, about a second per 100 MB of
        database): into the new file `dest`, or with dest None into memory, returned as
        the file's bytes. Returns (its page count, the bytes or b"")."""
        out = sqlite3.connect(":memory:" if dest is None else dest)
        try:
            with self.lock:
                self._conn.backup(out)
            pages = int(out.execute("PRAGMA page_count").fetchone()[0])
            return pages, out.serialize() if dest is None else b""
        finally:
            out.close()

    def set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self._set_meta(key, value)

    def _set_meta(self, key: str, value: str) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def probe(self) -> None:
        """One small durable write (a `meta` row, fsynced like a commit), to learn whether
        commits can land again while they fail and no request comes to try (the journal
        calls it then: docs/durability.md, "Commits failing"). StoreError as a commit's."""
        with self.lock:
            try:
                self._set_meta(PROBE_KEY, f"{time.time():.3f}")
            except sqlite3.Error as exc:
                raise _commit_error("store write probe failed", exc) from exc

    def commit(self, records: Sequence[Record]) -> list[Event]:
        """Make every record durable in one transaction, or none of them (StoreError):
        _commit, with the connection to itself."""
        with self.lock:
            return self._commit(records)

    def _commit(self, records: Sequence[Record]) -> list[Event]:
        """Make every record durable in one transaction, or none of them (StoreError).

        Returns the events logged for them, in order, with their revisions. StoreFailed
        (a StoreError) when the store can no longer be trusted (is_fatal): the caller
        must stop acknowledging anything. A due checkpoint follows the commit (its
        failure is StoreFailed too).
        """
        conn = self._conn
        # Without an index on allocations.set_id (migration 0006), deleting a set's row
        # with foreign_keys=ON scans allocations for its children. A batch that destroys
        # a set deletes the set's rows itself first, so it runs with the check off; every
        # other batch keeps it on (an allocation must name a stored set). The pragma is
        # a no-op inside a transaction: set before BEGIN. Opening checks the whole file.
        fk = DestroySet not in map(type, records)
        now = time.time()
        try:
            if fk != self._fk:
                conn.execute(f"PRAGMA foreign_keys={'ON' if fk else 'OFF'}")
                self._fk = fk
            conn.execute("BEGIN IMMEDIATE")
            self._dcount = self._dtotal = self._dsets = 0
            self._recount = False
            try:
                rows, logged = self._write(conn, records, now)
                d = self._digest
                count, total = d.count + self._dcount, (d.total + self._dtotal) % P
                if self._recount:
                    count, total = _count_digest(conn)
                if total != d.total:
                    conn.execute(SET_DIGEST, (total, DIGEST_ROW)).close()
                sets = (d.sets + self._dsets) % P
                if sets != d.sets:
                    conn.execute(SET_DIGEST, (sets, SETS_DIGEST_ROW)).close()
                if self._quarantined:
                    # Rows written by earlier commits that are past their time: the
                    # table stays as small as the quarantine. Only when something went
                    # into quarantine, so a broker without one never pays for it.
                    self._quarantined = False
                    conn.execute(
                        "DELETE FROM quarantine WHERE release_unix <= ? AND kind = 'time'",
                        (now,),
                    ).close()
                if rows:
                    last = _insert(conn, _EVENT_HEAD, 8, rows)
                else:
                    (last,) = conn.execute(
                        "SELECT COALESCE(MAX(revision), 0) FROM events"
                    ).fetchone()
                self._last_batch = len(logged)
                self._compact(conn, int(last or 0))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _commit_error("store commit failed", exc) from exc
        self._digest = Digest(count, total, sets)
        self._witness.advance(int(last or 0))
        self._commits += 1
        if self.checkpoint_due():  # off the loop already: do it here
            self._checkpoint()
        # Events are tuples (records.Event): built here without a Python-level __init__.
        rev = int(last or 0) - len(logged)
        new = tuple.__new__
        out: list[Event] = []
        for fields in logged:
            rev += 1
            out.append(new(Event, (rev, *fields)))
        return out

    def _write(
        self, conn: sqlite3.Connection, records: Sequence[Record], now: float
    ) -> tuple[list[object], list[_EventFields]]:
        """Write the records in order; return their events' rows for _EVENT_HEAD, flat
        (pasids as runs text), and the same events' fields for the Event objects.

        The common batch is many AddPasids of one PASID each: their allocation rows are
        gathered and inserted by one statement, flushed before any other kind of record
        (which may free, destroy or create what they name) and at the end. Inserts
        commute with each other, so only their order against other records matters.
        """
        rows: list[object] = []
        logged: list[_EventFields] = []
        adds: list[object] = []  # pasid, set_id, ... not yet inserted
        for rec in records:
            if type(rec) is AddPasids:
                sid = rec.set_id
                ps = rec.pasids
                if len(ps) == 1:
                    p = ps[0]
                    adds += (p, sid)
                    text = str(p)
                    self._dtotal += p * weight(sid)
                else:
                    text = _add_many(conn, sid, ps, adds)
                    self._dtotal += sum(ps) * weight(sid)
                self._dcount += len(ps)
                rows += (now, "alloc", sid, text, "", None, None, None)
                logged.append((now, "alloc", sid, ps, "", None, None, None))
                continue
            if adds:
                _insert(conn, _ALLOC_HEAD, 2, adds)
                adds = []
            ev = self._apply(conn, rec)
            if ev is None:  # configuration (saved quotas) changes no holdings: no event
                continue
            kind, sid, held, why = ev
            pid = uid = ns_pid = None
            if type(rec) is CreateSet and rec.row.uid is not None:
                # set_created names its verified holder.
                pid, uid, ns_pid = rec.row.pid, rec.row.uid, rec.row.ns_pid
            rows += (now, kind, sid, encode_runs(held), why, pid, uid, ns_pid)
            logged.append((now, kind, sid, tuple(held), why, pid, uid, ns_pid))
        if adds:
            _insert(conn, _ALLOC_HEAD, 2, adds)
        return rows, logged

    def checkpoint_due(self) -> bool:
        """Whether the WAL has grown past CHECKPOINT_BYTES (looked at every 64 commits).
        Its file keeps that size between checkpoints (journal_size_limit), so it passes it
        only when more than that is not yet checkpointed."""
        if self._commits < 64:
            return False
        self._commits = 0
        try:
            return os.stat(f"{self.path}-wal").st_size > CHECKPOINT_BYTES
        except OSError:
            return False

    def checkpoint(self) -> None:
        with self.lock:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database (PASSIVE), on the writer's connection and thread
        (between commits). StoreFailed on an I/O error: it fsyncs the database file, and
        a failed fsync there is as final as one in a commit (the WAL would then be reset
        over pages that never reached the device). Other errors are logged: the WAL just
        keeps growing until the next checkpoint succeeds."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            if is_fatal(exc, checkpoint=True):
                raise StoreFailed(f"store checkpoint failed: {describe(exc)}") from exc
            log.warning("store checkpoint failed: %s", describe(exc))

    def _compact(self, conn: sqlite3.Connection, last: int) -> None:
        """Drop events older than the retention, in chunks so that it is rare and cheap."""
        cut = last - self.event_retention
        if cut > 0 and cut % 1024 < self._last_batch:
            conn.execute("DELETE FROM events WHERE revision <= ?", (cut,))

    def _removed(self, set_id: int, pasids: Sequence[int], deleted: int) -> None:
        """The digest's change for the set's allocation rows deleted. Fewer rows than the
        engine named (it and the file disagree): the digest is counted again from the
        table before this commit (_recount), so that it stays true to the rows."""
        if deleted != len(pasids):
            log.error(
                "store: set %d freed %d PASIDs but %d rows were stored; digest recounted",
                set_id,
                len(pasids),
                deleted,
            )
            self._recount = True
        self._dcount -= len(pasids)
        self._dtotal -= sum(pasids) * weight(set_id)

    def _quarantine(self, conn: sqlite3.Connection, pasids: Sequence[int], until: float) -> None:
        """Keep these PASIDs' release time (a PASID freed before has a "time" row: its
        time is replaced). A contested one keeps its row: the engine withheld it."""
        conn.executemany(
            "INSERT INTO quarantine (pasid, release_unix) VALUES (?, ?) ON CONFLICT (pasid)"
            " DO UPDATE SET release_unix = excluded.release_unix WHERE kind = 'time'",
            [(p, until) for p in pasids],
        ).close()
        self._quarantined = True

    @staticmethod
    def _withhold(conn: sqlite3.Connection, rec: Withhold) -> None:
        """A withheld or contested row per PASID (REPLACE: it was quarantined, or
        withheld for another reason, before)."""
        conn.executemany(
            "INSERT OR REPLACE INTO quarantine (pasid, release_unix, kind, set_id,"
            " holder_pid, holder_start_time, claimant, devices, also_claimed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    p,
                    math.inf,
                    rec.kind,
                    rec.set_id,
                    rec.holder_pid,
                    rec.holder_start_time,
                    rec.claimant,
                    rec.devices,
                    rec.also_claimed,
                )
                for p in rec.pasids
            ],
        ).close()

    def _release_withheld(self, conn: sqlite3.Connection, rec: ReleaseWithheld) -> None:
        """The kernel let go: the rows go, or become "time" rows until the quarantine's
        end. A "time" row (none of ours) is left as it is."""
        rows = [(p,) for p in rec.pasids]
        if rec.quarantine_until is None:
            conn.executemany(
                "DELETE FROM quarantine WHERE pasid = ? AND kind != 'time'", rows
            ).close()
            return
        conn.executemany(
            "UPDATE quarantine SET kind = 'time', release_unix = ?, set_id = NULL,"
            " holder_pid = NULL, holder_start_time = NULL, claimant = NULL, devices = NULL,"
            " also_claimed = NULL WHERE pasid = ? AND kind != 'time'",
            [(rec.quarantine_until, p) for p in rec.pasids],
        ).close()
        self._quarantined = True

    def _apply(
        self, conn: sqlite3.Connection, rec: Record
    ) -> tuple[str, int, Sequence[int], str] | None:
        """Write one record other than AddPasids (_write gathers those); returns its
        event (kind, set_id, pasids, reason), or None for a record that is
        configuration, not a change of holdings."""
        if isinstance(rec, SaveQuotas):
            conn.execute(
                "INSERT OR REPLACE INTO quotas (scope, per_set, per_client, global_,"
                " updated_unix) VALUES ('default', ?, ?, ?, ?)",
                (rec.per_set, rec.per_client, rec.global_, time.time()),
            ).close()
            return None
        if isinstance(rec, LogConflict):
            return (rec.kind, rec.set_id, rec.pasids, rec.reason)
        if isinstance(rec, SaveSetQuota):
            conn.execute(
                "UPDATE sets SET quota = ? WHERE set_id = ?", (rec.quota, rec.set_id)
            ).close()
            return None
        if isinstance(rec, NoteSetState):
            if rec.kind in ("set_detached", "set_reattached"):
                at = rec.at if rec.kind == "set_detached" else None
                conn.execute(
                    "UPDATE sets SET detached_unix = ? WHERE set_id = ?", (at, rec.set_id)
                ).close()
            return (rec.kind, rec.set_id, (), rec.reason)
        if isinstance(rec, Withhold):
            self._withhold(conn, rec)
            return None
        if isinstance(rec, ReleaseWithheld):
            self._release_withheld(conn, rec)
            return None
        if isinstance(rec, SetWitnessEpoch):
            conn.execute(
                "UPDATE sets SET witness_epoch = ? WHERE set_id = ?", (rec.epoch, rec.set_id)
            ).close()
            return None
        if isinstance(rec, AwaitWitnesses):
            conn.executemany(
                "UPDATE sets SET witness_wait = ? WHERE set_id = ?",
                [(int(rec.waiting), sid) for sid in rec.set_ids],
            ).close()
            return None
        if isinstance(rec, DeferRefrees):
            conn.execute("DELETE FROM deferred_refrees WHERE set_id = ?", (rec.set_id,)).close()
            conn.executemany(
                "INSERT OR REPLACE INTO deferred_refrees (pasid, set_id) VALUES (?, ?)",
                [(p, rec.set_id) for p in rec.pasids],
            ).close()
            return None
        if isinstance(rec, RemovePasids):
            self._removed(rec.set_id, rec.pasids, _delete(conn, rec.set_id, rec.pasids))
            if rec.quarantine_until is not None:
                self._quarantine(conn, rec.pasids, rec.quarantine_until)
            return ("free", rec.set_id, rec.pasids, rec.reason)
        if isinstance(rec, CreateSet):
            r = rec.row
            conn.execute(
                "INSERT INTO sets (set_id, client, pid, quota, grace_seconds, token_hash,"
                " created_unix, holder_start_time, holder_uid, holder_ns_pid,"
                " delegated_by_pid, owner, witness_epoch)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.set_id,
                    r.client,
                    r.pid,
                    r.quota,
                    r.grace_seconds,
                    r.token_hash,
                    r.created_unix,
                    r.start_time,
                    r.uid,
                    r.ns_pid,
                    r.delegated_by_pid,
                    r.owner,
                    r.witness_epoch,
                ),
            ).close()
            self._dsets += set_weight(row_identity(r))
            return ("set_created", r.set_id, (), r.client)
        if isinstance(rec, DestroySet):
            if rec.pasids is not None:  # what the engine knew it held: no query
                held = sorted(rec.pasids)
                self._removed(rec.set_id, held, _delete(conn, rec.set_id, held))
            else:  # a scan of allocations (no set_id index): tests and tools only
                held = [
                    p
                    for (p,) in conn.execute(
                        "SELECT pasid FROM allocations WHERE set_id = ? ORDER BY pasid",
                        (rec.set_id,),
                    )
                ]
                conn.execute("DELETE FROM allocations WHERE set_id = ?", (rec.set_id,)).close()
                self._removed(rec.set_id, held, len(held))
            gone = conn.execute(
                f"SELECT {SET_IDENTITY} FROM sets WHERE set_id = ?", (rec.set_id,)
            ).fetchone()
            if gone is not None:
                self._dsets -= set_weight(gone)
            # foreign_keys is off in this batch (commit()): no scan for children here.
            conn.execute("DELETE FROM sets WHERE set_id = ?", (rec.set_id,)).close()
            # Its deferred frees went with its PASIDs (a small table: the scan is cheap).
            conn.execute("DELETE FROM deferred_refrees WHERE set_id = ?", (rec.set_id,)).close()
            if rec.quarantine_until is not None and held:
                self._quarantine(conn, held, rec.quarantine_until)
            return (rec.kind, rec.set_id, held, rec.reason)
        raise TypeError(f"unknown record {rec!r}")  # pragma: no cover - exhaustive
