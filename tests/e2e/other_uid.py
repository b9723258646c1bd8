"""Run code as another local user (uid/gid 65534, no groups) for access tests.

The hostile local user of issue 11: `setpriv` drops to nobody, and the probe runs under
the system's python3 (the test venv may not be readable by that user). Only the standard
library is available there, so probes speak raw sockets or shell out to grpcurl-like code
passed in as text.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


def require_setpriv() -> None:
    """Skip (saying why) where another uid cannot be taken."""
    if os.geteuid() != 0:
        pytest.skip("another uid needs root to setpriv to 65534; run as root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")


def setpriv(uid: int = NOBODY) -> list[str]:
    """The command prefix that runs the rest as uid/gid `uid` with no supplementary groups."""
    return ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]


def as_nobody(argv: list[str], **kw: object) -> subprocess.Popen[str]:
    """Start argv as uid/gid 65534 with no supplementary groups."""
    cmd = [*setpriv(), *argv]
    return subprocess.Popen(cmd, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def open_for_nobody(path: Path) -> None:
    """Let uid 65534 traverse `path` (a test's private directory), as /run/pasid-broker
    would be on a host: then the socket's own mode is what decides."""
    path.chmod(0o755)
