"""Test-only fault injection: PASID_BROKER_TEST_FAULTS, read here and nowhere else.

Tests of the durability rules need a real broker process that misbehaves on purpose.
The daemon knows nothing of this: the test launcher (tests/faults/launch.py) reads the
variable, installs the faults in its own process, then runs the broker's main. It
warns on stderr naming every active fault. Comma-separated items:

  ack_before_commit        the deliberate bug the crash test must catch: each change is
                           acknowledged as soon as it is queued, before its commit
  commit_delay_ms=N        sleep N ms inside every store commit (a slow disk; widens the
                           window in which a crash meets queued work)
  commit_delay_file=PATH   with commit_delay_ms: sleep only while PATH exists, so that a
                           test slows the one commit it means to (an alloc in flight at a
                           SIGTERM) and not the start, the opens and the restart around it
  backend_fail_file=PATH   while PATH exists, backend alloc fails with EIO; if PATH
                           holds a number N, the next N allocs succeed first (so that a
                           multi-PASID request fails in its middle). Free is not failed:
                           the undo of a failed request must be able to give PASIDs back
  backend_free_fail_file=PATH  the same for backend free (alloc then still works)
  recovery_delay_ms=N      the broker's recovery (Broker.start) waits N ms first, its
                           sockets already listening: a broker that is recovering, which
                           clients must wait for (issue 19), for as long as a test needs
  recovery_delay_file=PATH with recovery_delay_ms: the recovery waits only while PATH
                           exists (N ms at most), so that a test lets it go as soon as what
                           it checks during the recovery is seen
  store_writes_nothing     every commit succeeds without touching SQLite (nothing is
                           durable): only for bench.rpc's account of what the store
                           costs; a restart loses everything
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from broker.backends.base import Backend, Capabilities
from broker.core.errors import BackendError

ENV = "PASID_BROKER_TEST_FAULTS"


@dataclass(frozen=True)
class TestFaults:
    ack_before_commit: bool = False
    commit_delay_ms: int = 0
    recovery_delay_ms: int = 0
    backend_fail_file: str = ""
    backend_free_fail_file: str = ""
    commit_delay_file: str = ""
    recovery_delay_file: str = ""
    store_writes_nothing: bool = False

    @property
    def active(self) -> bool:
        return self != TestFaults()


def load(environ: dict[str, str] | None = None) -> TestFaults:
    text = (os.environ if environ is None else environ).get(ENV, "")
    kw: dict[str, object] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, _, value = item.partition("=")
        if key in ("ack_before_commit", "store_writes_nothing"):
            kw[key] = True
        elif key in ("commit_delay_ms", "recovery_delay_ms"):
            kw[key] = int(value)
        elif key in (
            "backend_fail_file",
            "backend_free_fail_file",
            "commit_delay_file",
            "recovery_delay_file",
        ):
            kw[key] = value
        else:
            raise ValueError(f"{ENV}: unknown fault {key!r}")
    return TestFaults(**kw)  # type: ignore[arg-type]


class FailingBackend:
    """Wraps a backend; alloc (free) fails with EIO while its trigger file exists."""

    def __init__(self, inner: Backend, alloc_trigger: str, free_trigger: str = "") -> None:
        self.inner = inner
        self.name = inner.name
        self.triggers = {"alloc": alloc_trigger, "free": free_trigger}

    def _maybe_fail(self, op: str, lo: int, hi: int) -> None:
        if not self.triggers[op]:
            return
        trigger = Path(self.triggers[op])
        try:
            text = trigger.read_text().strip()
        except FileNotFoundError:
            return
        if text.isdigit() and int(text) > 0:
            trigger.write_text(str(int(text) - 1))
            return
        raise BackendError(
            errno.EIO, f"backend {self.name}: {op} [{lo}, {hi}] failed: EIO (injected)"
        )

    def open(self) -> Capabilities:
        return self.inner.open()

    def alloc(self, lo: int, hi: int) -> int:
        self._maybe_fail("alloc", lo, hi)
        return self.inner.alloc(lo, hi)

    def free(self, lo: int, hi: int) -> None:
        self._maybe_fail("free", lo, hi)
        self.inner.free(lo, hi)

    def close(self) -> None:
        self.inner.close()
