"""The kernel-verified holder of each set, and of each set_created event.

A recovered set's holder is recognised after a restart by pid plus process start time
(/proc/<pid>/stat field 22), never by pid alone; uid and the pid the client sees for
itself (ns_pid) are shown in listings and events. NULL: no verified holder (an anonymous
or remote session, or a set stored before this revision, whose pid was only declared).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None

SET_COLUMNS = ("holder_start_time", "holder_uid", "holder_ns_pid", "delegated_by_pid")
EVENT_COLUMNS = ("holder_pid", "holder_uid", "holder_ns_pid")


def upgrade() -> None:
    with op.batch_alter_table("sets") as b:
        for name in SET_COLUMNS:
            b.add_column(sa.Column(name, sa.Integer, nullable=True))
    with op.batch_alter_table("events") as b:
        for name in EVENT_COLUMNS:
            b.add_column(sa.Column(name, sa.Integer, nullable=True))
    # Before this revision `pid` was what the client declared: never a verified holder.
    op.execute("UPDATE sets SET pid = 0")
    op.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")


def downgrade() -> None:
    with op.batch_alter_table("events") as b:
        for name in EVENT_COLUMNS:
            b.drop_column(name)
    with op.batch_alter_table("sets") as b:
        for name in SET_COLUMNS:
            b.drop_column(name)
    op.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
