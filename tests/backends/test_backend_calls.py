"""BackendCalls: the backend holds exactly what the allocator holds, all or none, whether
the backend frees a scattered set in one call (free_many) or run by run."""

from __future__ import annotations

import pytest

from broker.backends.base import Capabilities
from broker.backends.simulator import SimulatorBackend
from broker.core import BackendError, runs
from broker.engine.backend_calls import BackendCalls


class RunByRun:
    """The simulator without free_many (as a kernel backend is): one free per run."""

    def __init__(self) -> None:
        self.inner = SimulatorBackend(pasid_bits=12)
        self.name = "run-by-run"
        self.frees: list[tuple[int, int]] = []

    def open(self) -> Capabilities:
        return self.inner.open()

    def alloc(self, lo: int, hi: int) -> int:
        return self.inner.alloc(lo, hi)

    def free(self, lo: int, hi: int) -> None:
        self.frees.append((lo, hi))
        self.inner.free(lo, hi)

    def close(self) -> None:
        self.inner.close()


def held(b: SimulatorBackend) -> list[int]:
    return [p for p in range(1 << b.pasid_bits) if b._space().is_used(p)]


SCATTERED = list(range(3, 400, 7))  # a set's PASIDs among other sets': runs of one


def test_free_exact_in_one_call_when_the_backend_can() -> None:
    b = SimulatorBackend(pasid_bits=12)
    b.open()
    calls = BackendCalls(b, lambda: False)
    calls.alloc_exact(SCATTERED)
    calls.alloc_exact([500])
    assert held(b) == [*SCATTERED, 500]

    def one_run(lo: int, hi: int) -> None:
        raise AssertionError(f"freed run [{lo}, {hi}] alone: free_many not used")

    b.free = one_run  # type: ignore[method-assign]
    calls.free_exact(SCATTERED)
    assert held(b) == [500]


def test_free_exact_all_or_none_when_free_many_fails() -> None:
    b = SimulatorBackend(pasid_bits=12)
    b.open()
    calls = BackendCalls(b, lambda: False)
    calls.alloc_exact(SCATTERED)
    b.fail_next = 1
    with pytest.raises(BackendError):
        calls.free_exact(SCATTERED)
    assert held(b) == SCATTERED  # nothing freed: the client's set is as it was


def test_a_backend_without_free_many_frees_run_by_run() -> None:
    b = RunByRun()
    b.open()
    calls = BackendCalls(b, lambda: False)  # type: ignore[arg-type]
    calls.alloc_exact(SCATTERED)
    calls.free_exact(SCATTERED)
    assert b.frees == runs(SCATTERED)
    assert held(b.inner) == []


def test_best_effort_free_uses_free_many_and_survives_its_failure() -> None:
    b = SimulatorBackend(pasid_bits=12)
    b.open()
    calls = BackendCalls(b, lambda: False)
    calls.alloc_exact(SCATTERED)
    b.fail_next = 1  # free_many fails, then run by run succeeds: never raised
    calls.free(SCATTERED)
    assert held(b) == []
