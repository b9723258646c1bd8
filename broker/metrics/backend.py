"""The backend, timed: every call's duration and every failure, by operation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from broker.backends.base import Backend, Capabilities, alloc_each
from broker.backends.base import replay as generic_replay

if TYPE_CHECKING:
    from broker.metrics.registry import Metrics

T = TypeVar("T")


class InstrumentedBackend:
    """A Backend that times every call and counts failures (op: alloc, free, replay)."""

    def __init__(self, inner: Backend, metrics: Metrics) -> None:
        self.inner = inner
        self.name = inner.name
        self._m = metrics
        self._alloc = metrics._backend_calls["alloc"].observe
        self._free = metrics._backend_calls["free"].observe
        self._replay = metrics._backend_calls["replay"].observe
        self._own_alloc_many = getattr(inner, "alloc_many", None)
        self._own_free_many = getattr(inner, "free_many", None)

    def open(self) -> Capabilities:
        return self.inner.open()

    def _timed(self, op: str, observe: Callable[[float], None], call: Callable[[], T]) -> T:
        """`call()`, its duration observed and its failure counted under `op`."""
        t0 = time.perf_counter()
        try:
            return call()
        except BaseException as exc:
            self._m.backend_error(op, exc)
            raise
        finally:
            observe(time.perf_counter() - t0)

    def alloc(self, lo: int, hi: int) -> int:
        return self._timed("alloc", self._alloc, lambda: self.inner.alloc(lo, hi))

    def alloc_many(self, lo: int, hi: int, count: int) -> list[int]:
        # A backend's own alloc_many is one call, timed once (the simulator's); without
        # one, the loop goes through self.alloc, so each ioctl is timed as before.
        own = self._own_alloc_many
        if own is None:
            return alloc_each(self, lo, hi, count)
        return self._timed("alloc", self._alloc, lambda: list(own(lo, hi, count)))

    def free(self, lo: int, hi: int) -> None:
        self._timed("free", self._free, lambda: self.inner.free(lo, hi))

    def free_many(self, pasids: Sequence[int]) -> bool:
        own = self._own_free_many
        if own is None:
            return False
        return self._timed("free", self._free, lambda: bool(own(pasids)))

    def replay(self, pasids: Iterable[int]) -> int:
        return self._timed("replay", self._replay, lambda: generic_replay(self.inner, pasids))

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Anything else a backend offers (capabilities, test hooks) is the inner one's.
        return getattr(self.inner, name)
