"""What the guest scripts share (they run INSIDE a kernel tier's QEMU guest, tests/kernel/vm.py
boots them): the `PBK {json}` console lines the host-side tests read, and the daemon's own
main() run in the script's process beside a client thread.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
for _p in (ROOT, ROOT / "proto", ROOT / "clients"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

SCRATCH = os.environ.get("PBK_SCRATCH", "/tmp")

Result = dict[str, object]


def emit(event: str, **data: object) -> None:
    """One finding on the serial console, for the host-side test."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    line = json.dumps({"event": event, "uptime": uptime, **data}, default=str)
    print("PBK " + line, flush=True)


def run_main(
    argv: list[str], sock: str = "", client: Callable[[Result], None] | None = None
) -> tuple[int, str, Result]:
    """The daemon's main(argv) in this process (a second Python start costs 20-30 s in
    TCG), in the main thread (it owns the signal handlers). With `client`: once `sock`
    exists it runs in a thread, filling the result, then SIGTERMs the daemon as an operator
    would; its exception becomes result["error"]. Returns main's status, its stderr and
    the result."""
    from broker.__main__ import main as broker_main

    result: Result = {}

    def run_client() -> None:
        assert client is not None
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(sock) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not os.path.exists(sock):
                result["error"] = "the daemon never listened"
                return
            client(result)
        except Exception as exc:
            result["error"] = repr(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run_client, daemon=True) if client else None
    if thread is not None:
        thread.start()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = broker_main(argv)
    if thread is not None:
        thread.join(30)
    return status, err.getvalue(), result
