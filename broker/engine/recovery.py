"""Recovery at start: open the backend, check the loaded store against it, replay.

Runs in a worker thread before anything else may touch the state it builds. It refuses
(RecoveryError) rather than repairs: a store that does not fit changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from broker.backends.base import Backend, Capabilities, replay
from broker.core import WIRE_PASID_BITS, Allocator, Quarantine, Quotas, Unsupported
from broker.engine.holders import Holder
from broker.engine.sessions import Session
from broker.engine.stuck import DetachWait
from broker.store import Snapshot, SqliteStore

log = logging.getLogger("pasid_broker")


class RecoveryError(Exception):
    """The store cannot be loaded as it is; the broker refuses to start (never repairs)."""


@dataclass(frozen=True)
class Recovered:
    caps: Capabilities
    allocator: Allocator
    snapshot: Snapshot
    sessions: list[Session]  # every stored set, detached
    replayed: int
    # Withheld PASIDs taken up again (stuck.Withheld.restore): "detach" ones by gone set
    # (its holder and devices: see stuck.py), "free" ones (their free is retried).
    withheld_detach: dict[int, DetachWait] = field(default_factory=dict)
    withheld_unfreed: dict[int, int | None] = field(default_factory=dict)  # -> gone set
    # Stored withheld rows that no longer mean anything (a set holds the PASID): deleted.
    stale_withheld: list[int] = field(default_factory=list)
    # Contested PASID -> the witness's set that claims it.
    claimed_by: dict[int, int] = field(default_factory=dict)


@dataclass
class _Restored:
    """What _restore_withheld found: see Recovered's fields."""

    in_backend: list[int] = field(default_factory=list)  # to replay
    detach: dict[int, DetachWait] = field(default_factory=dict)
    unfreed: dict[int, int | None] = field(default_factory=dict)
    stale: list[int] = field(default_factory=list)
    claimed_by: dict[int, int] = field(default_factory=dict)
    withheld: int = 0


def _restore_withheld(allocator: Allocator, snap: Snapshot) -> _Restored:
    """Withhold the stored withheld PASIDs again and contest the contested ones (after
    the sets are claimed, before the quarantine)."""
    # PASID -> the set holding it (0: reserved); free ones are absent.
    owners = allocator.owners(snap.withheld) if snap.withheld else {}
    out = _Restored()
    for p, row in sorted(snap.withheld.items()):
        # A "detach" or "free" row may be claimed too (its claimant outlives the wait).
        claimant = row.claimant or (row.set_id if row.kind == "contested" else None)
        if claimant:
            out.claimed_by[p] = claimant
        if row.kind == "contested" and owners.get(p):
            allocator.contest([p])  # its set holds it still: withheld when it lets go
            continue
        try:
            allocator.withhold([p])
        except ValueError:  # a set holds it (the row is stale), or it is reserved
            out.stale.append(p)
            out.claimed_by.pop(p, None)
            continue
        out.withheld += 1
        # A contested one is held in the backend only under a quarantine (as when its
        # set gave it up: its free or destroy let go there otherwise).
        if row.kind != "contested" or allocator.quarantine.enabled:
            out.in_backend.append(p)
        if row.kind == "detach":
            holder = None
            if row.holder_pid is not None and row.holder_start_time is not None:
                holder = Holder(row.holder_pid, -1, 0, row.holder_start_time)
            devices = tuple(filter(None, (row.devices or "").split(",")))
            out.detach.setdefault(row.set_id or 0, DetachWait(holder, [], devices)).pasids.append(p)
        elif row.kind == "free":
            out.unfreed[p] = row.set_id
    return out


def recover(
    backend: Backend,
    store: SqliteStore,
    snap: Snapshot,
    *,
    reserved: Sequence[tuple[int, int]],
    quotas: Quotas,
    quarantine: Quarantine,
) -> Recovered:
    """Backend, allocator and sessions from the store's state (`snap`, from its open())."""
    caps = backend.open()
    if caps.pasid_bits > WIRE_PASID_BITS:
        raise Unsupported(
            f"backend {caps.name} reports pasid_bits {caps.pasid_bits} > {WIRE_PASID_BITS},"
            " the most the wire (and the seed's int return) can carry"
        )
    log.info(
        "backend %s open: pasid_bits %d from %s%s",
        caps.name,
        caps.pasid_bits,
        caps.pasid_bits_source,
        f" ({caps.detail})" if caps.detail else "",
    )
    # The quarantine measures time on the monotonic clock: a wall-clock step must not
    # release a PASID early. The store keeps each quarantined PASID's wall-clock release
    # time, which is all that survives a restart (docs/quarantine.md).
    allocator = Allocator(
        caps.pasid_bits,
        reserved=reserved,
        quotas=quotas,
        quarantine=quarantine,
        clock=time.monotonic,
        report_expired=True,
    )
    held: list[int] = []
    sessions: list[Session] = []
    for row in snap.sets:
        s = allocator.create_set(row.set_id, row.client, row.quota, owner=row.owner)
        try:
            allocator.claim(row.set_id, snap.holdings[row.set_id])
        except ValueError as exc:
            raise RecoveryError(
                f"store {store.path}: set {row.set_id} ({row.client}) cannot be"
                f" restored: {exc}; refusing to start (nothing was changed)"
            ) from exc
        held.extend(s.pasids)
        sessions.append(
            Session(
                s,
                Holder.of_row(row),
                row.grace_seconds,
                row.token_hash,
                row.created_unix,
                attached=False,
                detached_unix=row.detached_unix or 0.0,
                witness_epoch=row.witness_epoch,
            )
        )
    # After the sets: a PASID withheld when the last run ended (the kernel may still use
    # it) or contested is so again, whatever a restart did; then the quarantine.
    w = _restore_withheld(allocator, snap)
    if w.withheld or w.stale:
        log.warning(
            "withheld PASIDs restored: kept from the pool until the kernel lets go",
            extra={
                "withheld": w.withheld,
                "pasids": allocator.withheld[:32],
                "stale": w.stale[:32],
            },
        )
    # After the sets: a PASID a set holds is not quarantined, whatever a stale row says.
    now = time.time()
    quarantined = allocator.restore_quarantine(
        {p: until - now for p, until in snap.quarantine.items()}
    )
    if quarantined:
        log.info(
            "quarantine restored",
            extra={"quarantined": len(quarantined), "seconds": quarantine.seconds},
        )
    # Written only once every stored set is known to fit: a refusal changes nothing.
    if snap.meta.get("pasid_bits") != str(caps.pasid_bits):
        store.set_meta("pasid_bits", str(caps.pasid_bits))
    # The backend holds quarantined PASIDs too, until they leave quarantine (the engine
    # frees them there then), so no kernel user outside the broker is given them early.
    # Withheld ones too: a "free" one's retried free then lets go of it in the backend.
    held.extend(quarantined)
    held.extend(w.in_backend)
    held.sort()
    replayed = replay(backend, held)
    return Recovered(
        caps, allocator, snap, sessions, replayed, w.detach, w.unfreed, w.stale, w.claimed_by
    )
