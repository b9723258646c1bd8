"""The fault tests' ledger: every acknowledgement a client received, and so every PASID
each of its sets believes it holds; audited against what a broker (or its file) serves.

A fault test drives real clients against a real broker through `Ledger.alloc` /
`Ledger.free`, makes its fault, and ends with either

- `ledger.audit(holdings).assert_clean()`: 0 acknowledged operations lost (no PASID whose
  alloc was acknowledged is missing from its set, none whose free was acknowledged is
  back in it) and 0 PASIDs held twice (in two sets, or in a set other than the one that
  was told it holds it); or
- a clean refusal the test expects (exit 2 with one line; test_store_corruption).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class _Session(Protocol):
    @property
    def set_id(self) -> int: ...

    def alloc(self, min: int = 1, max: int | None = None, count: int = 1) -> list[int]: ...

    def free(self, min: int = 0, max: int = ...) -> int: ...


@dataclass
class Audit:
    acknowledged: int
    lost: list[tuple[int, int]] = field(default_factory=list)  # (set, PASID) acked, gone
    resurrected: list[tuple[int, int]] = field(default_factory=list)  # freed, back
    twice: list[int] = field(default_factory=list)  # PASIDs two holders think theirs

    def assert_clean(self) -> None:
        assert self.acknowledged > 0, "the ledger recorded nothing: a vacuous test"
        assert not self.lost, f"{len(self.lost)} acknowledged PASIDs lost: {self.lost[:10]}"
        assert not self.resurrected, (
            f"{len(self.resurrected)} acknowledged frees lost: {self.resurrected[:10]}"
        )
        assert not self.twice, f"{len(self.twice)} PASIDs held twice: {self.twice[:10]}"


@dataclass
class Ledger:
    """Acknowledged operations, in the order they were acknowledged."""

    acks: int = 0
    held: dict[int, set[int]] = field(default_factory=dict)  # set -> PASIDs it was given
    freed: dict[int, set[int]] = field(default_factory=dict)  # set -> PASIDs acked freed

    def alloc(self, sess: _Session, lo: int, hi: int, count: int = 1) -> list[int]:
        got = sess.alloc(lo, hi, count=count)  # raises: not acknowledged, not recorded
        self.acks += 1
        mine = self.held.setdefault(sess.set_id, set())
        mine.update(got)
        self.freed.setdefault(sess.set_id, set()).difference_update(got)
        return got

    def free(self, sess: _Session, lo: int, hi: int) -> int:
        n = sess.free(lo, hi)
        self.acks += 1
        mine = self.held.setdefault(sess.set_id, set())
        gone = {p for p in mine if lo <= p <= hi}
        assert len(gone) == n, f"free [{lo}, {hi}] freed {n}, the ledger expected {len(gone)}"
        mine -= gone
        self.freed.setdefault(sess.set_id, set()).update(gone)
        return n

    def audit(self, holdings: Mapping[int, Sequence[int]]) -> Audit:
        """`holdings` (set -> PASIDs, as served or as on disk) against the acks."""
        a = Audit(self.acks)
        owner: dict[int, int] = {}
        for set_id, pasids in holdings.items():
            for p in pasids:
                if p in owner:
                    a.twice.append(p)
                owner[p] = set_id
        for set_id, mine in self.held.items():
            for p in sorted(mine):
                o = owner.get(p)
                if o is None:
                    a.lost.append((set_id, p))
                elif o != set_id:
                    a.twice.append(p)
        for set_id, gone in self.freed.items():
            a.resurrected.extend((set_id, p) for p in sorted(gone) if owner.get(p) == set_id)
        return a
