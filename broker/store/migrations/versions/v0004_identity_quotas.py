"""Quotas by verified identity, and quotas that outlive a restart.

`sets.owner` is the identity the broker verified for the set's holder ("uid:1000",
"x509:CN=...", "anonymous"): the key of the per-identity quota, so a client cannot
escape it by choosing another name. A stored set with a kernel-verified holder (0003)
belongs to that holder's uid; the others were opened by unverified clients: 'anonymous'.
`quotas` keeps what SetQuotas decided.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sets") as b:
        b.add_column(sa.Column("owner", sa.String, nullable=False, server_default="anonymous"))
    op.execute("UPDATE sets SET owner = 'uid:' || holder_uid WHERE holder_uid IS NOT NULL")
    op.create_table(
        "quotas",
        sa.Column("scope", sa.String, primary_key=True),
        sa.Column("per_set", sa.Integer, nullable=False),
        sa.Column("per_client", sa.Integer, nullable=False),
        sa.Column("global_", sa.Integer, nullable=False),
        sa.Column("updated_unix", sa.Float, nullable=False),
    )
    op.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_table("quotas")
    with op.batch_alter_table("sets") as b:
        b.drop_column("owner")
    op.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
