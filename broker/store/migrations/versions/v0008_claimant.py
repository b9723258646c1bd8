"""A withheld PASID keeps its claimant, whatever keeps it from the pool.

A witness may claim a PASID (Witnesses.reconcile) that a failed kernel call also
withholds: a DETACH or a backend free that failed at its set's end. The row's `kind`
says what the broker waits for (a DETACH, a free, or only the claim: "contested"), and
`set_id` names that kind's set (the gone set of a "detach" or "free" row, the claimant
of a "contested" one); `claimant` is the witness's set that claims the PASID, for every
kind, so that a restart keeps both the wait and the claim (broker/engine/stuck.py).
Contested rows of 0007 name their claimant in set_id: copied here.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("quarantine") as t:
        t.add_column(sa.Column("claimant", sa.Integer, nullable=True))
    op.execute("UPDATE quarantine SET claimant = set_id WHERE kind = 'contested'")
    op.execute("UPDATE meta SET value = '8' WHERE key = 'schema_version'")


def downgrade() -> None:
    # 0007 has one set_id per row: a claimed "free" row becomes the claimant's contest
    # (the restart that follows frees the backend anyway); a claimed "detach" row keeps
    # its wait, and loses its claim (0007's limit).
    op.execute(
        "UPDATE quarantine SET kind = 'contested', set_id = claimant"
        " WHERE kind = 'free' AND claimant IS NOT NULL"
    )
    with op.batch_alter_table("quarantine") as t:
        t.drop_column("claimant")
    op.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
