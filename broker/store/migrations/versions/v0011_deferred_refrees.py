"""A complete witness's deferred frees, and which sets' witnesses are still awaited.

After a restore or an unclean start, a free that a set's complete witness asks for (a
PASID the store still gives the set, which its client no longer holds) waits until every
other stored set has resumed, re-attached or gone: that set's client may have been given
the PASID since (its alloc lost too), and must be able to claim it back first. Both the
wait and the frees outlive a restart (issue 22, point 2; docs/durability.md):

- `deferred_refrees`: one row per PASID whose free waits, with the set that holds it
  (its client no longer does). Deleted when the free lands, when another set's witness
  claims the PASID (it is handed over), or with the set.
- `sets.witness_wait`: 1 while the set is awaited (it has not resumed, re-attached or
  gone since the restore or unclean start). A clean restart keeps the wait, so that a
  deferred free still waits for the same sets.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision: str | None = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deferred_refrees",
        sa.Column("pasid", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("set_id", sa.Integer, nullable=False),
    )
    with op.batch_alter_table("sets") as t:
        t.add_column(sa.Column("witness_wait", sa.Integer, nullable=False, server_default="0"))
    op.execute("UPDATE meta SET value = '11' WHERE key = 'schema_version'")


def downgrade() -> None:
    with op.batch_alter_table("sets") as t:
        t.drop_column("witness_wait")
    op.drop_table("deferred_refrees")
    op.execute("UPDATE meta SET value = '10' WHERE key = 'schema_version'")
