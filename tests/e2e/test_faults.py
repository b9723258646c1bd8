"""Faults of the store and the backend, each on a real broker process.

After each: a precise status and message, the daemon SERVING again once the fault is
gone (readiness is NOT_SERVING while commits fail), a further request works, and memory
(List, GetInfo) equals disk (a direct read of the SQLite file). Root is needed for tmpfs
mounts and chattr; those tests skip otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pasid_client import Client, Session, Unavailable

from broker.service.endpoints import SERVICE_NAME
from broker.store import AddPasids, CreateSet, SetRow, SqliteStore
from broker.store.checks import Digest, store_digest
from tests.e2e.filesystems import fill, tmpfs
from tests.e2e.test_sessions import spawn_holder
from tests.harness import (
    BrokerProcess,
    assert_memory_matches_disk,
    db_holdings,
    open_db,
    run_broker_once,
    wait_until,
)
from tests.metrics.scrape import scrape

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs mount, chattr)")
FAULTS = "PASID_BROKER_TEST_FAULTS"


def _metric(b: BrokerProcess, name: str) -> float:
    return scrape(b.metrics_url).value(name)


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- at start: the file is refused, untouched, with the reason -------------------------


def test_corrupt_file_refused_at_start_untouched(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    db.write_bytes(b"this is not an SQLite database, it is garbage\n" * 200)
    before = sha(db)
    r = run_broker_once("--db", str(db), "--socket", str(tmp_path / "s.sock"))
    assert r.returncode == 2, r.stderr
    assert (
        f"cannot open store {db}: it cannot be trusted: SQLITE_NOTADB: file is not a database"
        in r.stderr
    )
    assert 'see docs/runbook.md, section "Corruption"' in r.stderr
    assert sha(db) == before
    assert not Path(f"{db}-wal").exists()
    (kept,) = tmp_path.glob("b.db.corrupt-*")
    assert sha(kept / "b.db") == before


def test_corrupt_file_refused_before_anything_listens(tmp_path: Path) -> None:
    """The store step comes before the listeners: a socket file at --socket (here one
    this test bound, and no broker's lock) is not replaced by a start that the store
    refuses. Were the sockets bound first, the broker would have renamed its own over it
    and removed it on the way out."""
    db = tmp_path / "b.db"
    db.write_bytes(b"garbage" * 1000)
    path = tmp_path / "s.sock"
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs.bind(str(path))
        ino = path.stat().st_ino
        r = run_broker_once("--db", str(db), "--socket", str(path))
        assert r.returncode == 2, r.stderr
        assert "SQLITE_NOTADB" in r.stderr
        assert path.exists() and path.stat().st_ino == ino, "the refused broker bound its socket"
    finally:
        theirs.close()


def _wal_store(db: Path) -> None:
    st = SqliteStore(db)
    st.open()
    st.commit([CreateSet(SetRow(1, "vm", 0, 1000, 0, "h", 1.0)), AddPasids(1, (5, 6))])
    st.close()


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (
            "INSERT INTO allocations VALUES (9, 42)",
            "foreign key check failed: allocations rowid 9 -> sets",
        ),
        (
            f"INSERT INTO allocations VALUES ({1 << 20}, 1)",
            f"set 1 (vm) cannot be restored: PASID {1 << 20} outside the 20-bit namespace",
        ),
        (
            "INSERT INTO allocations VALUES (0, 1)",
            "PASID 0 is already held, reserved or quarantined",
        ),
    ],
    ids=["orphan-allocation", "beyond-pasid-bits", "pasid-zero"],
)
def test_broken_invariant_refused_at_start_untouched(
    tmp_path: Path, sql: str, message: str
) -> None:
    db = tmp_path / "b.db"
    _wal_store(db)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA foreign_keys=OFF")
    con.execute(sql)
    # As a bug of the broker's own would leave it: the digest agrees with the rows (an
    # edit by hand that does not is refused before: test_store_checks).
    rows = con.execute("SELECT set_id, pasid FROM allocations").fetchall()
    held: dict[int, list[int]] = {}
    for set_id, pasid in rows:
        held.setdefault(set_id, []).append(pasid)
    store_digest(con, Digest.of(held))
    con.close()
    before = sha(db)
    r = run_broker_once("--db", str(db), "--socket", str(tmp_path / "s.sock"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "refusing to start" in r.stderr or "cannot open store" in r.stderr
    assert sha(db) == before


def test_corrupt_page_refused_at_start(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit(
        [CreateSet(SetRow(1, "vm", 0, 1000, 0, "h", 1.0)), AddPasids(1, tuple(range(1, 900)))]
    )
    st.close()
    con = sqlite3.connect(db)
    (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name='allocations'").fetchone()
    (page,) = con.execute("PRAGMA page_size").fetchone()
    con.close()
    data = bytearray(db.read_bytes())
    at = (root - 1) * page
    data[at : at + 8] = b"\xff" * 8  # the b-tree page header of the allocations table
    db.write_bytes(bytes(data))
    before = sha(db)
    r = run_broker_once("--db", str(db), "--socket", str(tmp_path / "s.sock"))
    assert r.returncode == 2, r.stderr
    assert f"cannot open store {db}:" in r.stderr
    assert "SQLITE_CORRUPT" in r.stderr or "malformed" in r.stderr
    assert sha(db) == before


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (
            "UPDATE sets SET client = CAST(X'FF80' AS TEXT)",
            "SQLITE_CORRUPT: a text value is not UTF-8: Could not decode to UTF-8 column",
        ),
        ("UPDATE sets SET grace_seconds = X'0102'", "sets.grace_seconds of row 1 is a blob"),
        ("UPDATE sets SET quota = 'many'", "sets.quota of row 1 is a text ('many')"),
        (
            "INSERT INTO quarantine (pasid, release_unix, kind) VALUES (77, 'soon', 'time')",
            "quarantine.release_unix of row 77 is a text ('soon')",
        ),
        ("UPDATE sets SET pid = 77", "the sets do not match their digest"),
        (
            "INSERT INTO quarantine (pasid, release_unix, kind) VALUES (77, 0, 'dftach')",
            "quarantine.kind of row 77 is 'dftach', which the broker never writes",
        ),
    ],
    ids=["text-not-utf8", "blob-for-integer", "text-for-integer", "text-for-real", "pid", "kind"],
)
def test_a_damaged_value_is_refused_not_served(tmp_path: Path, sql: str, message: str) -> None:
    """One flipped bit in a row's text or in its record header (which says each value's
    type) passes integrity_check, and the allocations' digest covers allocations only:
    found by flipping bits of a real store; so does a valid value changed in a set's
    row (a holder's pid), which the sets' digest catches. Before, such a value crashed
    the start with a traceback (exit 1, restarted by systemd in a loop, nothing copied
    aside), or was served (a quota of 'many'). Now it is corruption: refused in one
    line, kept aside."""
    db = tmp_path / "b.db"
    _wal_store(db)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute(sql)
    con.close()
    before = sha(db)
    r = run_broker_once("--db", str(db), "--socket", str(tmp_path / "s.sock"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("pasid-broker: cannot start:")]
    assert len(lines) == 1, r.stderr
    assert message in lines[0], lines[0]
    assert 'see docs/runbook.md, section "Corruption"' in lines[0]
    assert sha(db) == before
    (kept,) = tmp_path.glob("b.db.corrupt-*")
    assert sha(kept / "b.db") == before


@root_only
def test_read_only_file_refused_at_start(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    _wal_store(db)
    before = sha(db)
    # Root ignores file modes; the immutable attribute binds root too.
    subprocess.run(["chattr", "+i", str(db)], check=True)
    try:
        r = run_broker_once("--db", str(db), "--socket", str(tmp_path / "s.sock"))
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    assert r.returncode == 2, r.stderr
    assert "SQLITE_READONLY: the file cannot be opened for writing" in r.stderr
    assert sha(db) == before


# -- while serving ------------------------------------------------------------------------


def _expect_store_unavailable(exc: Unavailable, code_name: str) -> None:
    assert exc.code == grpc.StatusCode.UNAVAILABLE
    assert exc.reason == "STORE", exc
    assert exc.message.startswith(f"store commit failed: {code_name}"), exc.message


@root_only
def test_disk_full_then_recovers() -> None:
    """A full disk: every change is refused (SQLITE_FULL, nothing changed), readiness
    turns NOT_SERVING (a broker that can change nothing must not be sent VMMs) while
    liveness and reads answer, and for longer than --store-error-exit-seconds (a full
    disk is waited for, never a reason to exit). Room again: the broker's own probe write
    lands, readiness is SERVING again without any request, and the reclaim of a session
    that ended meanwhile lands (retried every second). pasid_broker_ready, scraped over
    HTTP, says what readiness says throughout (its alert is PasidBrokerNotReady)."""
    with tmpfs(1024) as fs:
        b = BrokerProcess(
            "--restart-grace", "1", "--store-error-exit-seconds", "1", workdir=str(fs)
        )
        try:
            b.start()
            assert _metric(b, "pasid_broker_ready") == 1
            with Client(b.address) as c:
                keep = c.session("keeper", grace_seconds=60)
                kept = keep.alloc(1, 1000, 10)
                doomed = c.session("doomed")
                doomed.alloc(2000, 3000, 5)
                holder, held = spawn_holder(b, 3)  # a verified holder, grace 0
                filler = fill(fs)
                with pytest.raises(Unavailable) as ei:
                    for _ in range(200):  # the WAL grows until the disk refuses
                        keep.alloc(10_000, 1 << 19, 500)
                _expect_store_unavailable(ei.value, "SQLITE_FULL")
                wait_until(lambda: b.health() == "NOT_SERVING", 10, 0.05, "NOT_SERVING")
                assert b.health("liveness") == "SERVING"
                assert b.health(SERVICE_NAME) == "NOT_SERVING"
                assert _metric(b, "pasid_broker_store_failing_seconds") > 0
                assert _metric(b, "pasid_broker_ready") == 0
                state = assert_memory_matches_disk(b)
                assert state[keep.session_id][:10] == kept
                # A session's end cannot be committed either: its set stays, detached,
                # and the broker retries the reclaim every second. The close returns at
                # once: the broker took the release (it answered the half-close), and
                # its stream ended STORE, not because the broker went away.
                t0 = time.monotonic()
                doomed.close()
                assert not doomed.kept and time.monotonic() - t0 < 30
                # A holder dies: its release cannot land either, and is retried too.
                holder.send_signal(signal.SIGKILL)
                holder.wait(10)
                time.sleep(1.5)
                state = assert_memory_matches_disk(b)
                assert {doomed.session_id, held["session_id"]} <= set(state), state
                assert b.proc is not None and b.proc.poll() is None  # past the exit time
                assert b.health() == "NOT_SERVING"
                assert _metric(b, "pasid_broker_ready") == 0
                filler.unlink()
                wait_until(lambda: b.health() == "SERVING", 10, 0.05, "SERVING again")
                wait_until(
                    lambda: not {doomed.session_id, held["session_id"]} & set(db_holdings(b.db)),
                    10,
                    0.1,
                    "reclaim retries",
                )
                assert _metric(b, "pasid_broker_store_failing_seconds") == 0
                assert b.health() == "SERVING"
                assert _metric(b, "pasid_broker_ready") == 1
                assert keep.alloc(1, 1000, 1) == [11]
                state = assert_memory_matches_disk(b)
                assert set(state) == {keep.session_id}
                keep.close()
        finally:
            b.cleanup()


def test_another_process_cannot_take_the_database_while_the_broker_runs() -> None:
    """Exclusive locking (issue 22: no -shm mapping to fault with SIGBUS on a full disk):
    the broker holds the file from its start, so another process (`sqlite3` by hand, an
    old-style backup) gets SQLITE_BUSY at once, and the broker serves on, unaffected, and
    makes no -shm file. A backup goes through the broker (tests/deploy/test_backup.py)."""
    b = BrokerProcess()
    try:
        b.start()
        with Client(b.address) as c, c.session("vm") as s:
            assert s.alloc(1, 100, 2) == [1, 2]
            other = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sqlite3\n"
                    f"c = sqlite3.connect({b.db!r}, timeout=0, isolation_level=None)\n"
                    "c.execute('SELECT count(*) FROM allocations').fetchall()\n",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert other.returncode != 0
            assert "database is locked" in other.stderr, other.stderr
            assert s.alloc(1, 100, 1) == [3]
            assert b.health() == "SERVING"
            assert not Path(f"{b.db}-shm").exists()
            assert assert_memory_matches_disk(b) == {s.session_id: [1, 2, 3]}
    finally:
        b.cleanup()


@root_only
def test_read_only_files_while_serving() -> None:
    b = BrokerProcess()
    try:
        b.start()
        with Client(b.address) as c, c.session("vm") as s:
            assert s.alloc(1, 100, 2) == [1, 2]
            files = [b.db, b.db + "-wal"]
            subprocess.run(["chattr", "+i", *files], check=True)
            try:
                with pytest.raises(Unavailable) as ei:
                    s.alloc(1, 100, 1)
                assert ei.value.reason == "STORE"
                assert ei.value.message.startswith("store commit failed: SQLITE_"), ei.value
                wait_until(lambda: b.health() == "NOT_SERVING", 10, 0.05, "NOT_SERVING")
                assert b.health("liveness") == "SERVING"
                assert list(s.list().pasids()) == [1, 2]
            finally:
                subprocess.run(["chattr", "-i", *files], check=True)
            # Writable again before --store-error-exit-seconds (30 s by default): the
            # probe write lands, and readiness is back without any request.
            wait_until(lambda: b.health() == "SERVING", 10, 0.05, "SERVING again")
            assert s.alloc(1, 100, 1) == [3]
            assert assert_memory_matches_disk(b) == {s.session_id: [1, 2, 3]}
    finally:
        b.cleanup()


@contextlib.contextmanager
def backend_failing_on(trigger: Path, fault: str) -> Iterator[BrokerProcess]:
    """A started broker whose backend fails while the file `trigger` exists (its text,
    if any, says from which call on): `fault` is the test-only knob that watches it
    (tests/faults/). Cleaned up after."""
    b = BrokerProcess(env={FAULTS: f"{fault}={trigger}"})
    try:
        b.start()
        yield b
    finally:
        b.cleanup()


def withhold_three(c: Client, trigger: Path) -> None:
    """A set of PASIDs 1-3 ends while the backend's free fails: they are withheld."""
    with c.session("vm") as s:
        assert s.alloc(1, 100, 3) == [1, 2, 3]
        trigger.write_text("")
    # The session's end destroyed the set; its free failed in the backend.
    wait_until(lambda: c.info().quarantined == 3, 10, what="the PASIDs withheld")


def withheld_until_the_retried_free(c: Client, t: Session, trigger: Path) -> None:
    """PASIDs 1-3 withheld: never given to `t` while the backend's free (retried every
    second) fails; given once it succeeds, so really released in the backend."""
    assert t.alloc(1, 100, 1) == [4]  # never 1-3 meanwhile
    time.sleep(2.5)  # retried (every second), still failing
    assert c.info().quarantined == 3
    trigger.unlink()
    wait_until(lambda: c.info().quarantined == 0, 10, what="the retried free")
    assert t.alloc(1, 100, 3) == [1, 2, 3]  # really released in the backend


def test_backend_error_mid_request_changes_nothing(tmp_path: Path) -> None:
    trigger = tmp_path / "backend-fails"
    with (
        backend_failing_on(trigger, "backend_fail_file") as b,
        Client(b.address) as c,
        c.session("vm") as s,
    ):
        assert s.alloc(1, 100, 2) == [1, 2]
        before = assert_memory_matches_disk(b)
        trigger.write_text("2")  # the 3rd and later backend calls fail
        with pytest.raises(Unavailable) as ei:
            s.alloc(1, 100, 4)
        assert ei.value.reason == "BACKEND"
        assert "alloc [5, 5] failed: EIO (injected)" in ei.value.message, ei.value
        assert assert_memory_matches_disk(b) == before
        assert b.health() == "SERVING"
        trigger.unlink()
        # The same lowest PASIDs again: the two the backend had given were given back.
        assert s.alloc(1, 100, 4) == [3, 4, 5, 6]
        assert assert_memory_matches_disk(b) == {s.session_id: [1, 2, 3, 4, 5, 6]}


def test_backend_error_on_free_changes_nothing(tmp_path: Path) -> None:
    trigger = tmp_path / "backend-free-fails"
    with (
        backend_failing_on(trigger, "backend_free_fail_file") as b,
        Client(b.address) as c,
        c.session("vm") as s,
    ):
        assert s.alloc(1, 100, 5) == [1, 2, 3, 4, 5]
        assert s.free(2, 2) == 1
        before = assert_memory_matches_disk(b)
        trigger.write_text("1")  # runs [1, 1] then [3, 5]: the second fails
        with pytest.raises(Unavailable) as ei:
            s.free(1, 5)
        assert ei.value.reason == "BACKEND"
        assert "free [3, 5] failed: EIO (injected)" in ei.value.message, ei.value
        assert assert_memory_matches_disk(b) == before  # [1] was taken back
        assert b.health() == "SERVING"
        assert s.alloc(1, 100, 1) == [2]  # the allocator and the backend agree
        trigger.unlink()
        assert s.free(1, 5) == 5
        assert s.alloc(1, 100, 2) == [1, 2]  # really released in the backend
        assert assert_memory_matches_disk(b) == {s.session_id: [1, 2]}


def test_backend_error_on_free_at_a_sets_end_withholds_the_pasids(tmp_path: Path) -> None:
    """Issue 22, point 7: a kernel call that frees a number fails when a set ends. The
    set goes (it must), but its PASIDs stay out of the pool, counted as quarantined,
    until a retried free succeeds: never handed out while the kernel still holds them."""
    trigger = tmp_path / "backend-free-fails"
    with backend_failing_on(trigger, "backend_free_fail_file") as b, Client(b.address) as c:
        withhold_three(c, trigger)
        assert c.info().in_use == 0
        assert "the backend's free failed for 3 PASIDs" in b.read_log()
        with c.session("next") as t:
            withheld_until_the_retried_free(c, t, trigger)
        assert b.health() == "SERVING"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_pasids_withheld_at_a_sets_end_stay_withheld_across_a_restart(
    tmp_path: Path, sig: int
) -> None:
    """The withheld PASIDs are stored (issue 22, point 7): a broker killed with -9, or
    stopped by SIGTERM, comes back with them still out of the pool, and retries the
    kernel call that failed (the backend holds them again: replayed at recovery)."""
    trigger = tmp_path / "backend-free-fails"
    with backend_failing_on(trigger, "backend_free_fail_file") as b:
        with Client(b.address) as c:
            withhold_three(c, trigger)
        with open_db(b.db) as db:  # what the restart will find
            rows = db.execute("SELECT pasid, kind FROM quarantine ORDER BY pasid").fetchall()
        assert rows == [(1, "free"), (2, "free"), (3, "free")]
        b.kill(sig)
        b.start()
        assert "withheld PASIDs restored" in b.read_log()
        with Client(b.address) as c, c.session("next") as t:
            assert (c.info().in_use, c.info().quarantined) == (0, 3)
            withheld_until_the_retried_free(c, t, trigger)
        with open_db(b.db) as db:  # the release is stored: a third start keeps nothing
            assert db.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)
