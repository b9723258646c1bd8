"""Schema migrations (Alembic), run by the store at every start; no alembic.ini needed.

Revision 0001 is the first released schema (meta, sets, allocations); 0002 adds the
append-only event log; 0003 the kernel-verified holder of each set; 0004 the owner
(verified identity) of each set and the quotas SetQuotas saved; 0005 the quarantine's
release times; 0006 drops the allocations' set_id index (each commit paid for it); 0007
the withheld and contested PASIDs (quarantine.kind) and sets.detached_unix; 0008 the
claimant of a withheld PASID whatever its kind (quarantine.claimant); 0009 each set's
witness epoch (sets.witness_epoch: when a complete witness is honoured); 0010 the
devices of a "detach" row (quarantine.devices). A
database made before Alembic (no alembic_version table) is stamped with the revision its
tables show, then upgraded.

Alembic and SQLAlchemy are imported only when a migration is due: `is_current` reads the
revision with plain sqlite3, so a broker starting on an up-to-date database never loads
them (a third of its start-up time otherwise). HEAD must name the newest revision
(test_migrations checks it against the scripts).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection

HERE = Path(__file__).resolve().parent

# The newest revision in versions/; a database at it needs no migration.
HEAD = "0010"


class SchemaError(Exception):
    """The database's schema revision is not one this broker knows."""


def is_current(conn: sqlite3.Connection) -> bool:
    """True when the database is at HEAD (plain sqlite3: no Alembic import)."""
    has = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
    ).fetchone()
    if has is None:
        return False
    rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    return rows == [(HEAD,)]


def _config(conn: Connection) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(HERE)).get_current_head()
    assert head is not None
    return head


def current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def upgrade(conn: Connection) -> tuple[str | None, str]:
    """Bring the schema to head; returns (revision before, revision after).

    Raises SchemaError for a revision newer than this broker (a downgrade of the daemon).
    """
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect

    cfg = _config(conn)
    script = ScriptDirectory.from_config(cfg)
    before = current(conn)
    if before is None:
        tables = set(inspect(conn).get_table_names())
        if "sets" in tables:  # made by create_all before migrations existed
            before = "0002" if "events" in tables else "0001"
            command.stamp(cfg, before)
    if before is not None:
        try:
            script.get_revision(before)
        except Exception as exc:
            raise SchemaError(
                f"schema revision {before!r} is unknown to this broker (its newest is"
                f" {head()!r}): was the database written by a newer version?"
            ) from exc
    command.upgrade(cfg, "head")
    if conn.in_transaction():
        conn.commit()
    return before, head()
