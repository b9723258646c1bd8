"""Lines a test prints on the run's terminal whether or not output is captured, and also
under pytest-xdist, where a worker's own terminal is lost: `note` queues the line, and
tests/conftest.py attaches it to the test's report and prints it where reports arrive."""

from __future__ import annotations

_pending: list[str] = []


def note(text: str) -> None:
    """Show `text` on the terminal with the report of the test (or fixture) running now."""
    _pending.append(text)


def take() -> list[str]:
    """The lines queued since the last report (tests/conftest.py)."""
    out = _pending[:]
    _pending.clear()
    return out
