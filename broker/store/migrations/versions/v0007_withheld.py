"""What a restart used to forget: withheld and contested PASIDs, and when a set detached.

`quarantine` rows gain a `kind`. "time" is the quarantine of 0005 (release_unix is when
the PASID may be reissued). The others are in no set's pool until the kernel or the
broker lets go, whatever the clock (release_unix is +inf): "detach" (a DETACH failed at
the set's end; the gone set and its verified holder, whose exit frees it, are kept),
"free" (the backend's free failed), "contested" (a witness claimed it while the store
gave it to another set: when that set gives it up, it is withheld). `sets.detached_unix`
is when a set's stream last let go of it (NULL while attached, or never detached).
Issue 22, point 7; docs/quarantine.md.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("quarantine") as t:
        t.add_column(sa.Column("kind", sa.String, nullable=False, server_default="time"))
        t.add_column(sa.Column("set_id", sa.Integer, nullable=True))
        t.add_column(sa.Column("holder_pid", sa.Integer, nullable=True))
        t.add_column(sa.Column("holder_start_time", sa.Integer, nullable=True))
    with op.batch_alter_table("sets") as t:
        t.add_column(sa.Column("detached_unix", sa.Float, nullable=True))
    op.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.execute("DELETE FROM quarantine WHERE kind != 'time'")
    with op.batch_alter_table("sets") as t:
        t.drop_column("detached_unix")
    with op.batch_alter_table("quarantine") as t:
        t.drop_column("holder_start_time")
        t.drop_column("holder_pid")
        t.drop_column("set_id")
        t.drop_column("kind")
    op.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
