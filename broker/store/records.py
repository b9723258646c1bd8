"""What the broker asks the store to make durable: one record per state change.

Plain data, no SQL, so the engine can build them without knowing the store.
"""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class DestroySet:
    set_id: int
    reason: str


Record = CreateSet | AddPasids | RemovePasids | DestroySet


@dataclass
class Snapshot:
    """The store's state at open: sets and who holds what."""

    sets: list[SetRow]
    holdings: dict[int, list[int]]
    meta: dict[str, str]

    @property
    def next_set_id(self) -> int:
        return max((s.set_id for s in self.sets), default=0) + 1
