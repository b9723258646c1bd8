"""The append-only event log: one row per change, revision strictly increasing.

AUTOINCREMENT (not a plain rowid) so that a revision is never reused, even after the
newest events are deleted by a future retention policy.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("revision", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("kind", sa.String, nullable=False),
        sa.Column("set_id", sa.Integer, nullable=False),
        sa.Column("pasids", sa.String, nullable=False),
        sa.Column("reason", sa.String, nullable=False),
        sqlite_autoincrement=True,
    )
    op.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_table("events")
    op.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
