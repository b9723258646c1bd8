"""The benchmark must keep running (it is not a timed test: no figure is checked)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.harness import ROOT


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m bench ARGS` from the checkout, as `make bench` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def test_core_benchmark_runs_and_prints_its_ratios() -> None:
    r = bench("core", "--quick", timeout=110)
    assert r.returncode == 0, r.stderr
    for line in ("worst full/empty ratio", "free [0, 2^32 - 1]", "bytes/PASID", "machine:"):
        assert line in r.stdout


def test_unknown_benchmark_is_refused() -> None:
    r = bench("nope")
    assert r.returncode == 2 and "unknown benchmark nope" in r.stderr


def test_daemon_benchmarks_run_and_print_their_ratios() -> None:
    """rpc, release and restart in --quick mode: they still run end to end against real
    processes and print the ratios the docs quote (no figure is checked)."""
    r = bench("rpc", "release", "restart", "--quick", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in (
        "(target >= 0.85)",
        "(target <= 1.3)",
        "(target >= 100,000)",
        "what fsync per commit costs",
        "server CPU per call: echo",
        "p99 / target 50 ms",
        "exec -> first RPC",
        "imports alone",
        "VmRSS:",
    ):
        assert line in r.stdout, r.stdout


def test_watch_benchmark_runs_and_prints_its_ratio() -> None:
    """`bench watch --quick`: 512 watchers of a churning set against another tenant's
    allocs, end to end; the ratio the docs quote comes out (no figure is checked)."""
    r = bench("watch", "--quick", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "watch fan-out: p99 ratio" in r.stdout and "(target <= 5)" in r.stdout, r.stdout
    assert "with 512 watchers of it" in r.stdout


def test_memory_benchmark_runs_and_prints_the_sizing_figures() -> None:
    """`bench memory --quick`: recovery's peak per PASID and per set, from real starts."""
    r = bench("memory", "--quick", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ("per held PASID:", "per set (session):", "sizing:"):
        assert line in r.stdout, r.stdout


def test_profile_splits_each_servers_cpu_by_component() -> None:
    """`bench profile --quick`: perf samples the echo, the broker and the broker without
    SQLite, and the table the docs quote comes out (no figure is checked)."""
    if shutil.which("perf") is None:
        pytest.skip("perf is not installed (Debian's linux-perf): bench profile would skip")
    r = bench("profile", "--quick", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    if "skipped: perf cannot sample here" in r.stdout:
        pytest.skip(r.stdout.strip())
    for line in ("broker - echo", "Python interpreter", "SQLite", "total (/proc)", "main thread"):
        assert line in r.stdout, r.stdout
