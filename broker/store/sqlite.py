"""The durable store: SQLite through SQLAlchemy Core.

Durability argument (docs/durability.md): WAL with synchronous=NORMAL. A commit is in the
WAL file before COMMIT returns, so it survives a crash of the broker process (kill -9);
only an OS crash or power loss can roll back the last transactions, and those also kill
every client whose PASIDs they were. The hot path is Core (the ORM costs 3x per row);
writers use BEGIN IMMEDIATE, because a deferred transaction that upgrades to a write gets
SQLITE_BUSY at once in WAL mode, ignoring busy_timeout.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool, StaticPool

from broker.core.errors import StoreError
from broker.core.namespace import runs
from broker.store import migrations
from broker.store.records import (
    AddPasids,
    CreateSet,
    DestroySet,
    Event,
    Record,
    RemovePasids,
    SetRow,
    Snapshot,
)

log = logging.getLogger("pasid_broker")

# The tables as the code uses them. Their history lives in broker/store/migrations (the
# schema on disk is made only by migrations); test_migrations checks the two agree.
metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String, primary_key=True),
    Column("value", String, nullable=False),
)

sets = Table(
    "sets",
    metadata,
    Column("set_id", Integer, primary_key=True, autoincrement=False),
    Column("client", String, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("quota", Integer, nullable=False),
    Column("grace_seconds", Integer, nullable=False),
    Column("token_hash", String, nullable=False),
    Column("created_unix", Float, nullable=False),
    # The kernel-verified holder (migration 0003); NULL for an unverified one.
    Column("holder_start_time", Integer, nullable=True),
    Column("holder_uid", Integer, nullable=True),
    Column("holder_ns_pid", Integer, nullable=True),
    Column("delegated_by_pid", Integer, nullable=True),
)

# The PASID is the primary key: the database itself refuses a PASID in two sets.
allocations = Table(
    "allocations",
    metadata,
    Column("pasid", Integer, primary_key=True, autoincrement=False),
    Column(
        "set_id",
        Integer,
        ForeignKey("sets.set_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
)


# Append-only log of every change, for Watch and audit. Written in the same transaction
# as the change, so the log and the allocations never disagree. PASIDs as runs "1-3,7".
events = Table(
    "events",
    metadata,
    Column("revision", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("kind", String, nullable=False),
    Column("set_id", Integer, nullable=False),
    Column("pasids", String, nullable=False),
    Column("reason", String, nullable=False),
    # set_created: the verified holder (pid in the broker's namespace, uid, ns_pid).
    Column("holder_pid", Integer, nullable=True),
    Column("holder_uid", Integer, nullable=True),
    Column("holder_ns_pid", Integer, nullable=True),
    sqlite_autoincrement=True,
)


def encode_runs(pasids: Sequence[int]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs(pasids))


def decode_runs(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


_SET_PASIDS = "SELECT pasid FROM allocations WHERE set_id = ? ORDER BY pasid"
_DELETE_SET_PASIDS = "DELETE FROM allocations WHERE set_id = ?"
_DELETE_SET = "DELETE FROM sets WHERE set_id = ?"


def _holder_of(rec: Record) -> tuple[int | None, int | None, int | None]:
    """A set_created event names its verified holder: (pid, uid, ns_pid), or NULLs."""
    if isinstance(rec, CreateSet) and rec.row.uid is not None:
        return (rec.row.pid, rec.row.uid, rec.row.ns_pid)
    return (None, None, None)


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlite_errorname", None)
    return f"{code}: {orig}" if code else str(orig)


class SqliteStore:
    """The allocations on disk. commit() runs on the broker's single writer thread."""

    def __init__(
        self, path: str | Path, *, synchronous: str = "NORMAL", event_retention: int = 100_000
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        # Keep at least this many events; older ones are compacted away in chunks.
        self.event_retention = event_retention
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        # Readers (Watch replay) use their own connections: WAL lets them run beside the
        # writer, and the writer's connection belongs to the writer thread.
        self._readers: Engine | None = None
        self._last_batch = 0

    # -- lifecycle ----------------------------------------------------------------------

    def open(self) -> Snapshot:
        """Create or load the database, migrate it, check it, and return its state.

        StoreError (never a repair) if the file is not a database, fails SQLite's
        quick_check or a foreign-key check, has an unknown schema, or cannot be written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            f"sqlite+pysqlite:///{self.path}",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False, "isolation_level": None},
        )
        sync = self.synchronous

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: sqlite3.Connection, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        self._engine = engine
        self._readers = create_engine(
            f"sqlite+pysqlite:///{self.path}",
            poolclass=NullPool,
            connect_args={"check_same_thread": False},
        )
        try:
            self._conn = conn = engine.connect()
            self._check_file(conn)
            before, after = migrations.upgrade(conn)
            if before != after:
                log.info("store schema migrated", extra={"from": before or "empty", "to": after})
            self._check_foreign_keys(conn)
            self._check_writable(conn)
            return self._load()
        except SQLAlchemyError as exc:
            self.close()
            raise StoreError(f"cannot open store {self.path}: {_describe(exc)}") from exc
        except (migrations.SchemaError, StoreError) as exc:
            self.close()
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc

    def _check_file(self, conn: Connection) -> None:
        """SQLite's own structural check (pages, b-trees, NOT NULL, UNIQUE); read only."""
        with conn.begin():
            bad = [r for (r,) in conn.exec_driver_sql("PRAGMA quick_check(20)")]
        if bad != ["ok"]:
            raise StoreError(
                "SQLITE_CORRUPT: quick_check reports " + "; ".join(str(b) for b in bad)
            )

    def _check_writable(self, conn: Connection) -> None:
        """Refuse a store that cannot persist: nothing could be acknowledged. The probe
        write is rolled back, so the file is left as it was."""
        tx = conn.begin()
        try:
            conn.execute(insert(meta).prefix_with("OR REPLACE"), [{"key": "probe", "value": ""}])
        finally:
            tx.rollback()

    def _check_foreign_keys(self, conn: Connection) -> None:
        """Every allocation belongs to a stored set (foreign_keys=ON only guards writes)."""
        with conn.begin():
            bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchmany(5)
        if bad:
            rows = ", ".join(f"{t} rowid {r} -> {p}" for t, r, p, _ in bad)
            raise StoreError(f"foreign key check failed: {rows}")

    def _load(self) -> Snapshot:
        conn = self._require()
        with conn.begin():
            m = {k: v for k, v in conn.execute(select(meta.c.key, meta.c.value))}
            rows = [SetRow(*r) for r in conn.execute(select(*sets.c).order_by(sets.c.set_id))]
            holdings: dict[int, list[int]] = {r.set_id: [] for r in rows}
            cur = conn.exec_driver_sql("SELECT set_id, pasid FROM allocations ORDER BY pasid")
            for set_id, pasid in cur:
                holdings[set_id].append(pasid)
            rev = conn.exec_driver_sql("SELECT COALESCE(MAX(revision), 0) FROM events").scalar()
        return Snapshot(rows, holdings, m, int(rev or 0))

    def set_meta(self, key: str, value: str) -> None:
        conn = self._require()
        with conn.begin():
            conn.execute(insert(meta).prefix_with("OR REPLACE"), [{"key": key, "value": value}])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._readers is not None:
            self._readers.dispose()
            self._readers = None

    def _require(self) -> Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    # -- the write path -----------------------------------------------------------------

    def commit(self, records: Sequence[Record]) -> list[Event]:
        """Make every record durable in one transaction, or none of them (StoreError).

        Returns the events logged for them, in order, with their revisions.
        """
        conn = self._require()
        now = time.time()
        try:
            with conn.begin():
                logged = [self._apply(conn, rec) for rec in records]
                holders = [_holder_of(rec) for rec in records]
                conn.execute(
                    insert(events),
                    [
                        {
                            "ts": now,
                            "kind": k,
                            "set_id": sid,
                            "pasids": encode_runs(ps),
                            "reason": why,
                            "holder_pid": h[0],
                            "holder_uid": h[1],
                            "holder_ns_pid": h[2],
                        }
                        for (k, sid, ps, why), h in zip(logged, holders, strict=True)
                    ],
                )
                last = conn.exec_driver_sql("SELECT last_insert_rowid()").scalar()
                self._last_batch = len(logged)
                self._compact(conn, int(last or 0))
        except SQLAlchemyError as exc:
            raise StoreError(f"store commit failed: {_describe(exc)}") from exc
        first = int(last or 0) - len(logged) + 1
        return [
            Event(first + i, now, k, sid, tuple(ps), why, *h)
            for i, ((k, sid, ps, why), h) in enumerate(zip(logged, holders, strict=True))
        ]

    def read_events(self, after: int, limit: int = 1000) -> list[Event]:
        """Logged events with revision > after, oldest first (for Watch's replay)."""
        with self._reader().connect() as conn:
            rows = conn.execute(
                select(events)
                .where(events.c.revision > after)
                .order_by(events.c.revision)
                .limit(limit)
            ).all()
        return [
            Event(
                r.revision,
                r.ts,
                r.kind,
                r.set_id,
                decode_runs(r.pasids),
                r.reason,
                r.holder_pid,
                r.holder_uid,
                r.holder_ns_pid,
            )
            for r in rows
        ]

    def oldest_revision(self) -> int:
        """The first revision still in the log (0 when it is empty)."""
        with self._reader().connect() as conn:
            v = conn.exec_driver_sql("SELECT COALESCE(MIN(revision), 0) FROM events").scalar()
        return int(v or 0)

    def _reader(self) -> Engine:
        if self._readers is None:
            raise StoreError("store is not open")
        return self._readers

    def _compact(self, conn: Connection, last: int) -> None:
        """Drop events older than the retention, in chunks so that it is rare and cheap."""
        cut = last - self.event_retention
        if cut > 0 and cut % 1024 < self._last_batch:
            conn.execute(delete(events).where(events.c.revision <= cut))

    @staticmethod
    def _apply(conn: Connection, rec: Record) -> tuple[str, int, Sequence[int], str]:
        """Write one record; returns its event (kind, set_id, pasids, reason)."""
        if isinstance(rec, AddPasids):
            conn.execute(
                insert(allocations), [{"pasid": p, "set_id": rec.set_id} for p in rec.pasids]
            )
            return ("alloc", rec.set_id, rec.pasids, "")
        if isinstance(rec, RemovePasids):
            conn.execute(
                delete(allocations).where(allocations.c.pasid == bindparam("p")),
                [{"p": p} for p in rec.pasids],
            )
            return ("free", rec.set_id, rec.pasids, "")
        if isinstance(rec, CreateSet):
            r = rec.row
            conn.execute(
                insert(sets),
                [
                    {
                        "set_id": r.set_id,
                        "client": r.client,
                        "pid": r.pid,
                        "quota": r.quota,
                        "grace_seconds": r.grace_seconds,
                        "token_hash": r.token_hash,
                        "created_unix": r.created_unix,
                        "holder_start_time": r.start_time,
                        "holder_uid": r.uid,
                        "holder_ns_pid": r.ns_pid,
                        "delegated_by_pid": r.delegated_by_pid,
                    }
                ],
            )
            return ("set_created", r.set_id, (), r.client)
        if isinstance(rec, DestroySet):
            # Driver SQL, not Core expressions: building and compiling three statements
            # per set cost ~1 ms, and 30 clients dying at once wait for one another's.
            sid = (rec.set_id,)
            if rec.pasids is not None:
                held = sorted(rec.pasids)
            else:
                held = [p for (p,) in conn.exec_driver_sql(_SET_PASIDS, sid)]
            conn.exec_driver_sql(_DELETE_SET_PASIDS, sid)
            conn.exec_driver_sql(_DELETE_SET, sid)
            return (rec.kind, rec.set_id, held, rec.reason)
        raise TypeError(f"unknown record {rec!r}")  # pragma: no cover - exhaustive
