"""Alembic's entry: always online, on the connection the store hands in."""

from __future__ import annotations

from alembic import context

conn = context.config.attributes["connection"]
context.configure(connection=conn, target_metadata=None, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
