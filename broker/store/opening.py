"""Opening the database file: create it 0600, create or migrate its schema, check it,
load it.

A file that cannot be trusted is refused (StoreError), never repaired
(docs/durability.md). Alembic (with SQLAlchemy) owns the schema, but is imported only
when a migration is due (broker/store/migrations): a restart on an up-to-date file does
not pay for its import, nor does a new one (made from the schema the migrations leave).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

from broker.core.errors import StoreError, describe_error
from broker.store import checks, migrations
from broker.store.records import WITHHELD_KINDS, SetRow, Snapshot, WithheldRow

log = logging.getLogger("pasid_broker")

BUSY_TIMEOUT_MS = 5000

# The database names clients and pids and holds token hashes: for the broker's user only.
DATA_FILE_MODE = 0o600


def describe(exc: BaseException) -> str:
    """An SQLite error as operators search for it: its code name, then its message
    (never empty: broker.core.errors.describe_error)."""
    return describe_error(exc)


def restrict_files(path: Path) -> None:
    """Give the database and its -wal, -shm and .lock files mode 0600 where they exist
    (a file made by an older broker, or under a loose umask, was 0644; no -shm is made
    since exclusive locking, but an older broker's may be there)."""
    for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", ".lock"))):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(p.stat().st_mode) != DATA_FILE_MODE:
                os.chmod(p, DATA_FILE_MODE)


# The WAL file is kept at up to this size when it restarts after a checkpoint, and the
# writer checkpoints once it has grown past it (writer.CHECKPOINT_BYTES is this).
WAL_BYTES = 4 << 20


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """The writer's connection, with the pragmas the write path's durability argument
    rests on (broker/store/writer.py)."""
    # isolation_level=None: sqlite3 opens no transaction by itself; the writer says
    # BEGIN IMMEDIATE. check_same_thread=False: opened on the recovery thread, then
    # used by the writer.
    # cached_statements: the multi-row INSERTs are one statement per row count.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=512
    )
    # Before WAL mode is entered: the WAL index then lives in this process's heap, not in
    # a -shm file mapped into memory. On a nearly full filesystem that mapping could not
    # be backed and the broker died of SIGBUS (issue 22). The broker is the only process
    # on its database anyway (its instance lock); backups and Watch's reads go through
    # this connection (writer.py), and other processes get SQLITE_BUSY.
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # No checkpoint inside COMMIT (it fsyncs): the writer's checkpoint() does it.
    conn.execute("PRAGMA wal_autocheckpoint=0")
    # After a checkpoint the WAL restarts from its beginning; it is cut back to
    # WAL_BYTES then, not to nothing: the next commits overwrite blocks the file already
    # has, and their fsync (fdatasync) writes data only, where appending to the file
    # also commits the filesystem's journal for its new size (fdatasync p50 0.87 ->
    # 0.31 ms, docs/performance.md). Its size still says when more than
    # WAL_BYTES wait to be checkpointed: it passes WAL_BYTES only then (checkpoint_due).
    conn.execute(f"PRAGMA journal_size_limit={WAL_BYTES}")
    return conn


def open_database(
    path: Path, synchronous: str
) -> tuple[sqlite3.Connection, Snapshot, checks.Digest]:
    """Create or load the database, check it, migrate it; return the writer's connection
    (foreign_keys ON, busy_timeout BUSY_TIMEOUT_MS), the stored state and its digest.

    StoreError (never a repair) if the file is not a database, fails SQLite's
    integrity_check or a foreign-key check, does not match its digest or is behind its
    witness (broker/store/checks.py), has an unknown schema, or cannot be written. The
    checks run before anything may write; a file that fails them is copied aside first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    restrict_files(path)
    snapshot, digest = _check_before_writing(path)
    check_open_for_writing(path)
    conn: sqlite3.Connection | None = None
    try:
        conn = _connect_private(path, synchronous)
        restrict_files(path)
        if snapshot is None:  # a new database, or one a migration changes: read it now
            if migrations.is_new(conn):
                log.info(
                    "store schema migrated",
                    extra={"from": "empty", "to": migrations.create(conn)},
                )
            elif not migrations.is_current(conn):
                # Alembic opens a connection of its own, which this one's exclusive lock
                # would refuse: close it for the migration, then open it again.
                conn.close()
                conn = None
                migrate(path, synchronous)
                conn = _connect_private(path, synchronous)
            snapshot = load_snapshot(conn)
            try:
                digest = checks.verify(
                    checks.read_digest(conn),
                    snapshot.meta,
                    snapshot.holdings,
                    snapshot.revision,
                    checks.read_witness(path),
                )
                digest.sets = checks.verify_sets(checks.read_sets_digest(conn), snapshot.sets)
            except StoreError as exc:
                raise _refuse(path, checks.read_shm(path), str(exc)) from exc
        check_writable(conn)
        assert digest is not None
        _seal(conn, path, snapshot, digest)
        return conn, snapshot, digest
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise StoreError(f"cannot open store {path}: {describe(exc)}") from exc
    except (migrations.SchemaError, StoreError) as exc:
        if conn is not None:
            conn.close()
        raise StoreError(f"cannot open store {path}: {exc}") from exc


def _connect_private(path: Path, synchronous: str) -> sqlite3.Connection:
    """connect(), with the file and its -wal born 0600 whatever the umask."""
    umask = os.umask(0o077)
    try:
        return connect(path, synchronous)
    finally:
        os.umask(umask)


def check_open_for_writing(path: Path) -> None:
    """A file the broker cannot write is refused by name: with exclusive locking SQLite
    would only say SQLITE_IOERR_LOCK (it opens such a file read-only, then cannot lock
    it as the writer)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return  # a new database
    except OSError as exc:
        raise StoreError(
            f"SQLITE_READONLY: the file cannot be opened for writing ({exc.strerror})"
        ) from None
    os.close(fd)


def _check_before_writing(path: Path) -> tuple[Snapshot | None, checks.Digest | None]:
    """The checks on the files as found, by a connection that writes nothing; on any
    doubt the files are copied aside and StoreError names where. Returns the snapshot
    (None when the file is new or needs a migration: loaded after it, then)."""
    shm = checks.read_shm(path)
    try:
        witness = checks.read_witness(path)
        if _empty(path):
            checks.missing_database(path, witness)
            return None, None
        conn = checks.connect_readonly(path)
        try:
            checks.integrity(conn)
            if not migrations.is_current(conn):
                # Its rows are checked once migrated (open_database); its revision now.
                checks.check_witness(_revision(conn), witness, {})
                return None, None
            snapshot = load_snapshot(conn)
            stored = checks.read_digest(conn)
            stored_sets = checks.read_sets_digest(conn)
        finally:
            conn.close()
        digest = checks.verify(stored, snapshot.meta, snapshot.holdings, snapshot.revision, witness)
        digest.sets = checks.verify_sets(stored_sets, snapshot.sets)
        return snapshot, digest
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:
            # Raised by the sqlite3 module itself while converting a value the file holds:
            # text that is not UTF-8 (a flipped bit), which the broker never writes.
            why = f"SQLITE_CORRUPT: a text value is not UTF-8: {str(exc)[:200]}"
            raise StoreError(f"cannot open store {path}: {_refuse(path, shm, why)}") from exc
        if code & 0xFF not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            # Not what the file says (I/O, permissions, a lock): it may pass once fixed.
            raise StoreError(f"cannot open store {path}: {describe(exc)}") from exc
        raise StoreError(f"cannot open store {path}: {_refuse(path, shm, describe(exc))}") from exc
    except UnicodeDecodeError as exc:
        # SQLite's own message names something the file holds (a schema object's name)
        # whose bytes are not UTF-8: the file is damaged.
        said = exc.object.decode("utf-8", "replace") if isinstance(exc.object, bytes) else ""
        why = f"SQLITE_CORRUPT: {said[:200]}"
        raise StoreError(f"cannot open store {path}: {_refuse(path, shm, why)}") from exc
    except StoreError as exc:
        raise StoreError(f"cannot open store {path}: {_refuse(path, shm, str(exc))}") from exc


def _empty(path: Path) -> bool:
    """No database yet: no file, or an empty one (the instance lock may have made it)."""
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def _revision(conn: sqlite3.Connection) -> int:
    """The event log's last revision in a file of any schema (0 before the log existed)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is None:
        return 0
    (rev,) = conn.execute("SELECT COALESCE(MAX(revision), 0) FROM events").fetchone()
    return int(rev or 0)


def _refuse(path: Path, shm: bytes | None, why: str) -> StoreError:
    """Copy the files aside, then the refusal that says where (checks.refusal)."""
    try:
        kept: Path | None = checks.keep_aside(path, shm)
    except OSError as exc:  # say so, and refuse all the same
        log.error("cannot copy the store aside: %s", exc)
        kept = None
    return checks.refusal(why, kept)


def _seal(conn: sqlite3.Connection, path: Path, snapshot: Snapshot, digest: checks.Digest) -> None:
    """After the checks pass: store the digests if the file has none yet (a new or migrated
    store, or one from before the sets' digest), report a restore once, and bring the
    witness up to the store's revision."""
    restored = snapshot.meta.pop(checks.RESTORED_KEY, None)
    stale = checks.read_digest(conn) != digest.total
    stale_sets = checks.read_sets_digest(conn) != digest.sets
    if stale or stale_sets or restored is not None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            checks.store_digest(conn, digest)
            checks.store_sets_digest(conn, digest.sets)
            conn.execute("DELETE FROM meta WHERE key = ?", (checks.RESTORED_KEY,))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    if restored is not None:
        snapshot.restored = True
        checks.report_restore(path, restored, snapshot.revision)
    if checks.read_witness(path) != snapshot.revision:
        checks.write_witness(path, snapshot.revision)


def migrate(path: Path, synchronous: str) -> None:
    """Run Alembic (a new database, or an older schema) on a connection of its own."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    engine = create_engine(f"sqlite+pysqlite:///{path}", poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: sqlite3.Connection, _rec: object) -> None:
        dbapi_conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # no -shm here either
        dbapi_conn.execute(f"PRAGMA synchronous={synchronous}")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")
        dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    try:
        with engine.connect() as conn:
            before, after = migrations.upgrade(conn)
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        if isinstance(orig, sqlite3.Error):
            raise orig from exc
        raise StoreError(describe(exc)) from exc
    finally:
        engine.dispose()
    if before != after:
        log.info("store schema migrated", extra={"from": before or "empty", "to": after})


def check_writable(conn: sqlite3.Connection) -> None:
    """Refuse a store that cannot persist: nothing could be acknowledged. The probe
    write is rolled back, so the file is left as it was."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', '')")
    finally:
        conn.execute("ROLLBACK")


# The Python types each loaded column may have, as the broker writes them (schema.py:
# Integer -> int, Float -> float (or int), String -> str; None where nullable). SQLite
# keeps whatever a record's header says, and integrity_check does not look at column
# types: one flipped bit there turns a quota into text or a blob, which must be refused
# as corruption, not served or left to crash the start.
_I, _F, _S, _N = (int,), (float, int), (str,), (type(None),)
_SETS = (
    ("set_id", _I), ("client", _S), ("pid", _I), ("quota", _I), ("grace_seconds", _I),
    ("token_hash", _S), ("created_unix", _F), ("holder_start_time", _I + _N),
    ("holder_uid", _I + _N), ("holder_ns_pid", _I + _N), ("delegated_by_pid", _I + _N),
    ("owner", _S), ("detached_unix", _F + _N), ("witness_epoch", _I), ("witness_wait", _I),
)  # fmt: skip
_QUARANTINE = (
    ("pasid", _I), ("release_unix", _F), ("kind", _S), ("set_id", _I + _N),
    ("holder_pid", _I + _N), ("holder_start_time", _I + _N), ("claimant", _I + _N),
    ("devices", _S + _N), ("also_claimed", _S + _N),
)  # fmt: skip
_QUOTAS = (("scope", _S), ("per_set", _I), ("per_client", _I), ("global_", _I))
_META = (("key", _S), ("value", _S))
_DEFERRED = (("pasid", _I), ("set_id", _I))
_SQL_TYPE = {int: "an integer", float: "a real", str: "a text", bytes: "a blob"}


def _typed(
    table: str, columns: tuple[tuple[str, tuple[type, ...]], ...], row: tuple[Any, ...]
) -> None:
    """StoreError (corruption) unless each value of `row` has its column's type; the
    row is named by its first column (each table's key)."""
    for (name, types), value in zip(columns, row, strict=True):
        if type(value) not in types:
            got = _SQL_TYPE.get(type(value), type(value).__name__)
            shown = f" ({value!r:.40})" if isinstance(value, (str, int, float)) else ""
            raise StoreError(
                f"SQLITE_CORRUPT: {table}.{name} of row {row[0]!r:.40} is {got}{shown},"
                " which the broker never writes there"
            )


def load_snapshot(conn: sqlite3.Connection) -> Snapshot:
    """Everything the engine rebuilds its state from, in one consistent read; checks
    the foreign key allocations.set_id -> sets, and each value's type, on the way."""
    conn.execute("BEGIN")  # one consistent read of all the tables
    try:
        meta_rows = conn.execute("SELECT key, value FROM meta").fetchall()
        for r in meta_rows:
            _typed("meta", _META, r)
        m = dict(meta_rows)
        rows: list[SetRow] = []
        for r in conn.execute(
            "SELECT set_id, client, pid, quota, grace_seconds, token_hash,"
            " created_unix, holder_start_time, holder_uid, holder_ns_pid,"
            " delegated_by_pid, owner, detached_unix, witness_epoch, witness_wait FROM sets"
            " ORDER BY set_id"
        ):
            _typed("sets", _SETS, r)
            rows.append(SetRow(*r))
        holdings: dict[int, list[int]] = {r.set_id: [] for r in rows}
        orphans: list[int] = []
        # One row per set, its PASIDs joined by SQLite as a JSON array, which
        # json.loads parses in C: a million PASIDs load in about half the time of a
        # million rows through the cursor.
        for set_id, text in conn.execute(
            "SELECT set_id, json_group_array(pasid) FROM allocations GROUP BY set_id"
        ):
            if set_id in holdings:
                holdings[set_id] = sorted(json.loads(text))
            else:
                orphans.extend(json.loads(text))
        if orphans:
            # The foreign-key check (foreign_keys=ON only guards writes, and is off
            # in a batch that destroys a set), done on what is read here anyway:
            # PRAGMA foreign_key_check would scan allocations a second time.
            # allocations.set_id is the schema's only foreign key (test_migrations).
            bad = ", ".join(f"allocations rowid {p} -> sets" for p in sorted(orphans)[:5])
            raise StoreError(f"foreign key check failed: {bad}")
        (rev,) = conn.execute("SELECT COALESCE(MAX(revision), 0) FROM events").fetchone()
        quarantine: dict[int, float] = {}
        withheld: dict[int, WithheldRow] = {}
        for row in conn.execute(
            "SELECT pasid, release_unix, kind, set_id, holder_pid, holder_start_time,"
            " claimant, devices, also_claimed FROM quarantine"
        ):
            _typed("quarantine", _QUARANTINE, row)
            p, until, kind, sid, hpid, hstart, claimant, devices, also = row
            if also is not None and not all(s.isascii() and s.isdigit() for s in also.split(",")):
                raise StoreError(
                    f"SQLITE_CORRUPT: quarantine.also_claimed of row {p} is {also[:40]!r},"
                    " not the set ids the broker writes"
                )
            if kind != "time" and kind not in WITHHELD_KINDS:
                raise StoreError(
                    f"SQLITE_CORRUPT: quarantine.kind of row {p} is {kind[:40]!r}, which the"
                    " broker never writes"
                )
            if kind == "time":
                quarantine[p] = until
            else:
                withheld[p] = WithheldRow(kind, sid, hpid, hstart, claimant, devices, also)
        deferred: dict[int, list[int]] = {}
        for row in conn.execute("SELECT pasid, set_id FROM deferred_refrees ORDER BY pasid"):
            _typed("deferred_refrees", _DEFERRED, row)
            p, sid = row
            deferred.setdefault(sid, []).append(p)
        q = conn.execute(
            "SELECT scope, per_set, per_client, global_ FROM quotas WHERE scope = 'default'"
        ).fetchone()
        if q is not None:
            _typed("quotas", _QUOTAS, q)
    finally:
        conn.execute("COMMIT")
    saved = (int(q[1]), int(q[2]), int(q[3])) if q is not None else None
    return Snapshot(
        rows, holdings, m, int(rev or 0), saved, quarantine, withheld, deferred_refrees=deferred
    )
