"""The tables as SQLAlchemy sees them, for the migrations and their test only.

The store itself speaks plain sqlite3 (broker/store/opening.py, writer.py): SQLAlchemy
and Alembic cost a third of a second to import and several times raw sqlite3 per
statement, so they are loaded only when a schema must be created or migrated.
test_migrations checks that the migrations build exactly these tables, and these are the
columns the store's SQL names.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, ForeignKey, Integer, MetaData, String, Table

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String, primary_key=True),
    Column("value", String, nullable=False),
)

sets = Table(
    "sets",
    metadata,
    Column("set_id", Integer, primary_key=True, autoincrement=False),
    Column("client", String, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("quota", Integer, nullable=False),
    Column("grace_seconds", Integer, nullable=False),
    Column("token_hash", String, nullable=False),
    Column("created_unix", Float, nullable=False),
    # The kernel-verified holder (migration 0003); NULL for an unverified one.
    Column("holder_start_time", Integer, nullable=True),
    Column("holder_uid", Integer, nullable=True),
    Column("holder_ns_pid", Integer, nullable=True),
    Column("delegated_by_pid", Integer, nullable=True),
    # The verified identity that holds it, the per-identity quota's key (migration 0004).
    Column("owner", String, nullable=False, server_default="anonymous"),
    # When its stream last let go of it (migration 0007): the age `pasidctl sets` and
    # the PasidSetDetachedLong alert show outlives a restart. NULL while attached.
    Column("detached_unix", Float, nullable=True),
    # Changes (a new random value) when something its stream client cannot see changes
    # the set: a complete witness is honoured only with the current one (migration 0009).
    Column("witness_epoch", Integer, nullable=False, server_default="0"),
    # 1 while its witness is awaited after a restore or an unclean start (migration
    # 0011): a deferred free (deferred_refrees) waits for every such set.
    Column("witness_wait", Integer, nullable=False, server_default="0"),
)

# Quotas set at run time by SetQuotas (scope "default": the broker-wide ones). A row
# here outlives a restart and wins over the flags, which only seed an empty table.
quotas = Table(
    "quotas",
    metadata,
    Column("scope", String, primary_key=True),
    Column("per_set", Integer, nullable=False),
    Column("per_client", Integer, nullable=False),
    Column("global_", Integer, nullable=False),
    Column("updated_unix", Float, nullable=False),
)

# PASIDs in no set that must not be reissued yet, one row each, written in the commit
# that put them there so that a restart keeps them out of the pool. kind "time"
# (migration 0005): freed under --quarantine-seconds, reissued after release_unix; a
# row past its time means nothing, and the store deletes those lazily. The other kinds
# (migration 0007; release_unix +inf: no time releases them) are withheld until the
# kernel lets go (broker/engine/stuck.py): "detach" (a DETACH failed at set `set_id`'s
# end; its verified holder's exit frees it), "free" (the backend's free failed),
# "contested" (a witness claimed it while the store gave it to another set; that set
# may still hold it: then it is withheld when the set gives it up). `claimant`
# (migration 0008): the witness's set that claims it, for any kind (a "detach" or
# "free" row may be claimed too: both the wait and the claim outlive a restart). A
# PASID held by a set (allocations) wins over a stale "time", "detach" or "free" row.
quarantine = Table(
    "quarantine",
    metadata,
    Column("pasid", Integer, primary_key=True, autoincrement=False),
    Column("release_unix", Float, nullable=False, index=True),
    Column("kind", String, nullable=False, server_default="time"),
    Column("set_id", Integer, nullable=True),
    Column("holder_pid", Integer, nullable=True),
    Column("holder_start_time", Integer, nullable=True),
    Column("claimant", Integer, nullable=True),
    # A "detach" row's devices (migration 0010; iommufd_checks.device_key, comma-separated):
    # after a restart, its PASIDs are released once no process has any of them open.
    Column("devices", String, nullable=True),
    # The other witnesses' sets that claim it too, besides `claimant` (migration 0012;
    # comma-separated set ids): none is handed it, and it stays withheld until all are gone.
    Column("also_claimed", String, nullable=True),
)

# A complete witness's free that waits for the other awaited sets (migration 0011;
# broker/engine/witness.py): the PASID is still in `set_id`'s allocations, its client no
# longer holds it. No foreign key (load_snapshot checks only allocations'): a destroy
# deletes its set's rows, and a row whose PASID the set no longer holds is ignored.
deferred_refrees = Table(
    "deferred_refrees",
    metadata,
    Column("pasid", Integer, primary_key=True, autoincrement=False),
    Column("set_id", Integer, nullable=False),
)

# The PASID is the primary key: the database itself refuses a PASID in two sets. No
# index on set_id (migration 0006): every alloc's commit paid for it, and the store
# never looks allocations up by set (a destroy deletes by the PASIDs' runs).
allocations = Table(
    "allocations",
    metadata,
    Column("pasid", Integer, primary_key=True, autoincrement=False),
    Column("set_id", Integer, ForeignKey("sets.set_id", ondelete="CASCADE"), nullable=False),
)


# Append-only log of every change, for Watch and audit. Written in the same transaction
# as the change, so the log and the allocations never disagree. PASIDs as runs "1-3,7".
events = Table(
    "events",
    metadata,
    Column("revision", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("kind", String, nullable=False),
    Column("set_id", Integer, nullable=False),
    Column("pasids", String, nullable=False),
    Column("reason", String, nullable=False),
    # set_created: the verified holder (pid in the broker's namespace, uid, ns_pid).
    Column("holder_pid", Integer, nullable=True),
    Column("holder_uid", Integer, nullable=True),
    Column("holder_ns_pid", Integer, nullable=True),
    sqlite_autoincrement=True,
)
