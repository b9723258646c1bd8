"""The quarantine outlives a restart.

`quarantine` holds each PASID freed under --quarantine-seconds with the wall-clock time
(Unix seconds) before which it must not be reissued. The monotonic clock the running
broker measures the quarantine with does not survive a restart; this does
(docs/quarantine.md).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("pasid", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("release_unix", sa.Float, nullable=False),
    )
    op.create_index("ix_quarantine_release_unix", "quarantine", ["release_unix"])
    op.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_index("ix_quarantine_release_unix", "quarantine")
    op.drop_table("quarantine")
    op.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
