"""The instrumentation benchmark runs and reports its ratios (printed, never asserted on:
a shared 2-core machine's timings say nothing about the code)."""

from __future__ import annotations

import pytest

from bench import metrics_overhead
from tests import terminal


def test_overhead_benchmark_reports_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    metrics_overhead.main(["--pairs", "50", "--rounds", "2", "--rpc"])
    out = capsys.readouterr().out
    assert "hooks per alloc" in out and out.count("ratio ") == 6
    terminal.note(out)
