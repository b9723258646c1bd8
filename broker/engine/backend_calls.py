"""Making the backend agree with the allocator: exact alloc/free, all or none."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from broker.backends.base import Backend, alloc_many
from broker.core import BackendError, PasidError, runs

log = logging.getLogger("pasid_broker")


class BackendCalls:
    """The engine's only way to the backend. `quarantining()` says whether freed PASIDs
    go to quarantine (then the backend keeps holding them until they leave it)."""

    def __init__(self, backend: Backend, quarantining: Callable[[], bool]) -> None:
        self.backend = backend
        self._quarantining = quarantining

    def alloc_exact(self, pasids: Sequence[int]) -> None:
        """Make the backend hold exactly these PASIDs, all or none: one alloc_many per
        run (a batch of 1,024 is usually one call, not 1,024)."""
        if len(pasids) == 1:  # the common alloc of one PASID: no run-splitting
            (p,) = pasids
            got = alloc_many(self.backend, p, p, 1)
            if got != [p]:
                self.free(got)
                raise BackendError(5, f"backend {self.backend.name} returned {got} for [{p}, {p}]")
            return
        done: list[int] = []
        try:
            for lo, hi in runs(pasids):
                got = alloc_many(self.backend, lo, hi, hi - lo + 1)
                if got != list(range(lo, hi + 1)):
                    done.extend(got)
                    raise BackendError(
                        5, f"backend {self.backend.name} returned {runs(got)} for [{lo}, {hi}]"
                    )
                done.extend(got)
        except PasidError:
            self.free(done)
            raise

    def free_exact(self, pasids: Sequence[int]) -> None:
        """Make the backend release exactly these PASIDs, all or none (a client's free).

        Unlike free, a failure is the request's: the runs already released are taken back
        and the error raised, so the client's set is as it was (a PASID the backend kept
        must not look free, or the next alloc would be refused for it).
        """
        if self._free_many(pasids):
            return
        done: list[int] = []
        for lo, hi in runs(pasids):
            try:
                self.backend.free(lo, hi)
            except PasidError:
                self.alloc_exact(done)
                raise
            done.extend(range(lo, hi + 1))

    def _free_many(self, pasids: Sequence[int]) -> bool:
        """The backend's own free_many, if it has one and did it (all or none)."""
        own = getattr(self.backend, "free_many", None)
        return bool(pasids) and own is not None and bool(own(pasids))

    def release(self, freed: list[int], *, exact: bool = False) -> bool:
        """A set gave these up: free them in the backend, unless they went to quarantine.

        Quarantined PASIDs stay held in the backend (so the kernel cannot give them to
        anyone either) until they leave it; the allocator reports them then
        (take_expired). Returns True when they were kept.
        """
        if self._quarantining():
            return True
        if exact:  # a client's free: all or nothing, its error is the request's
            self.free_exact(freed)
        else:  # a set's end: best effort, never undoes the destroy
            self.free(freed)
        return False

    def release_gone(self, freed: list[int]) -> list[int]:
        """A set's end: free these in the backend unless they went to quarantine; never
        raises. Returns the PASIDs the backend kept (its free failed): the kernel may still
        count them in use, so the caller withholds them from the pool (stuck.py)."""
        if self._quarantining():
            return []
        return self.free(freed)

    def free(self, pasids: Iterable[int]) -> list[int]:
        """Best effort: a failure is logged, never raised. Returns the PASIDs the backend
        failed to free, ascending."""
        pasids = list(pasids)
        try:
            if self._free_many(pasids):
                return []
        except PasidError as exc:  # nothing was freed: try run by run below
            log.error("backend free of %d PASIDs failed: %s", len(pasids), exc)
        kept: list[int] = []
        for lo, hi in runs(pasids):
            try:
                self.backend.free(lo, hi)
            except PasidError as exc:
                # The kernel's free returns nothing; a failure here leaves the backend
                # holding more than we do, never less, so no PASID is handed out twice.
                log.error("backend free [%d, %d] failed: %s", lo, hi, exc)
                kept.extend(range(lo, hi + 1))
        return kept
