"""A simulator of the patched kernel's PASID allocator (the v7 series' vfio_pasid.c).

It models what the broker's own process would get from the kernel: one ioasid_set (the
broker's mm), the module's pasid_quota, range checks and ENOSPC. It lets the whole broker
run and be tested on a machine without VT-d, and documents by code what the VFIO backend
expects of the kernel.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence

from broker.backends.base import Capabilities
from broker.core.errors import BackendError, Exhausted, InvalidRange, QuotaExceeded
from broker.core.namespace import Namespace


class SimulatorBackend:
    """In-memory kernel allocator. `quota` 0 = no limit (the kernel's default is 1000)."""

    name = "simulator"

    def __init__(self, pasid_bits: int = 20, quota: int = 0) -> None:
        self.pasid_bits = pasid_bits
        self.quota = quota
        self._ns: Namespace | None = None
        # Fault injection for tests of the broker's undo path: the next N calls fail.
        self.fail_next: int = 0

    def open(self) -> Capabilities:
        self._ns = Namespace(self.pasid_bits)
        return Capabilities(self.name, self.pasid_bits, "config (--pasid-bits)")

    def _space(self) -> Namespace:
        if self._ns is None:
            raise BackendError(errno.EBADF, "simulator backend is not open")
        return self._ns

    def _maybe_fail(self, op: str) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise BackendError(errno.EIO, f"simulator: injected failure of {op}")

    def alloc(self, lo: int, hi: int) -> int:
        ns = self._space()
        self._maybe_fail("alloc")
        if lo > hi or hi >= ns.size:
            raise InvalidRange(f"simulator: EINVAL for [{lo}, {hi}]")
        if self.quota and ns.used >= self.quota:
            raise QuotaExceeded("kernel", self.quota, f"kernel pasid_quota {self.quota} reached")
        p = ns.lowest_free(lo, hi)
        if p is None:
            raise Exhausted(f"simulator: ENOSPC in [{lo}, {hi}]")
        ns.take(p)
        return p

    def alloc_many(self, lo: int, hi: int, count: int) -> list[int]:
        """`count` PASIDs in [lo, hi] at once, all or none; a whole run (the broker's only
        ask) is taken a word at a time, not one bit walk per PASID."""
        ns = self._space()
        self._maybe_fail("alloc")
        if lo > hi or hi >= ns.size or count < 1:
            raise InvalidRange(f"simulator: EINVAL for [{lo}, {hi}] x {count}")
        if self.quota and ns.used + count > self.quota:
            raise QuotaExceeded("kernel", self.quota, f"kernel pasid_quota {self.quota} reached")
        if lo == hi and count == 1:  # the broker's usual ask: this one PASID
            if ns.is_used(lo):
                raise Exhausted(f"simulator: ENOSPC in [{lo}, {hi}]")
            ns.take(lo)
            return [lo]
        if count == hi - lo + 1:
            try:
                ns.take_many(range(lo, hi + 1))
            except ValueError:
                raise Exhausted(f"simulator: ENOSPC in [{lo}, {hi}]") from None
            return list(range(lo, hi + 1))
        got: list[int] = []
        p = ns.lowest_free(lo, hi)
        while p is not None and len(got) < count:
            ns.take(p)
            got.append(p)
            p = ns.lowest_free(p + 1, hi) if p < hi else None
        if len(got) < count:
            ns.release_many(got)
            raise Exhausted(f"simulator: ENOSPC in [{lo}, {hi}]")
        return got

    def free(self, lo: int, hi: int) -> None:
        ns = self._space()
        self._maybe_fail("free")
        # The broker frees exact runs it holds, so what is used in the run is what it owns.
        ns.release_range(lo, hi)

    def free_many(self, pasids: Sequence[int]) -> bool:
        """Release these held PASIDs a word at a time (the broker's free of a set whose
        PASIDs are scattered among others')."""
        ns = self._space()
        self._maybe_fail("free")
        ns.release_many(pasids)
        return True

    def replay(self, pasids: Iterable[int]) -> int:
        ns = self._space()
        try:
            return ns.take_many(pasids)
        except ValueError as exc:
            raise BackendError(errno.EEXIST, f"simulator: replay refused: {exc}") from None

    def close(self) -> None:
        self._ns = None

    @property
    def in_use(self) -> int:
        return self._ns.used if self._ns else 0
