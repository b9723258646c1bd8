"""The allocations' set_id index goes: every commit paid for it, nothing needs it.

Each alloc wrote its row into that index too, in the leaf page of its own set: a group
commit of allocs by 16 sets dirtied 16 index pages besides the table's one, and the WAL
takes whole pages, so the index was about half of a commit's SQLite cost
(docs/performance.md). The store no longer reads allocations by set: a set's destroy
deletes the PASIDs the engine says it held, by run, and loading groups by set once at
start (a sort). Deleting a set's row with foreign_keys=ON would scan allocations for
children without this index, so the store turns the check off for a batch that
destroys a set, after deleting the set's rows itself (broker/store/writer.py).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_allocations_set_id", "allocations")
    op.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.create_index("ix_allocations_set_id", "allocations", ["set_id"])
    op.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
