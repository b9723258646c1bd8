"""Corruption is refused or reported, never served (issue 22, point 3), on real files.

A real broker process makes the database: clients allocate and free through it (every
acknowledgement in a Ledger), then it is killed with SIGKILL, so that the WAL holds
acknowledged changes the main file does not have yet. Each test damages a copy of those
files as the issue's reporter did and starts a broker on it:

- the untouched copy serves every acknowledged PASID, none twice (the control);
- a row whose set_id was edited, a WAL cut in half, one flipped bit in the WAL, a deleted
  WAL, a deleted database: exit 2 with one line naming the runbook's section, the files
  as found copied aside byte for byte, the originals untouched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from pasid_client import Client

from broker.store import writer
from tests.faults.ledger import Ledger
from tests.harness import BrokerProcess, api_holdings, db_holdings, run_broker_once, wait_until

FILES = ("broker.db", "broker.db-wal", "broker.db-shm", "broker.db.revision")
WAL_HEADER = 32
FRAME_HEADER = 24
# The module's tests share `crashed` (one per backend): one worker (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("store-corruption")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _main_file_count(d: Path) -> int:
    """Allocation rows in the main file alone, as if the WAL were gone."""
    alone = d / "alone"
    alone.mkdir(exist_ok=True)
    shutil.copy(d / "broker.db", alone / "x.db")
    con = sqlite3.connect(alone / "x.db")
    try:
        return int(con.execute("SELECT COUNT(*) FROM allocations").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        con.close()
        shutil.rmtree(alone)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory, e2e_backend: str) -> tuple[Path, Ledger]:
    """The files of a real broker SIGKILLed with acknowledged changes in its WAL only (on
    each backend: made again for each, tests/e2e/conftest.py)."""
    for _attempt in range(4):
        b = BrokerProcess("--restart-grace", "120")
        ledger = Ledger()
        try:
            b.start()
            with Client(b.address) as c:
                sessions = [c.session(f"vm{i}", grace_seconds=120) for i in range(3)]
                for r in range(60):
                    for s in sessions:
                        got = ledger.alloc(s, 1, 4000, count=4)
                        if r % 3 == 2:
                            ledger.free(s, got[0], got[1])
                b.kill(signal.SIGKILL)
                for s in sessions:
                    s.detach()  # gone without a release: the crashed files keep the sets
            total = sum(len(v) for v in ledger.held.values())
            if _main_file_count(b.dir) < total:  # the checkpoint timer did not catch up
                out = tmp_path_factory.mktemp("crashed")
                for name in FILES:
                    if (b.dir / name).exists():
                        shutil.copy2(b.dir / name, out / name)
                return out, ledger
        finally:
            b.cleanup()
    pytest.fail("every attempt's WAL was checkpointed before the kill")


def _copy(crashed: Path, tmp_path: Path) -> Path:
    d = tmp_path / "db"
    d.mkdir()
    for name in FILES:
        if (crashed / name).exists():
            shutil.copy2(crashed / name, d / name)
    return d


def _refused(d: Path, what: str) -> None:
    """Exit 2, one line naming the runbook; the files as found kept aside, untouched."""
    before = {n: _sha(d / n) for n in FILES if (d / n).exists() and n != "broker.db-shm"}
    r = run_broker_once("--db", str(d / "broker.db"), "--socket", str(d / "s.sock"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("pasid-broker: cannot start:")]
    assert len(lines) == 1, r.stderr
    assert what in lines[0], lines[0]
    assert 'see docs/runbook.md, section "Corruption"' in lines[0]
    print(lines[0])
    after = {n: _sha(d / n) for n in before}
    assert after == before, "the original files were changed"
    (kept,) = d.glob("broker.db.corrupt-*")
    assert str(kept) in lines[0]
    assert {n: _sha(kept / n) for n in before} == before
    # Refused again (a supervisor's restart): no second copy.
    r2 = run_broker_once("--db", str(d / "broker.db"), "--socket", str(d / "s.sock"))
    assert r2.returncode == 2
    assert len(list(d.glob("broker.db.corrupt-*"))) == 1


def test_untouched_copy_serves_every_ack(crashed: tuple[Path, Ledger], tmp_path: Path) -> None:
    files, ledger = crashed
    d = _copy(files, tmp_path)
    ledger.audit(db_holdings(d / "broker.db")).assert_clean()
    b = BrokerProcess("--restart-grace", "120", workdir=str(d))
    try:
        b.start()
        audit = ledger.audit(api_holdings(b.address))
        audit.assert_clean()
        print(f"{audit.acknowledged} acks, 0 lost, 0 held twice")
    finally:
        b.stop()
        b.cleanup()


def _edit_set_id(d: Path) -> None:
    con = sqlite3.connect(d / "broker.db")
    (pasid, set_id) = con.execute("SELECT pasid, set_id FROM allocations LIMIT 1").fetchone()
    (other,) = con.execute("SELECT MAX(set_id) FROM sets WHERE set_id != ?", (set_id,)).fetchone()
    con.execute("UPDATE allocations SET set_id = ? WHERE pasid = ?", (other, pasid))
    con.commit()
    con.close()


def _live_frames(data: bytes) -> int:
    """Frames of the WAL's current log: the leading ones that carry its header's salts.
    The file is kept at its size when the log restarts after a checkpoint
    (opening.WAL_BYTES), so frames of an older log may follow them, which SQLite ignores:
    damage must land in the live ones to be damage at all."""
    page = int.from_bytes(data[8:12], "big")
    salts = data[16:24]
    n = 0
    while (at := WAL_HEADER + n * (FRAME_HEADER + page)) + FRAME_HEADER + page <= len(data):
        if data[at + 8 : at + 16] != salts:
            break
        n += 1
    return n


def _cut_wal(d: Path) -> None:
    wal = d / "broker.db-wal"
    data = wal.read_bytes()
    page = int.from_bytes(data[8:12], "big")
    os.truncate(wal, WAL_HEADER + (_live_frames(data) // 2) * (FRAME_HEADER + page))


def _flip_wal_bit(d: Path) -> None:
    wal = d / "broker.db-wal"
    data = bytearray(wal.read_bytes())
    page = int.from_bytes(data[8:12], "big")
    frames = _live_frames(data)
    at = WAL_HEADER + (frames // 3) * (FRAME_HEADER + page) + FRAME_HEADER + 100
    data[at] ^= 0x10
    wal.write_bytes(bytes(data))


def _delete(name: str) -> Callable[[Path], None]:
    def delete(d: Path) -> None:
        (d / name).unlink()
        (d / "broker.db-shm").unlink(missing_ok=True)

    return delete


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (_edit_set_id, "the allocations do not match their digest"),
        (_cut_wal, "logged changes are missing"),
        (_flip_wal_bit, "logged changes are missing"),
        (_delete("broker.db-wal"), "logged changes are missing"),
        (_delete("broker.db"), "does not exist, but its witness .revision says revision"),
    ],
    ids=["set-id-edited", "wal-cut-in-half", "wal-bit-flipped", "wal-deleted", "db-deleted"],
)
def test_damaged_copy_is_refused(
    crashed: tuple[Path, Ledger], tmp_path: Path, damage: Callable[[Path], None], what: str
) -> None:
    d = _copy(crashed[0], tmp_path)
    damage(d)
    _refused(d, what)


def test_the_main_file_catches_up_within_seconds() -> None:
    """Below the checkpoint size the journal's timer still copies the WAL into the main
    file (writer.CHECKPOINT_SECONDS after a commit): a WAL lost later costs at most those
    seconds. Before it, nothing was checkpointed below 4 MiB: a deleted WAL lost all."""
    b = BrokerProcess()
    try:
        b.start()
        with Client(b.address) as c, c.session("vm") as s:
            got = s.alloc(1, 1000, count=20)
            d = Path(b.dir)
            wait_until(
                lambda: _main_file_count(d) == len(got),
                timeout=writer.CHECKPOINT_SECONDS + 25,
                interval=0.2,
                what="the timer's checkpoint",
            )
    finally:
        b.stop()
        b.cleanup()
