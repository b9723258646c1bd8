"""The allocator: who holds which PASID, with the seed's checks and quotas.

Pure and synchronous: no I/O, no clock, no locks (the broker drives it from one thread).
Every mutation is all-or-nothing, so a caller that must undo (a failed commit, a failed
backend call) can use the inverse operation and get the state back exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from broker.core.errors import Exhausted, InvalidRange, NotFound, QuotaExceeded
from broker.core.ioasid_set import IoasidSet
from broker.core.namespace import Namespace

# The seed returns the PASID in an int ioctl result, so its uAPI is capped at 31 bits;
# the real bound is the backend's pasid_bits (Alex Williamson's review of v7 07/16).
WIRE_PASID_BITS = 31
# The series' vfio_pasid.c: VFIO_DEFAULT_PASID_QUOTA. Its basis was an offline discussion,
# i.e. a policy choice; hence configurable (--quota-per-set).
DEFAULT_SET_QUOTA = 1000


@dataclass(frozen=True)
class Quotas:
    """Limits on holdings; 0 means no limit (for per_set too, though the default is 1000)."""

    per_set: int = DEFAULT_SET_QUOTA
    per_client: int = 0
    global_: int = 0


def check_alloc_range(lo: int, hi: int, pasid_bits: int) -> None:
    """The review's checks: min <= max, and both below 2^pasid_bits (`>=`, not `>`)."""
    if lo > hi:
        raise InvalidRange(f"min {lo} > max {hi}")
    limit = 1 << pasid_bits
    if hi >= limit:
        raise InvalidRange(f"max {hi} >= 2^{pasid_bits} ({limit}): beyond the backend's pasid_bits")


def check_free_range(lo: int, hi: int) -> None:
    """A free may name any 32-bit range; only min > max is malformed."""
    if lo > hi:
        raise InvalidRange(f"min {lo} > max {hi}")


class Allocator:
    """The namespace, the sets in it, and the quotas that bound them."""

    def __init__(
        self,
        pasid_bits: int,
        *,
        reserved: Sequence[tuple[int, int]] = (),
        quotas: Quotas | None = None,
    ) -> None:
        if not 1 <= pasid_bits <= WIRE_PASID_BITS:
            raise ValueError(
                f"pasid_bits {pasid_bits} outside 1..{WIRE_PASID_BITS} (the wire carries 31 bits)"
            )
        self.pasid_bits = pasid_bits
        self.namespace = Namespace(pasid_bits)
        self.quotas = quotas or Quotas()
        # PASID 0 is RID2PASID on VT-d: requests without a PASID use it. Never hand it out.
        self.namespace.take(0)
        for lo, hi in reserved:
            check_alloc_range(lo, hi, pasid_bits)
            self.namespace.take_range(lo, hi)
        self.reserved = self.namespace.used
        self.capacity = self.namespace.size - self.reserved
        self.sets: dict[int, IoasidSet] = {}
        self._by_client: dict[str, int] = {}

    @property
    def in_use(self) -> int:
        return self.namespace.used - self.reserved

    # -- sets ---------------------------------------------------------------------------

    def create_set(self, set_id: int, client: str, quota: int | None = None) -> IoasidSet:
        if set_id in self.sets:
            raise ValueError(f"set {set_id} exists")
        s = IoasidSet(set_id, client, self.quotas.per_set if quota is None else quota)
        self.sets[set_id] = s
        return s

    def get_set(self, set_id: int) -> IoasidSet:
        try:
            return self.sets[set_id]
        except KeyError:
            raise NotFound(f"no ioasid_set {set_id}") from None

    def destroy_set(self, set_id: int) -> list[int]:
        """Free everything the set holds and forget it; returns what was freed."""
        s = self.get_set(set_id)
        freed = list(s.pasids)
        for p in freed:
            self.namespace.release(p)
        self._charge(s.client, -len(freed))
        del self.sets[set_id]
        return freed

    # -- alloc / free -------------------------------------------------------------------

    def alloc(self, set_id: int, lo: int, hi: int, count: int = 1) -> list[int]:
        """The `count` lowest free PASIDs in [lo, hi] for the set, all or nothing."""
        check_alloc_range(lo, hi, self.pasid_bits)
        if count < 1:
            raise InvalidRange(f"count {count} < 1")
        s = self.get_set(set_id)
        self._check_quotas(s, count)
        ns = self.namespace
        got: list[int] = []
        p = ns.lowest_free(lo, hi)
        while p is not None:
            ns.take(p)
            got.append(p)
            if len(got) == count or p >= hi:
                break
            p = ns.lowest_free(p + 1, hi)
        if len(got) < count:
            for q in got:
                ns.release(q)
            raise Exhausted(
                f"no {count} free PASID{'s' if count > 1 else ''} in [{lo}, {hi}] ({len(got)} free)"
            )
        s.pasids.update(got)
        self._charge(s.client, count)
        return got

    def free_range(self, set_id: int, lo: int, hi: int) -> list[int]:
        """Free the set's own PASIDs in [lo, hi]; cost O(log n + owned in range)."""
        check_free_range(lo, hi)
        s = self.get_set(set_id)
        held = s.pasids
        i = held.bisect_left(lo)
        j = held.bisect_right(hi)
        if i == j:
            return []
        freed = list(held.islice(i, j))
        del held[i:j]
        for p in freed:
            self.namespace.release(p)
        self._charge(s.client, -len(freed))
        return freed

    def release(self, set_id: int, pasids: Iterable[int]) -> None:
        """Take exact PASIDs back from the set (undoing an alloc); each must be held by it."""
        s = self.get_set(set_id)
        gone = list(pasids)
        for p in gone:
            s.pasids.remove(p)
            self.namespace.release(p)
        self._charge(s.client, -len(gone))

    def claim(self, set_id: int, pasids: Iterable[int]) -> None:
        """Give the set these exact PASIDs (recovery, and undoing a free).

        Quotas are not checked: the PASIDs were held before. A PASID already in use is a
        broken invariant, and raises before anything changes.
        """
        s = self.get_set(set_id)
        want = sorted(pasids)
        for p in want:
            if not 0 <= p < self.namespace.size:
                raise ValueError(f"PASID {p} outside the {self.pasid_bits}-bit namespace")
            if self.namespace.is_used(p):
                raise ValueError(f"PASID {p} is already held or reserved")
        for p in want:
            self.namespace.take(p)
        s.pasids.update(want)
        self._charge(s.client, len(want))

    # -- quotas -------------------------------------------------------------------------

    def _check_quotas(self, s: IoasidSet, count: int) -> None:
        if s.quota and len(s) + count > s.quota:
            raise QuotaExceeded(
                "set", s.quota, f"set quota {s.quota} exceeded: set {s.set_id} holds {len(s)}"
            )
        q = self.quotas
        if q.per_client:
            held = self._by_client.get(s.client, 0)
            if held + count > q.per_client:
                raise QuotaExceeded(
                    "client",
                    q.per_client,
                    f"client quota {q.per_client} exceeded: client {s.client!r} holds {held}",
                )
        if q.global_ and self.in_use + count > q.global_:
            raise QuotaExceeded(
                "global", q.global_, f"global quota {q.global_} exceeded: {self.in_use} in use"
            )

    def _charge(self, client: str, delta: int) -> None:
        n = self._by_client.get(client, 0) + delta
        if n:
            self._by_client[client] = n
        else:
            self._by_client.pop(client, None)

    def client_held(self, client: str) -> int:
        return self._by_client.get(client, 0)
