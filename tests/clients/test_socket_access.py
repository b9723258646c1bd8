"""Why a user may not connect, as the client library words it (PermissionDenied,
SOCKET_ACCESS): each cause that a socket's mode, owner and group can make, met by a real
process of uid 65534 (setpriv) calling a real listening Unix socket. The broker is not
needed: the kernel refuses the connect before anyone answers (tests/e2e/test_other_uid.py
meets a real broker)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.other_uid import NOBODY, open_for_nobody, require_setpriv, setpriv
from tests.harness import ROOT

CALL = """
import json, sys
from pasid_client import Client, PasidClientError
try:
    with Client(socket=sys.argv[1], timeout=5) as c:
        c.info()
    print(json.dumps(["OK"]))
except PasidClientError as exc:
    print(json.dumps([exc.code.name, exc.reason, exc.message]))
"""


@pytest.fixture
def listening() -> Iterator[Path]:
    """A listening Unix socket in a directory uid 65534 may enter (pytest's tmp_path is
    under a 0700 directory)."""
    require_setpriv()
    d = Path(tempfile.mkdtemp(prefix="pb-access-", dir="/tmp"))
    open_for_nobody(d)
    path = d / "broker.sock"
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
            s.listen()
            yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_as_nobody(code: str, path: Path, groups: str = "--clear-groups") -> list[Any]:
    """What `code` (given the socket's path) prints, as JSON, run by uid 65534 with
    `groups` (setpriv's option: no supplementary groups unless asked)."""
    prefix = [g if g != "--clear-groups" else groups for g in setpriv()]
    r = subprocess.run(
        [*prefix, sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def info_as_nobody(path: Path, groups: str = "--clear-groups") -> list[str]:
    return run_as_nobody(CALL, path, groups)


@pytest.mark.parametrize(
    ("mode", "owner", "groups", "why"),
    [
        (
            0o660,
            0,
            "--clear-groups",
            f"this user (uid {NOBODY}) is not in its group 'root' (mode 0660): add it"
            " (usermod -aG root USER), then log in again",
        ),
        (
            0o640,
            0,
            "--groups=0",
            "its group 'root', which this user is in, may not write it (mode 0640, owner"
            " root, group 'root')",
        ),
        (
            0o466,
            NOBODY,
            "--clear-groups",
            f"its owner (this user, uid {NOBODY}) may not write it (mode 0466, owner nobody,"
            " group 'root')",
        ),
    ],
    ids=["outside-the-group", "group-without-write", "owner-without-write"],
)
def test_each_cause_is_named(listening: Path, mode: int, owner: int, groups: str, why: str) -> None:
    os.chown(listening, owner, 0)
    os.chmod(listening, mode)
    assert info_as_nobody(listening, groups) == [
        "PERMISSION_DENIED",
        "SOCKET_ACCESS",
        f"permission denied connecting to {listening}: {why}",
    ]


def test_a_socket_that_lets_us_in_is_not_refused(listening: Path) -> None:
    """The mode allows the connect: whatever the call then meets (here a socket that
    never speaks gRPC), it is not a refusal of this user."""
    os.chmod(listening, 0o666)
    got = info_as_nobody(listening)
    assert got[:2] != ["PERMISSION_DENIED", "SOCKET_ACCESS"], got


def test_grpc_text_is_only_a_hint_our_own_connect_decides(listening: Path) -> None:
    """gRPC's UNAVAILABLE text (its 1.85 form, an older form without "addr:") names a
    refused path only where our own connect is refused too: the text alone, or another
    errno's text, is not a refusal."""
    os.chmod(listening, 0o660)
    code = (
        "import json, sys\nfrom pasid_client.access import grpc_refused_path\n"
        "p = sys.argv[1]\nprint(json.dumps([grpc_refused_path(t) for t in ["
        "f'unix:{p}: connect failed: addr: unix:{p} error: Permission denied',"
        "f'last error: UNKNOWN: unix:{p}: Permission denied',"
        "f'unix:{p}: connect failed: addr: unix:{p} error: No such file or directory',"
        "]]))\n"
    )

    def paths_as_nobody() -> list[str | None]:
        return run_as_nobody(code, listening)

    assert paths_as_nobody() == [str(listening), str(listening), None]
    os.chmod(listening, 0o666)  # the same text, but this user may connect: not refused
    assert paths_as_nobody() == [None, None, None]
