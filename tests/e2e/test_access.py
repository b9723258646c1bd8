"""Who can reach the broker's files: sockets born with their final mode, data files 0600.

Real processes: the broker is started under umask 000 (the worst an operator's shell or a
unit without UMask= can give it) while a process running as uid 65534 tries to connect to
both sockets as fast as it can, from before the broker exists until it serves.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from pasid_client import Client

from tests.e2e.other_uid import SYSTEM_PYTHON, as_nobody, open_for_nobody, require_setpriv
from tests.harness import BrokerProcess

# Connects to every path given, in a loop, until the stop file appears; prints how many
# connections succeeded per path. Standard library only (it runs as nobody).
RACER = r"""
import os, socket, sys
stop, paths = sys.argv[1], sys.argv[2:]
ok = dict.fromkeys(paths, 0)
tries = 0
while not os.path.exists(stop):
    for p in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(p)
            ok[p] += 1
        except OSError:
            pass
        finally:
            s.close()
    tries += 1
print(tries, *(ok[p] for p in paths))
"""


def _mode(p: str | Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _start_under_umask(b: BrokerProcess, umask: int) -> None:
    old = os.umask(umask)
    try:
        b.start()
    finally:
        os.umask(old)


def test_no_window_on_either_socket_under_umask_000() -> None:
    """Six starts under umask 000, each raced by uid 65534: no connection ever lands on the
    admin socket (0600) or the clients' socket (0660, group root), and the modes are final."""
    require_setpriv()
    for _ in range(6):
        b = BrokerProcess()
        try:
            open_for_nobody(b.dir)
            racer_py = b.dir / "racer.py"
            racer_py.write_text(RACER)
            racer_py.chmod(0o644)
            stop = b.dir / "stop"
            racer = as_nobody(
                [SYSTEM_PYTHON, str(racer_py), str(stop), b.admin_socket, b.socket],
                stdout=-1,
                stderr=-1,
            )
            time.sleep(0.05)  # the racer is looping before the broker exists
            _start_under_umask(b, 0o000)
            stop.touch()
            out, err = racer.communicate(timeout=30)
            tries, admin_ok, main_ok = (int(x) for x in out.split())
            assert tries > 10, f"racer barely ran: {out!r} {err!r}"
            assert (admin_ok, main_ok) == (0, 0), (
                f"uid 65534 connected: admin {admin_ok}, main {main_ok} of {tries} tries"
            )
            assert _mode(b.admin_socket) == 0o600
            assert _mode(b.socket) == 0o660
            # No staging directory is left beside the sockets.
            assert sorted(p.name for p in b.dir.iterdir() if p.name.startswith(".")) == []
            with Client(b.address) as c:  # and the broker's own user is served
                assert c.info().capacity > 0
        finally:
            b.cleanup()


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask000", "umask022"])
def test_data_files_are_0600_whatever_the_umask(umask: int) -> None:
    """The database, its -wal and lock file: 0600 when created under umask 000 or 022,
    and tightened at start when an older broker left them (or a -shm) 0644. (No -shm is
    made any more: exclusive locking keeps the WAL index in the broker's heap.)"""
    b = BrokerProcess()
    try:
        _start_under_umask(b, umask)
        with Client(b.address) as c, c.session("files", grace_seconds=60) as s:
            s.alloc(1, 100)
        files = [b.db, b.db + "-wal", b.db + ".lock"]
        assert {f: _mode(f) for f in files} == dict.fromkeys(files, 0o600)
        assert not os.path.exists(b.db + "-shm")
        b.stop()
        files.append(b.db + "-shm")  # an older broker's, left behind
        with open(b.db + "-shm", "wb"):
            pass
        for f in files:
            if os.path.exists(f):
                os.chmod(f, 0o644)
        _start_under_umask(b, umask)
        present = [f for f in files if os.path.exists(f)]
        assert b.db in present and b.db + ".lock" in present
        assert {f: _mode(f) for f in present} == dict.fromkeys(present, 0o600)
    finally:
        b.cleanup()
