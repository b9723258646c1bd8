"""The first released schema: meta, sets, allocations (the PASID is the primary key).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String, primary_key=True),
        sa.Column("value", sa.String, nullable=False),
    )
    op.create_table(
        "sets",
        sa.Column("set_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("client", sa.String, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("quota", sa.Integer, nullable=False),
        sa.Column("grace_seconds", sa.Integer, nullable=False),
        sa.Column("token_hash", sa.String, nullable=False),
        sa.Column("created_unix", sa.Float, nullable=False),
    )
    # The PASID is the primary key: the database itself refuses a PASID in two sets.
    op.create_table(
        "allocations",
        sa.Column("pasid", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column(
            "set_id",
            sa.Integer,
            sa.ForeignKey("sets.set_id", ondelete="CASCADE"),
            nullable=False,
        ),
    )
    op.create_index("ix_allocations_set_id", "allocations", ["set_id"])
    op.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")


def downgrade() -> None:
    op.drop_table("allocations")
    op.drop_table("sets")
    op.drop_table("meta")
