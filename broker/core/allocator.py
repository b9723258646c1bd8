"""The allocator: who holds which PASID, with the seed's checks, quotas and quarantine.

Pure and synchronous: no I/O, no clock reads of its own (a time-based quarantine is given
a clock), no locks (the broker drives it from one thread). Every mutation is
all-or-nothing, so a caller that must undo (a failed commit, a failed backend call) can
use the inverse operation and get the state back exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from broker.core.errors import Exhausted, InvalidRange, NotFound, QuotaExceeded
from broker.core.ioasid_set import ANONYMOUS, IoasidSet
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
    # Per verified identity (a set's owner): renaming or opening more sessions does not
    # escape it. Named per_client on the wire and in flags for compatibility.
    per_client: int = 0
    global_: int = 0


@dataclass(frozen=True)
class Quarantine:
    """How long a freed PASID stays out of the pool; 0 and 0 (the default) = reuse at once.

    A device may still have DMA in flight tagged with a PASID its owner just freed. A
    quarantined PASID belongs to no set and is not handed out until every configured
    condition holds: `seconds` have passed since the free, and `allocs` PASIDs have been
    handed out since. The default is off, the seed's semantics: the kernel reissues a
    freed ioasid at once, and it is the kernel's unbind (which drains page requests and
    flushes the IOTLB and device TLB) that makes a PASID safe to free. See
    docs/quarantine.md.
    """

    seconds: float = 0.0
    allocs: int = 0

    @property
    def enabled(self) -> bool:
        return self.seconds > 0 or self.allocs > 0


class _Held(NamedTuple):
    """A quarantined PASID: who freed it, when, and the alloc count at that moment."""

    pasid: int
    set_id: int
    freed_at: float
    allocs_at: int


def check_alloc_range(lo: int, hi: int, pasid_bits: int) -> None:
    """The review's checks: min <= max, and both below 2^pasid_bits (`>=`, not `>`)."""
    if lo > hi:
        raise InvalidRange(f"min {lo} > max {hi}")
    if lo < 0:
        raise InvalidRange(f"min {lo} < 0")
    limit = 1 << pasid_bits
    if hi >= limit:
        raise InvalidRange(f"max {hi} >= 2^{pasid_bits} ({limit}): beyond the backend's pasid_bits")


def _no(count: int, lo: int, hi: int) -> str:
    return f"no {count} free PASID{'s' if count > 1 else ''} in [{lo}, {hi}]"


def check_free_range(lo: int, hi: int) -> None:
    """A free may name any 32-bit range; only min > max is malformed."""
    if lo > hi:
        raise InvalidRange(f"min {lo} > max {hi}")


class Allocator:
    """The namespace, the sets in it, the quotas that bound them, and the quarantine.

    Every PASID is in exactly one of: reserved, held by one set, quarantined (for time or
    allocs, or withheld after a failed DETACH: withhold), free. The
    namespace bitmap marks all but the free ones used, so the lowest-free search skips
    reserved and quarantined PASIDs at no extra cost.
    """

    def __init__(
        self,
        pasid_bits: int,
        *,
        reserved: Sequence[tuple[int, int]] = (),
        quotas: Quotas | None = None,
        quarantine: Quarantine | None = None,
        clock: Callable[[], float] | None = None,
        report_expired: bool = False,
    ) -> None:
        if not 1 <= pasid_bits <= WIRE_PASID_BITS:
            raise ValueError(
                f"pasid_bits {pasid_bits} outside 1..{WIRE_PASID_BITS} (the wire carries 31 bits)"
            )
        self.quarantine = quarantine or Quarantine()
        if self.quarantine.seconds < 0 or self.quarantine.allocs < 0:
            raise ValueError(f"negative quarantine {self.quarantine}")
        if self.quarantine.seconds > 0 and clock is None:
            raise ValueError("a quarantine in seconds needs a clock (the core reads none)")
        self._clock = clock
        self.pasid_bits = pasid_bits
        self.namespace = Namespace(pasid_bits)
        self.quotas = quotas or Quotas()
        # PASIDs all callers without a verified identity may hold together (0 = only the
        # per-identity quota): one uid can take the whole anonymous share besides its own
        # quota, so that share is smaller (--quota-anonymous).
        self.anonymous_quota = 0
        # PASID 0 is RID2PASID on VT-d: requests without a PASID use it. Never hand it out.
        self.namespace.take(0)
        for lo, hi in reserved:
            try:
                check_alloc_range(lo, hi, pasid_bits)
            except InvalidRange as exc:
                raise InvalidRange(f"reserved range [{lo}, {hi}]: {exc.message}") from None
            self.namespace.take_range(lo, hi)
        self.reserved = self.namespace.used
        self.capacity = self.namespace.size - self.reserved
        self.sets: dict[int, IoasidSet] = {}
        self._by_client: dict[str, int] = {}
        self._held = 0
        # PASIDs handed out by alloc since start (the quarantine's "M other allocations").
        self.allocs = 0
        # The quarantine in free order (so expiry pops from the left), and by PASID.
        # An entry whose PASID was claimed back stays in the deque until it reaches the
        # front; `_quarantined[pasid] is entry` tells the live ones.
        self._quarantine_order: deque[_Held] = deque()
        self._quarantined: dict[int, _Held] = {}
        # With report_expired, PASIDs that left quarantine since take_expired(): a caller
        # whose backend still holds quarantined PASIDs frees them there (see the engine).
        self._report_expired = report_expired
        self._expired: set[int] = set()
        # PASIDs no set holds that may still be in use in the kernel (a DETACH failed):
        # out of the pool until release_withheld; counted as quarantined.
        self._withheld: set[int] = set()
        # PASIDs a witness claimed while another set held them (contest).
        self._contested: set[int] = set()

    @property
    def in_use(self) -> int:
        """PASIDs held by sets (not reserved, not quarantined)."""
        return self._held

    @property
    def quarantined(self) -> int:
        """PASIDs freed but not yet back in the pool (after expiring what is due),
        withheld ones included."""
        self.expire_quarantine()
        return len(self._quarantined) + len(self._withheld)

    @property
    def available(self) -> int:
        """PASIDs an alloc could get now: capacity minus held minus quarantined."""
        return self.capacity - self._held - self.quarantined

    # -- sets ---------------------------------------------------------------------------

    def create_set(
        self, set_id: int, client: str, quota: int | None = None, owner: str = ""
    ) -> IoasidSet:
        """A new empty set; `owner` (default: the client name) keys the identity quota."""
        if set_id in self.sets:
            raise ValueError(f"set {set_id} exists")
        s = IoasidSet(set_id, client, self.quotas.per_set if quota is None else quota, owner=owner)
        self.sets[set_id] = s
        return s

    def get_set(self, set_id: int) -> IoasidSet:
        try:
            return self.sets[set_id]
        except KeyError:
            raise NotFound(f"no ioasid_set {set_id}") from None

    def destroy_set(self, set_id: int) -> list[int]:
        """Free everything the set holds and forget it; returns what was freed, ascending.

        Cost: what the set holds, freed a bitmap word at a time.
        """
        s = self.get_set(set_id)
        freed = list(s.pasids)
        self._retire(set_id, freed)
        self._charge(s.quota_key, -len(freed))
        del self.sets[set_id]
        return freed

    # -- alloc / free -------------------------------------------------------------------

    def alloc(self, set_id: int, lo: int, hi: int, count: int = 1) -> list[int]:
        """The `count` lowest free PASIDs in [lo, hi] for the set, all or nothing.

        Raises InvalidRange, NotFound, QuotaExceeded (set, then client, then global) or
        Exhausted. Cost: O(count * levels) whatever the fill level.
        """
        check_alloc_range(lo, hi, self.pasid_bits)
        if count < 1:
            raise InvalidRange(f"count {count} < 1")
        s = self.get_set(set_id)
        self._check_quotas(s, count)
        self.expire_quarantine()
        ns = self.namespace
        free_total = ns.size - ns.used
        if count > free_total or count > hi - lo + 1:
            raise Exhausted(
                f"{_no(count, lo, hi)} ({free_total} free in all{self._quarantine_note()})"
            )
        if count == 1:
            p = ns.lowest_free(lo, hi)
            got = [] if p is None else [p]
            if p is not None:
                ns.take(p)
        else:  # a batch: a word at a time
            got = ns.take_lowest(lo, hi, count)
        if len(got) < count:
            ns.release_many(got)
            raise Exhausted(f"{_no(count, lo, hi)} ({len(got)} free{self._quarantine_note()})")
        if count == 1:
            s.pasids.add(got[0])  # SortedList.update sorts and merges: 3x add's cost
        else:
            s.pasids.update(got)
        self._held += count
        self.allocs += count
        self._charge(s.quota_key, count)
        return got

    def free_range(self, set_id: int, lo: int, hi: int) -> list[int]:
        """Free the set's own PASIDs in [lo, hi]; cost O(log n + owned in range).

        The width of the range costs nothing: [0, 2^32 - 1] is as cheap as what the set
        holds (the v3->v4 review point). Returns what was freed, ascending.
        """
        check_free_range(lo, hi)
        s = self.get_set(set_id)
        held = s.pasids
        i = held.bisect_left(lo)
        j = held.bisect_right(hi)
        if i == j:
            return []
        freed = list(held.islice(i, j))
        del held[i:j]
        self._retire(set_id, freed)
        self._charge(s.quota_key, -len(freed))
        return freed

    def release(self, set_id: int, pasids: Iterable[int]) -> None:
        """Take exact PASIDs back from the set (undoing an alloc); each must be held by it.

        They go straight back to the pool, not to quarantine: the client never had them.
        """
        s = self.get_set(set_id)
        gone = sorted(pasids)
        for p in gone:
            s.pasids.remove(p)
        self.namespace.release_many(gone)
        self._held -= len(gone)
        self._charge(s.quota_key, -len(gone))

    def move(self, src: int, dst: int, pasids: Iterable[int]) -> None:
        """Hand exact PASIDs of set `src` to set `dst`, never through the pool: a contest
        resolved (the witness's set claims what `src`'s client no longer holds). Quotas
        are not checked: `dst`'s client holds them already. Each must be held by `src`;
        raises ValueError before anything changes otherwise."""
        a, b = self.get_set(src), self.get_set(dst)
        ps = sorted(set(pasids))
        if missing := [p for p in ps if p not in a.pasids]:
            raise ValueError(f"PASIDs {missing[:8]} are not held by set {src}")
        for p in ps:
            a.pasids.remove(p)
        b.pasids.update(ps)
        self._charge(a.quota_key, -len(ps))
        self._charge(b.quota_key, len(ps))

    def claim(self, set_id: int, pasids: Iterable[int]) -> list[int]:
        """Give the set these exact PASIDs (recovery, and undoing a free or a destroy).

        Quotas are not checked: the PASIDs were held before. A PASID the same set freed
        into quarantine is taken back from it. A PASID otherwise in use is a broken
        invariant, and raises before anything changes. Returns the PASIDs that were free
        (neither quarantined nor expired-but-unreported), ascending: what a backend that
        holds quarantined PASIDs must be asked to hold again.
        """
        s = self.get_set(set_id)
        want = sorted(set(pasids))
        self.expire_quarantine()  # what is due is free, whoever freed it
        if not self._quarantined and not self._expired and not self._withheld:
            # Nothing is in quarantine (recovery claims sets before restoring it): every PASID
            # must be free, and the namespace checks and takes them a word at a time.
            try:
                self.namespace.take_many(want)
            except ValueError:
                pass  # nothing was taken; the check below names the PASID and why
            else:
                s.pasids.update(want)
                self._held += len(want)
                self._charge(s.quota_key, len(want))
                return want
        fresh: list[int] = []
        back: list[int] = []
        withheld: list[int] = []
        for p in want:
            if not 0 <= p < self.namespace.size:
                raise ValueError(f"PASID {p} outside the {self.pasid_bits}-bit namespace")
            q = self._quarantined.get(p)
            if q is not None and q.set_id == set_id:
                back.append(p)
            elif p in self._withheld:
                # Undoing the destroy that withheld it: the set's again, and the backend
                # never let go of it (not returned as fresh).
                withheld.append(p)
            elif self.namespace.is_used(p):
                raise ValueError(f"PASID {p} is already held, reserved or quarantined")
            else:
                fresh.append(p)
        for p in back:
            del self._quarantined[p]
        self._withheld.difference_update(withheld)
        for p in fresh:
            self.namespace.take(p)
        s.pasids.update(want)
        self._held += len(want)
        self._charge(s.quota_key, len(want))
        if self._expired:
            kept = self._expired.intersection(fresh)
            self._expired -= kept
            return [p for p in fresh if p not in kept]
        return fresh

    # -- quarantine ---------------------------------------------------------------------

    def _retire(self, set_id: int, freed: list[int]) -> None:
        """PASIDs a set gave up: into quarantine, or straight back to the pool; a
        contested one is withheld instead."""
        self._held -= len(freed)
        if self._contested:
            kept = self._contested.intersection(freed)
            if kept:
                self._contested -= kept
                self._withheld |= kept  # still marked used in the namespace
                freed = [p for p in freed if p not in kept]
        if not self.quarantine.enabled:
            self.namespace.release_many(freed)
            return
        now = self._now()
        for p in freed:
            e = _Held(p, set_id, now, self.allocs)
            self._quarantine_order.append(e)
            self._quarantined[p] = e

    def restore_quarantine(self, remaining: Mapping[int, float]) -> list[int]:
        """Put PASIDs back in quarantine after a restart, each for its remaining seconds.

        Call after the sets are claimed. A remaining time is capped to the configured
        seconds (a wall clock stepped back must not lengthen it without bound), and is
        never shortened. A PASID held by a set, reserved, outside the namespace or with
        no time left is skipped (its row is stale). The allocs condition restarts
        counting now. Returns the PASIDs quarantined, ascending.
        """
        secs = self.quarantine.seconds
        if secs <= 0:
            return []
        now = self._now()
        size = self.namespace.size
        # Soonest release first (the oldest free): expiry pops from the left.
        back = sorted(
            (min(left, secs), p)
            for p, left in remaining.items()
            if left > 0 and 0 <= p < size and not self.namespace.is_used(p)
        )
        for left, p in back:
            self.namespace.take(p)
            e = _Held(p, 0, now - (secs - left), self.allocs)
            self._quarantine_order.append(e)
            self._quarantined[p] = e
        return sorted(p for _, p in back)

    def expire_quarantine(self) -> list[int]:
        """Return to the pool every quarantined PASID whose conditions now hold.

        Called before each alloc; the caller may call it too (e.g. to report counts).
        Returns the PASIDs released, ascending. Cost: what leaves, amortized.
        """
        order = self._quarantine_order
        if not order:
            return []
        live = self._quarantined
        q = self.quarantine
        now = self._now()
        out: list[int] = []
        while order:
            e = order[0]
            if live.get(e.pasid) is e:
                if now - e.freed_at < q.seconds or self.allocs - e.allocs_at < q.allocs:
                    break
                del live[e.pasid]
                out.append(e.pasid)
            order.popleft()
        out.sort()
        self.namespace.release_many(out)
        if self._report_expired:
            self._expired.update(out)
        return out

    def take_expired(self) -> list[int]:
        """PASIDs that left quarantine since the last call, ascending (report_expired)."""
        if not self._expired:
            return []
        out = sorted(self._expired)
        self._expired.clear()
        return out

    def quarantined_pasids(self) -> list[int]:
        """The PASIDs in quarantine now, withheld ones included, ascending (for listings
        and checks)."""
        self.expire_quarantine()
        return sorted(self._quarantined.keys() | self._withheld)

    def withhold(self, pasids: Iterable[int]) -> list[int]:
        """Keep PASIDs that left a set out of the pool until release_withheld: the kernel
        may still use them (a failed DETACH at the set's destruction). Each must be free
        or quarantined (its quarantine is replaced). Returns those withheld, ascending."""
        out: list[int] = []
        for p in sorted(set(pasids)):
            if p in self._withheld:
                continue
            if self._quarantined.pop(p, None) is None:
                if self.namespace.is_used(p):
                    raise ValueError(f"PASID {p} is held or reserved: nothing to withhold")
                self.namespace.take(p)
            # An expiry not yet reported: the backend still holds it, and must keep it.
            self._expired.discard(p)
            self._withheld.add(p)
            out.append(p)
        return out

    def release_withheld(self, pasids: Iterable[int]) -> list[int]:
        """The kernel no longer uses these (a DETACH succeeded, or the holder's exit closed
        the device): into the quarantine if one is configured, else back to the pool.
        PASIDs not withheld (a set took them back) are skipped. Returns those now free,
        ascending: what the backend may let go of."""
        gone = sorted(p for p in set(pasids) if p in self._withheld)
        self._withheld.difference_update(gone)
        if not gone:
            return []
        if self.quarantine.enabled:
            now = self._now()
            for p in gone:
                e = _Held(p, 0, now, self.allocs)
                self._quarantine_order.append(e)
                self._quarantined[p] = e
            return []
        self.namespace.release_many(gone)
        return gone

    @property
    def withheld(self) -> list[int]:
        return sorted(self._withheld)

    def is_withheld(self, pasid: int) -> bool:
        return pasid in self._withheld

    def owners(self, pasids: Iterable[int]) -> dict[int, int]:
        """PASID -> the set holding it, for those of `pasids` a set holds (0: reserved,
        quarantined or withheld: used, in no set). Free ones are absent. O(all held)
        when any is used: for a witness's claims, not a hot path."""
        want = {p for p in pasids if 0 <= p < self.namespace.size and self.namespace.is_used(p)}
        out = dict.fromkeys(want, 0)
        if want:
            for sid, s in self.sets.items():
                for p in want.intersection(s.pasids):
                    out[p] = sid
        return out

    def contest(self, pasids: Iterable[int]) -> None:
        """Two holders claim these (a witness and the store's set): whenever the set that
        holds one gives it up, it is withheld (never back in the pool silently)."""
        self._contested.update(pasids)

    def uncontest(self, pasids: Iterable[int]) -> None:
        """One of the two claimants let go (the witness's set ended): the set that holds
        these may give them up as any other."""
        self._contested.difference_update(pasids)

    def _now(self) -> float:
        return self._clock() if self._clock is not None and self.quarantine.seconds else 0.0

    def _quarantine_note(self) -> str:
        n = len(self._quarantined) + len(self._withheld)
        return f"; {n} quarantined" if n else ""

    # -- quotas -------------------------------------------------------------------------

    def _check_quotas(self, s: IoasidSet, count: int) -> None:
        if s.quota and len(s) + count > s.quota:
            raise QuotaExceeded(
                "set", s.quota, f"set quota {s.quota} exceeded: set {s.set_id} holds {len(s)}"
            )
        q = self.quotas
        if self.anonymous_quota and s.quota_key == ANONYMOUS:
            held = self._by_client.get(ANONYMOUS, 0)
            if held + count > self.anonymous_quota:
                raise QuotaExceeded(
                    "client",
                    self.anonymous_quota,
                    f"anonymous quota {self.anonymous_quota} (--quota-anonymous, shared by"
                    f" every caller without a verified identity) exceeded: {held} held",
                )
        if q.per_client:
            held = self._by_client.get(s.quota_key, 0)
            if held + count > q.per_client:
                raise QuotaExceeded(
                    "client",
                    q.per_client,
                    f"client quota {q.per_client} (per identity) exceeded:"
                    f" {s.quota_key} holds {held} across its sets",
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

    # -- checks -------------------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError if the bookkeeping disagrees with itself (for tests).

        O(everything held): sets are disjoint, each PASID of a set is marked used, the
        counts add up, per-client counts match the sets.
        """
        self.namespace.check()
        seen: dict[int, int] = {}
        by_client: dict[str, int] = {}
        for sid, s in self.sets.items():
            for p in s.pasids:
                if p in seen:
                    raise AssertionError(f"PASID {p} in sets {seen[p]} and {sid}")
                if p in self._quarantined or p in self._withheld:
                    raise AssertionError(f"PASID {p} held by set {sid} and quarantined")
                if not self.namespace.is_used(p):
                    raise AssertionError(f"PASID {p} held by set {sid} but marked free")
                seen[p] = sid
            if len(s):
                by_client[s.quota_key] = by_client.get(s.quota_key, 0) + len(s)
        if len(seen) != self._held:
            raise AssertionError(f"in_use {self._held}, sets hold {len(seen)}")
        if by_client != self._by_client:
            raise AssertionError(f"per-client counts {self._by_client} != {by_client}")
        for p in self._quarantined:
            if not self.namespace.is_used(p):
                raise AssertionError(f"quarantined PASID {p} marked free")
        for p in self._withheld:
            if not self.namespace.is_used(p) or p in self._quarantined:
                raise AssertionError(f"withheld PASID {p} marked free or also quarantined")
        total = self.reserved + self._held + len(self._quarantined) + len(self._withheld)
        if self.namespace.used != total:
            raise AssertionError(f"namespace has {self.namespace.used} used, expected {total}")
