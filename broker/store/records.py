"""What the broker asks the store to make durable: one record per state change.

Plain data, no SQL, so the engine can build them without knowing the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from broker.core.ioasid_set import ANONYMOUS


@dataclass(frozen=True)
class SetRow:
    """A set as stored: enough to hand it back after a restart."""

    set_id: int
    client: str
    pid: int
    quota: int
    grace_seconds: int
    token_hash: str
    created_unix: float
    # The kernel-verified holder (docs/peer-identity.md); None when unverified, and
    # then pid is 0. pid + start_time name the process across a broker restart.
    start_time: int | None = None
    uid: int | None = None
    ns_pid: int | None = None
    delegated_by_pid: int | None = None
    # The verified identity that holds it (the per-identity quota's key).
    owner: str = ANONYMOUS
    # When its stream last let go of it (wall clock); None: attached at the last write.
    detached_unix: float | None = None
    # A complete witness is honoured only when it states this (docs/durability.md).
    witness_epoch: int = 0
    # Its witness is awaited after a restore or an unclean start (AwaitWitnesses).
    witness_wait: bool = False

    @property
    def verified(self) -> bool:
        return self.start_time is not None


@dataclass(frozen=True)
class CreateSet:
    row: SetRow


@dataclass(frozen=True)
class AddPasids:
    set_id: int
    pasids: tuple[int, ...]


@dataclass(frozen=True)
class RemovePasids:
    set_id: int
    pasids: tuple[int, ...]
    # With --quarantine-seconds: the wall-clock time (Unix seconds) before which these
    # PASIDs must not be reissued, kept so that a restart does not end the quarantine.
    quarantine_until: float | None = None
    # For the free event: why, when not the client's own free (a complete witness's).
    reason: str = ""


@dataclass(frozen=True)
class SetWitnessEpoch:
    """Something the set's stream client cannot see changed the set (a unary call by
    token, a resume or re-attach by hand): its complete witnesses are partial until it
    learns the new epoch with the whole set. No event."""

    set_id: int
    epoch: int


@dataclass(frozen=True)
class AwaitWitnesses:
    """After a restore or an unclean start (`waiting`): these sets' witnesses are awaited
    before a complete witness's free may land; or (not `waiting`) this set resumed,
    re-attached or went: it is awaited no more. Stored so that a clean restart keeps
    the wait (broker/engine/witness.py). No event."""

    set_ids: tuple[int, ...]
    waiting: bool


@dataclass(frozen=True)
class DeferRefrees:
    """The set's deferred frees are now exactly `pasids`: PASIDs its client's complete
    witness no longer holds, whose free waits for the awaited sets (AwaitWitnesses).
    Replaces the set's earlier ones; empty: none. No event (the free has its own)."""

    set_id: int
    pasids: tuple[int, ...]


@dataclass(frozen=True)
class DestroySet:
    """The set is gone. `kind` is "set_destroyed" (its client ended it, the kernel's
    exit) or "set_reclaimed" (the broker took it: grace expired, revoke, restart)."""

    set_id: int
    reason: str
    kind: str = "set_destroyed"
    # What the set held, as the engine knew it: spares the store a query per set when
    # many die at once. None: the store reads it.
    pasids: tuple[int, ...] | None = None
    # As RemovePasids.quarantine_until: what the set held stays quarantined till then.
    quarantine_until: float | None = None


@dataclass(frozen=True)
class NoteSetState:
    """A set's stream let go of it, or took it back: an event for the log (kind
    "set_detached" or "set_reattached"), no change of holdings. Kept in the log so that
    Watch, a tenant's included, sees a detach as it sees an alloc. `at`: when it
    detached (stored as sets.detached_unix, so that a restart keeps the age)."""

    set_id: int
    kind: str
    reason: str = ""
    at: float | None = None


WITHHELD_KINDS = ("detach", "free", "contested")


@dataclass(frozen=True)
class Withhold:
    """PASIDs kept out of the pool whatever the clock (broker/engine/stuck.py): a
    quarantine row each, of `kind` (WITHHELD_KINDS; schema.quarantine says what each
    means). "detach" names the gone set and its verified holder, whose exit frees
    them; `claimant`, the witness's set that claims them, whatever the kind (a
    "contested" row's set_id is its claimant too). No event: the set's destroy or the
    conflict is in the log already. Made in one place: stuck.Withheld._rows."""

    pasids: tuple[int, ...]
    kind: str
    set_id: int | None = None
    holder_pid: int | None = None
    holder_start_time: int | None = None
    claimant: int | None = None
    devices: str | None = None  # a "detach" row's devices (comma-separated keys)
    also_claimed: str | None = None  # further claimants' sets (comma-separated ids)


@dataclass(frozen=True)
class ReleaseWithheld:
    """The kernel let go of these withheld PASIDs: their rows go, or become "time" rows
    until `quarantine_until` (--quarantine-seconds). No event."""

    pasids: tuple[int, ...]
    quarantine_until: float | None = None


@dataclass(frozen=True)
class SaveQuotas:
    """SetQuotas changed the defaults: they outlive a restart (flags only seed them)."""

    per_set: int
    per_client: int
    global_: int


@dataclass(frozen=True)
class SaveSetQuota:
    """SetQuotas changed one set's quota."""

    set_id: int
    quota: int


@dataclass(frozen=True)
class LogConflict:
    """A witness (a resuming client) claimed PASIDs the store gives to another set, or
    holds back: logged as a pasid_conflict event on `set_id`; changes no holdings. Kind
    "pasid_conflict_resolved": the contest ended, the PASIDs handed to the claimant."""

    set_id: int
    pasids: tuple[int, ...]
    reason: str
    kind: str = "pasid_conflict"


Record = (
    CreateSet
    | AddPasids
    | RemovePasids
    | DestroySet
    | NoteSetState
    | SaveQuotas
    | SaveSetQuota
    | LogConflict
    | SetWitnessEpoch
    | AwaitWitnesses
    | DeferRefrees
    | Withhold
    | ReleaseWithheld
)


EVENT_KINDS = (
    "set_created",
    "alloc",
    "free",
    "set_destroyed",
    "set_reclaimed",
    "set_detached",
    "set_reattached",
    "pasid_conflict",
    "pasid_conflict_resolved",
)


class Event(NamedTuple):
    """One entry of the append-only event log; `revision` increases by one per event.

    A NamedTuple, not a frozen dataclass: the store builds one per record on every
    commit, and a tuple costs a quarter of a frozen dataclass's __init__."""

    revision: int
    ts: float
    kind: str
    set_id: int
    pasids: tuple[int, ...]
    reason: str = ""
    # set_created: the verified holder (broker-namespace pid, uid, ns_pid), if any.
    pid: int | None = None
    uid: int | None = None
    ns_pid: int | None = None


class WithheldRow(NamedTuple):
    """A stored withheld or contested PASID's row besides the PASID (Withhold)."""

    kind: str
    set_id: int | None = None
    holder_pid: int | None = None
    holder_start_time: int | None = None
    claimant: int | None = None
    devices: str | None = None
    also_claimed: str | None = None


@dataclass
class Snapshot:
    """The store's state at open: sets and who holds what."""

    sets: list[SetRow]
    holdings: dict[int, list[int]]
    meta: dict[str, str]
    revision: int = 0
    # Quotas saved by SetQuotas (per_set, per_client, global), or None: flags rule.
    quotas: tuple[int, int, int] | None = None
    # Quarantined PASIDs and the wall-clock time they may be reissued (Unix seconds);
    # rows already past it may still be here (they are deleted lazily).
    quarantine: dict[int, float] = field(default_factory=dict)
    # Withheld and contested PASIDs (Withhold), which no clock releases.
    withheld: dict[int, WithheldRow] = field(default_factory=dict)
    # The first start after `pasid-broker restore`: acknowledged changes were rolled back.
    restored: bool = False
    # A complete witness's deferred frees: set -> PASIDs (DeferRefrees), as stored.
    deferred_refrees: dict[int, list[int]] = field(default_factory=dict)

    @property
    def next_set_id(self) -> int:
        return max((s.set_id for s in self.sets), default=0) + 1
