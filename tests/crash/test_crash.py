"""The crash test's short form (the long one: `make crash-test`), and a test of the test."""

from __future__ import annotations

import time

import pytest

from tests.crash.crashtest import run


@pytest.mark.timeout(300)
def test_short_crash_run_finds_nothing_lost_or_held_twice() -> None:
    t0 = time.monotonic()
    rep = run(kills=6, workers=4)
    print(rep.summary(), f"(wall {time.monotonic() - t0:.1f} s)")
    assert rep.violations == []
    # Not vacuous: real traffic, every check ran, clients died both ways.
    assert rep.kills == 6 and rep.checks == 12
    assert rep.worker_kills >= 3
    assert rep.acked_allocs > 200 and rep.acked_frees > 200
    assert rep.max_held > 20


@pytest.mark.timeout(300)
def test_slow_commits_alone_break_no_rule() -> None:
    """The control for the test below: a slow disk puts more work in flight at each kill,
    but a broker that waits for its commits still loses nothing."""
    rep = run(
        kills=3,
        workers=4,
        broker_env={"PASID_BROKER_TEST_FAULTS": "commit_delay_ms=20"},
        keep=False,
    )
    print(rep.summary())
    assert rep.violations == []
    assert rep.acked_allocs > 20


@pytest.mark.timeout(300)
def test_crash_test_catches_a_broker_that_acknowledges_before_committing() -> None:
    rep = run(
        kills=6,
        workers=4,
        broker_env={"PASID_BROKER_TEST_FAULTS": "ack_before_commit,commit_delay_ms=20"},
        stop_on_violation=True,
        keep=False,
    )
    print(rep.summary())
    assert rep.violations, "the crash test missed a broker that acks before its commit"
    assert any(
        "acknowledged PASIDs not held" in v or "never acknowledged" in v for v in rep.violations
    )
