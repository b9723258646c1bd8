"""Issue 20, point 2 and the thread case of point 9: delegation never raises privilege.

Real processes throughout: a broker daemon; the delegating client
(tests/hostile/delegate_probe.py) as uid 65534 under setpriv; and, as the delegates, real
setuid-root and setgid-root copies of sleep(1) made here as root (chmod u+s, g+s) and run
by uid 65534, so that the kernel gives them uid 0 / gid 0 as it gave /usr/bin/passwd in
the issue's attack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pasid_client import Client
from pasid_client.handshake import obtain_ticket

from tests.e2e.other_uid import NOBODY, open_for_nobody, require_setpriv, setpriv
from tests.harness import ROOT, BrokerProcess, wait_until
from tests.hostile.common import assert_no_traceback
from tests.hostile.test_peer_socket import Attacker, assert_fds_back, fd_count, peer_path

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def uids_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid: line")


def gids_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Gid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Gid: line")


class Programs:
    """setuid-root and setgid-root copies of sleep, in a directory only uid 65534 enters."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="suid-", dir="/tmp"))
        os.chown(self.dir, 0, NOBODY)
        self.dir.chmod(0o750)
        sleep = shutil.which("sleep")
        assert sleep is not None
        self.suid = self.dir / "suid-sleep"
        shutil.copy(sleep, self.suid)
        os.chown(self.suid, 0, NOBODY)
        self.suid.chmod(0o4750)  # setuid root, runnable by group 65534 only
        self.sgid = self.dir / "sgid-sleep"
        shutil.copy(sleep, self.sgid)
        os.chown(self.sgid, 0, 0)
        self.sgid.chmod(0o2755)  # setgid root (the directory keeps other uids out)
        self.procs: list[subprocess.Popen[bytes]] = []

    def run_as_nobody(self, program: Path | str, *args: str) -> subprocess.Popen[bytes]:
        path = os.path.realpath(shutil.which(str(program)) or program)
        p = subprocess.Popen([*setpriv(), path, *args])
        self.procs.append(p)
        # setpriv execs the program: wait until the kernel shows the program's image.
        wait_until(
            lambda: os.path.realpath(f"/proc/{p.pid}/exe") == path, 10, 0.02, f"{path} to run"
        )
        return p

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def programs() -> Iterator[Programs]:
    require_setpriv()
    p = Programs()
    yield p
    p.close()


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    """Sockets open to every local user (0666, as in the issue); group 0 is an admin
    group, so that a delegate's gid 0 would make an admin if it were ever used."""
    require_setpriv()
    b = BrokerProcess("--socket-mode", "0666", "--admin-group", "0", "--quota-per-identity", "8")
    open_for_nobody(b.dir)
    b.start()
    yield b
    b.cleanup()


def probe(b: BrokerProcess, pid: int, *actions: str, uid: int = NOBODY) -> dict[str, Any]:
    """tests/hostile/delegate_probe.py as `uid` delegating `pid`: {action: (status, detail)}."""
    argv = [sys.executable, "-m", "tests.hostile.delegate_probe", b.address, peer_path(b)]
    out = subprocess.run(
        [*setpriv(uid), *argv, str(pid), *actions],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    return {r["action"]: (r["status"], r["detail"]) for r in lines}


def root_state(b: BrokerProcess) -> tuple[list[tuple[int, int, list[int]]], int]:
    """Every set (id, the uid it counts under, PASIDs) and in_use, as an admin sees them."""
    with Client(b.admin_address) as a:
        sets = sorted((s.set_id, s.uid, sorted(s.pasids())) for s in a.list_sets())
        return sets, a.info().in_use


def test_setuid_root_child_cannot_be_delegated(broker: BrokerProcess, programs: Programs) -> None:
    """The issue's attack: uid 65534 delegates the setuid-root program it started."""
    b = broker
    suid = programs.run_as_nobody(programs.suid, "60")
    wait_until(lambda: uids_of(suid.pid)[1] == 0, 10, 0.02, "the setuid program's euid 0")
    assert uids_of(suid.pid) == [NOBODY, 0, 0, 0]
    with Client(b.address) as c, c.session("root-vm", grace_seconds=60) as s:
        s.alloc(1, 100, 3)  # root's own set, which the attacker wants to see
        before = root_state(b)
        baseline = fd_count(b)
        got = probe(b, suid.pid, "handshake", "alloc", "list_all", "watch_all")
        denied = f"uid {NOBODY} may not delegate process {suid.pid}: it holds uid(s) 0, {NOBODY}"
        for action in ("handshake", "alloc", "list_all", "watch_all"):
            status, detail = got[action]
            assert status == "PERMISSION_DENIED" and denied in detail, (action, got[action])
        # Its own ticket (no delegation) is no better: listings of others stay refused.
        own = probe(b, os.getpid(), "list_all")  # root's pid: refused before any call
        assert own["list_all"][0] == "PERMISSION_DENIED"
        # More refused delegations than a uid's ticket allowance (1024): none counts
        # against root's tickets, quota or descriptors.
        a = Attacker(peer_path(b))
        try:
            replies = a.send(b'{"v": 1, "fds": ["pidfd"]}', [f"pidfd:{suid.pid}"], repeat=1100)
        finally:
            a.close()
        assert list(replies) == [
            f"PERMISSION_DENIED: {denied} (real, effective, saved, fs);"
            " only root may delegate a process that holds a uid other"
            " than the caller's"
        ], replies
        assert root_state(b) == before
        assert_fds_back(b, baseline, "1100 refused delegations")
        assert obtain_ticket(peer_path(b)).uid == 0  # root's ticket allowance is whole
        assert s.alloc(1, 1000, 5)  # and its quota (8 per identity): 3 + 5
    assert_no_traceback(b)


def test_setgid_delegate_lends_no_group(broker: BrokerProcess, programs: Programs) -> None:
    """A delegate whose uids are all the caller's is allowed, but its gid 0 (an admin
    group here) is not the caller's: the ticket carries the delegator's uid and gid, and
    List(all_sets) and the full Watch stay refused."""
    b = broker
    sgid = programs.run_as_nobody(programs.sgid, "60")
    wait_until(lambda: gids_of(sgid.pid)[1] == 0, 10, 0.02, "the setgid program's egid 0")
    assert uids_of(sgid.pid) == [NOBODY] * 4
    got = probe(b, sgid.pid, "handshake", "list_all", "watch_all")
    status, ident = got["handshake"]
    assert status == "OK" and ident == {
        "uid": NOBODY,
        "gid": NOBODY,
        "pid": sgid.pid,
        "delegated": True,
    }, got
    for action in ("list_all", "watch_all"):
        assert got[action][0] == "PERMISSION_DENIED", (action, got[action])
    # The broker still serves root (an admin) as before.
    assert obtain_ticket(peer_path(b)).uid == 0
    assert_no_traceback(b)


def test_quotas_count_under_the_delegator(broker: BrokerProcess, programs: Programs) -> None:
    """Root delegating uid 65534's process: the set counts against root's quota (8 per
    identity), not uid 65534's, which stays whole for its own sessions."""
    b = broker
    vmm = programs.run_as_nobody("sleep", "60")
    with Client(b.address) as c, c.session("sidecar", delegate_pid=vmm.pid) as s:
        assert len(s.alloc(1, 1000, 8)) == 8
        with Client(b.admin_address) as a:
            views = {x.set_id: x for x in a.list_sets()}
        mine = views[s.set_id]
        assert (mine.pid, mine.uid, mine.delegated_by_pid) == (vmm.pid, 0, os.getpid())
        # uid 65534 delegating its own process: its identity, its whole quota.
        got = probe(b, vmm.pid, "handshake", "alloc")
        assert got["handshake"] == (
            "OK",
            {"uid": NOBODY, "gid": NOBODY, "pid": vmm.pid, "delegated": True},
        ), got
        assert got["alloc"][0] == "OK" and len(got["alloc"][1]) == 5, got
    assert_no_traceback(b)


THREADED = """
import sys, threading
ev = threading.Event()
t = threading.Thread(target=ev.wait)
t.start()
print(t.native_id, flush=True)
sys.stdin.read()
ev.set()
"""


def test_thread_pidfd_is_refused(broker: BrokerProcess) -> None:
    """A pidfd of a thread (PIDFD_THREAD) reports the thread's exit: a set held by it
    would die with the thread while the process lives. Refused, by the broker for a
    thread's pidfd (of a non-leader, and of the leader itself) and by the client library
    for a thread id given as delegate_pid."""
    b = broker
    p = subprocess.Popen(
        [*setpriv(), sys.executable, "-c", THREADED],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        tid = int(p.stdout.readline())
        assert tid != p.pid
        got = probe(b, tid, "--thread", "handshake")
        status, detail = got["handshake"]
        assert status == "INVALID_ARGUMENT", got
        assert f"names thread {tid} of process {p.pid}, not a process" in detail
        leader = probe(b, p.pid, "--thread", "handshake")["handshake"]
        assert leader[0] == "INVALID_ARGUMENT" and "PIDFD_THREAD" in leader[1], leader
        by_tid = probe(b, tid, "alloc")["alloc"]
        assert by_tid[0] == "INVALID_ARGUMENT" and "a thread id?" in by_tid[1], by_tid
        # The process itself is delegated as usual.
        ok = probe(b, p.pid, "handshake")["handshake"]
        assert ok[0] == "OK" and ok[1]["pid"] == p.pid, ok
    finally:
        p.kill()
        p.wait()
    with Client(b.admin_address) as a:
        assert list(a.list_sets()) == []
    assert_no_traceback(b)
