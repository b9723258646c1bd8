"""A contested PASID's further claimants: the sets of other witnesses that claim it too.

`quarantine.claimant` names one witness's set. When a second witness's set claims the
same PASID (one of them from a stale, partial witness), neither may be handed it, and
the end of one must not let it go while the other still claims it
(broker/engine/stuck.py). `also_claimed` lists the others (set ids, comma-separated),
so that a restart, clean or not, keeps them. NULL: no other claimant.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision: str | None = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("quarantine") as t:
        t.add_column(sa.Column("also_claimed", sa.String, nullable=True))
    op.execute("UPDATE meta SET value = '12' WHERE key = 'schema_version'")


def downgrade() -> None:
    with op.batch_alter_table("quarantine") as t:
        t.drop_column("also_claimed")
    op.execute("UPDATE meta SET value = '11' WHERE key = 'schema_version'")
