"""`pasid-broker backup` copies the database online (SQLite's backup API) while the broker
serves and allocates; `pasid-broker restore` puts it back only while no broker holds it;
a broker started on the restored file serves exactly what the backup held."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from pasid_client import Client

from tests.e2e.filesystems import fill, tmpfs
from tests.e2e.other_uid import NOBODY, SYSTEM_PYTHON, open_for_nobody, setpriv
from tests.harness import ROOT, BrokerProcess, db_holdings, run_broker_once


def _pb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_backup_while_serving_and_restore(tmp_path: Path) -> None:
    b = BrokerProcess("--restart-grace", "60").start()
    try:
        with Client(b.address) as c:
            s = c.session("vm", grace_seconds=300)
            held = s.alloc(1, 1000, count=50)
            # Allocations keep landing while the backup runs.
            stop = threading.Event()

            def churn() -> None:
                with Client(b.address) as c2, c2.session("churn") as s2:
                    while not stop.is_set():
                        s2.free(s2.alloc(2000, 3000, count=5)[0], 3000)

            t = threading.Thread(target=churn)
            t.start()
            try:
                dest = tmp_path / "backup.db"
                r = _pb("backup", "--db", b.db, str(dest))
                assert r.returncode == 0, r.stderr
                assert "integrity ok" in r.stdout
            finally:
                stop.set()
                t.join(30)
            token = s.token
            snapshot = db_holdings(dest)
            assert sorted(snapshot[s.set_id]) == held
            more = s.alloc(1, 1000, count=3)  # after the backup: not in it
            s.detach()  # kept for the resume below (leaving the client releases)
        # Restore refuses under the running broker, naming it.
        r = _pb("restore", "--db", b.db, "--socket", b.socket, str(dest))
        assert r.returncode == 1
        assert f"in use by pid {b.proc.pid}" in r.stderr  # type: ignore[union-attr]
        assert b.stop() == 0
        # Copied back by hand, the older file is behind its witness: refused, not served.
        hand = tmp_path / "hand"
        hand.mkdir()
        for name in ("broker.db", "broker.db.revision"):
            shutil.copy2(Path(b.db).with_name(name), hand / name)
        shutil.copy2(dest, hand / "broker.db")
        r = run_broker_once("--db", str(hand / "broker.db"), "--socket", str(hand / "s.sock"))
        assert r.returncode == 2
        assert "logged changes are missing" in r.stderr
        assert "`pasid-broker restore` resets the witness" in r.stderr
        r = _pb("restore", "--db", b.db, "--socket", b.socket, str(dest))
        assert r.returncode == 0, r.stderr
        assert "logged changes after it are rolled back" in r.stdout
        b.start()
        # The rollback is reported, once, loudly (issue 22: a restore is never silent).
        assert "store restored from a backup" in b.read_log()
        with Client(b.address) as c, c.session(resume_token=token) as again:
            assert sorted(again.list().pasids()) == held  # as backed up: `more` is not there
            assert not set(more) & set(again.list().pasids())
        b.restart()
        assert b.read_log().count("store restored from a backup") == 1
    finally:
        b.cleanup()


def test_backup_of_a_missing_database_fails_in_one_line(tmp_path: Path) -> None:
    r = _pb("backup", "--db", str(tmp_path / "none.db"), str(tmp_path / "out.db"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"pasid-broker backup: no database at {tmp_path}/none.db"
    assert not (tmp_path / "none.db").exists()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _nobody_cannot_read(path: Path) -> None:
    """Another uid (65534, setpriv) reading `path` gets EACCES, the directory being open
    to it (skipped, saying why, where another uid cannot be taken)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return
    seen = Path(tempfile.mkdtemp(prefix="pb-backup-", dir="/tmp"))
    try:
        seen.chmod(0o755)
        copy = seen / path.name
        shutil.copy2(path, copy)  # its mode with it, in a directory nobody may enter
        r = subprocess.run(
            [*setpriv(), SYSTEM_PYTHON, "-c", f"open({str(copy)!r}, 'rb').read()"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode != 0 and "PermissionError" in r.stderr, (r.returncode, r.stderr)
    finally:
        shutil.rmtree(seen, ignore_errors=True)


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask000", "umask022"])
def test_backup_and_restore_are_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """A backup names every tenant's clients and pids and holds token hashes: 0600 under
    the loosest umask an operator's shell may have (issue 20, point 8), as is a restored
    database and every file the daemon writes (tests/e2e/test_access.py)."""
    b = BrokerProcess().start()
    try:
        with Client(b.address) as c, c.session("vm", grace_seconds=60) as s:
            s.alloc(1, 100, count=2)
            dest = tmp_path / "backup.db"
            dest.write_bytes(b"")
            dest.chmod(0o644)  # an older, readable copy is replaced, not reused
            old = os.umask(umask)
            try:
                r = _pb("backup", "--db", b.db, str(dest))
            finally:
                os.umask(old)
            assert r.returncode == 0, r.stderr
        assert _mode(dest) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.db"]  # no leftovers
        _nobody_cannot_read(dest)
        assert b.stop() == 0
        old = os.umask(umask)
        try:
            r = _pb("restore", "--db", b.db, "--socket", b.socket, str(dest))
        finally:
            os.umask(old)
        assert r.returncode == 0, r.stderr
        assert _mode(Path(b.db)) == 0o600
    finally:
        b.cleanup()


def test_backup_into_a_missing_directory_names_the_file_and_the_cause(tmp_path: Path) -> None:
    b = BrokerProcess().start()
    try:
        dest = tmp_path / "backups/broker.db"
        r = _pb("backup", "--db", b.db, str(dest))
        assert r.returncode == 1
        assert r.stderr.strip() == (
            f"pasid-broker backup: cannot write {dest}: directory {dest.parent} does not exist"
            f" (create it, owned by the user that runs the backup, uid {os.geteuid()})"
        )
    finally:
        b.cleanup()


def test_backup_into_a_directory_not_writable_names_the_file_and_the_cause(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        why = "needs root and setpriv to run the backup as an unprivileged user"
        print(f"\nSKIP: {why}")
        pytest.skip(why)
    closed = Path(tempfile.mkdtemp(prefix="pbk-", dir="/tmp"))
    closed.chmod(0o755)  # nobody may enter it, not write in it
    b = BrokerProcess().start()
    try:
        open_for_nobody(Path(b.db).parent)
        os.chmod(b.db, 0o644)  # readable: the directory is what is refused
        dest = closed / "broker.db"
        r = subprocess.run(
            [*setpriv(), sys.executable, "-m", "broker", "backup", "--db", b.db, str(dest)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip() == (
            f"pasid-broker backup: cannot write {dest}: directory {closed} is not writable"
            f" by uid {NOBODY}"
        )
    finally:
        shutil.rmtree(closed, ignore_errors=True)
        b.cleanup()


def test_restore_when_the_socket_directory_is_gone(tmp_path: Path) -> None:
    """After `systemctl stop` without RuntimeDirectoryPreserve=, or after a reboot, the
    socket's directory does not exist: restore proceeds on the database's lock alone, which
    still refuses while a broker runs on that database."""
    b = BrokerProcess("--restart-grace", "60").start()
    try:
        with Client(b.address) as c:
            s = c.session("vm", grace_seconds=300)
            held = s.alloc(1, 1000, count=3)
            token = s.token
            s.detach()  # kept for the resume below (leaving the client releases)
        dest = tmp_path / "backup.db"
        assert _pb("backup", "--db", b.db, str(dest)).returncode == 0
        gone = str(tmp_path / "run/pasid-broker/broker.sock")
        r = _pb("restore", "--db", b.db, "--socket", gone, str(dest))
        assert r.returncode == 1, r.stderr
        assert f"{b.db} is in use by pid {b.proc.pid}" in r.stderr  # type: ignore[union-attr]
        assert b.stop() == 0
        r = _pb("restore", "--db", b.db, "--socket", gone, str(dest))
        assert r.returncode == 0, r.stderr
        assert not (tmp_path / "run").exists(), "restore created the socket's directory"
        b.start()
        with Client(b.address) as c, c.session(resume_token=token) as again:
            assert sorted(again.list().pasids()) == held
    finally:
        b.cleanup()


def _no_room(fs: Path, what: str) -> None:
    """The filesystem has no room left: no block (a file written until it fails), or no
    inode (empty files made until it fails, `df -i` at 100 %)."""
    if what == "blocks":
        fill(fs)
        return
    n = 0
    with contextlib.suppress(OSError):
        while True:
            (fs / f"inode-{n}").touch()
            n += 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a tmpfs mount)")
@pytest.mark.parametrize("what", ["blocks", "inodes"])
def test_backup_while_the_databases_filesystem_is_full(tmp_path: Path, what: str) -> None:
    """A full filesystem is when a backup matters most (docs/runbook.md, "A full
    filesystem": take one before cleaning up). The broker cannot make its copy beside
    the database then, out of blocks or out of inodes: it makes it in memory, and the
    backup holds every PASID the broker had acknowledged."""
    with tmpfs(1024, "nr_inodes=16") as fs:
        b = BrokerProcess(workdir=str(tmp_path))
        b.db = str(fs / "broker.db")  # only the database on the small filesystem
        try:
            b.start()
            with Client(b.address) as c, c.session("vm", grace_seconds=60) as s:
                held = s.alloc(1, 1000, count=50)
                _no_room(fs, what)
                dest = tmp_path / "backup.db"
                r = _pb("backup", "--db", b.db, "--socket", b.socket, str(dest))
                assert r.returncode == 0, r.stderr
                assert "integrity ok" in r.stdout
                assert sorted(db_holdings(dest)[s.set_id]) == held
                assert not list(fs.glob(".broker.db.backup-*"))  # no half copy left there
        finally:
            b.cleanup()
