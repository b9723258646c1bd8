"""Each set's witness epoch: whether a client's complete witness may free what it omits.

`sets.witness_epoch` changes (a new random value) whenever something the set's stream
client cannot see changes the set: a unary call by token, a resume or re-attach by hand.
A client states a complete witness with the epoch it learnt together with the whole
set; the broker honours it only when the epoch is still the set's (issue 22, point 2;
docs/durability.md). Existing sets get a fresh random epoch no client knows yet.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sets") as t:
        t.add_column(sa.Column("witness_epoch", sa.Integer, nullable=False, server_default="0"))
    op.execute("UPDATE sets SET witness_epoch = (random() & 9223372036854775807) | 1")
    op.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")


def downgrade() -> None:
    with op.batch_alter_table("sets") as t:
        t.drop_column("witness_epoch")
    op.execute("UPDATE meta SET value = '8' WHERE key = 'schema_version'")
