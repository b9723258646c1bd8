"""SqliteStore: the durable store as the engine sees it, over plain sqlite3.

Each job in a module of its own: opening.py opens the file (create, migrate, check, load
the snapshot); writer.py is the write path (the commit, the broker's hot path, and WAL
checkpoints; the durability argument and why plain sqlite3 are there) and owns the one
connection (exclusive locking: Watch's reads and backups go through it too);
event_log.py reads the event log back for Watch.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from broker.core.errors import StoreError
from broker.store import checks, event_log
from broker.store.opening import describe, open_database
from broker.store.records import Event, Record, Snapshot
from broker.store.writer import Writer

# --durability: what an acknowledgement means, as SQLite's synchronous pragma in WAL mode.
# FULL fsyncs the WAL in every COMMIT; NORMAL only at checkpoints (docs/durability.md).
SYNCHRONOUS = {"fsync": "FULL", "page-cache": "NORMAL"}


class SqliteStore:
    """The allocations on disk. One batch at a time goes through commit(), on the
    journal's writer thread (never the event loop: a commit may wait on the disk)."""

    def __init__(
        self, path: str | Path, *, synchronous: str = "FULL", event_retention: int = 100_000
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        # Keep at least this many events; older ones are compacted away in chunks.
        self.event_retention = event_retention
        self._writer: Writer | None = None

    def open(self) -> Snapshot:
        """Create or load the database, migrate it, check it, and return its state.

        StoreError (never a repair) if the file is not a database, fails SQLite's
        integrity_check or a foreign-key check, does not match its digest or is behind its
        witness (checks.py), has an unknown schema, or cannot be written.
        """
        try:
            conn, snapshot, digest = open_database(self.path, self.synchronous)
        except StoreError:
            self.close()
            raise
        self._writer = Writer(conn, self.path, self.event_retention, digest)
        return snapshot

    def take_clean_stop(self) -> int | None:
        """The revision at which the last run stopped cleanly, or None (an unclean stop, or
        the first start); the marker is gone once this returns (checks.take_clean_stop)."""
        return checks.take_clean_stop(self.path)

    def mark_clean_stop(self, revision: int) -> None:
        """After close(): record that the store was closed cleanly at `revision`."""
        checks.write_clean_stop(self.path, revision)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _require(self) -> Writer:
        if self._writer is None:
            raise StoreError("store is not open")
        return self._writer

    def commit(self, records: Sequence[Record]) -> list[Event]:
        """Make every record durable in one transaction, or none of them (StoreError).

        Returns the events logged for them, in order, with their revisions (Writer.commit).
        """
        writer = self._writer  # the hot path: no call to _require
        if writer is None:
            raise StoreError("store is not open")
        return writer.commit(records)

    def probe(self) -> None:
        """A small durable write, while commits fail (Writer.probe; StoreError)."""
        self._require().probe()

    def set_meta(self, key: str, value: str) -> None:
        self._require().set_meta(key, value)

    def checkpoint_due(self) -> bool:
        """Whether the WAL has grown past writer.CHECKPOINT_BYTES (looked at every 64
        commits)."""
        return self._writer is not None and self._writer.checkpoint_due()

    def checkpoint(self) -> None:
        """Copy the WAL into the database, on the writer's thread (Writer.checkpoint;
        StoreFailed on an I/O error). A closed store has nothing to do: closing its last
        connection checkpointed."""
        if self._writer is not None:
            self._writer.checkpoint()

    def read_events(self, after: int, limit: int = 1000) -> list[Event]:
        """Logged events with revision > after, oldest first (for Watch's replay), read on
        the writer's connection between commits (call it off the event loop)."""
        return event_log.read_events(self._require().read, after, limit)

    def oldest_revision(self) -> int:
        """The first revision still in the log (0 when it is empty)."""
        return event_log.oldest_revision(self._require().read)

    def backup(self, dest: Path | None) -> tuple[int, bytes]:
        """A consistent copy of the database into the new file `dest`, or (None) into
        memory, on the writer's connection (Writer.backup; off the event loop). Returns
        its page count, and its bytes when made in memory."""
        try:
            return self._require().backup(dest)
        except sqlite3.Error as exc:
            raise StoreError(f"backup failed: {describe(exc)}") from exc
