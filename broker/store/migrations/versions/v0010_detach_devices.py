"""A "detach" row names the gone set's devices, so that a restart can look for them.

A PASID whose DETACH failed stays attached through its device's bound file for as long
as any process has that file open: the holder, a child that inherited its fd, or one
it was passed to. After a restart the broker has no fd of its own; the holder's exit
alone proves nothing. `devices` ("c:MAJOR:MINOR" keys, comma-separated;
iommufd_checks.device_key) lets it check that no process has the device open any more
(broker/engine/stuck.py). Rows of 0007-0009 have none: they stay withheld until the
operator releases them (`pasid-broker withheld`, docs/runbook.md).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision: str | None = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("quarantine") as t:
        t.add_column(sa.Column("devices", sa.String, nullable=True))
    op.execute("UPDATE meta SET value = '10' WHERE key = 'schema_version'")


def downgrade() -> None:
    with op.batch_alter_table("quarantine") as t:
        t.drop_column("devices")
    op.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
