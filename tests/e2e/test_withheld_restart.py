"""Withheld PASIDs across restarts, on a real broker (issue 22, points 2 and 7).

- A contested PASID whose backend free fails at its set's end (simulator backend behind
  the test launcher's failing free, tests/faults): the free is retried, and its stored
  row keeps both the wait and the witness's claim, so that neither the retry nor a
  restart puts it back in the pool while the witness's set lives; once that set is gone
  it goes back, and the backend agrees.
- A failed DETACH the broker cannot prove over (no device recorded): withheld until the
  operator releases it (`pasid-broker withheld`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pasid_client import Client, ResourceExhausted, WithheldView

from broker.store import SqliteStore, Withhold
from tests.e2e.test_witness import _pasids, _restored, witnessed_resume
from tests.harness import LAUNCHER, ROOT, BrokerProcess, open_db, wait_until


@pytest.mark.parametrize(
    "restart", [None, signal.SIGKILL, signal.SIGTERM], ids=["running", "kill9", "sigterm"]
)
def test_a_contested_pasid_whose_free_fails_stays_claimed(
    tmp_path: Path, restart: signal.Signals | None
) -> None:
    fail = tmp_path / "free-fails"
    env = {"PASID_BROKER_TEST_FAULTS": f"backend_free_fail_file={fail}"}
    b, ledger, token, set_a = _restored(tmp_path, "2", env)
    holder = Client(b.address)  # not closed before a restart: that would end its set
    try:
        other = holder.session("vm-b", grace_seconds=300)
        other_id = other.set_id
        assert other.alloc(1, 100, count=2) == [5, 6]  # lost by the store: "free"
        with Client(b.address) as c, Client(b.admin_address) as admin:
            opened, _q, call = witnessed_resume(c, token, sorted(ledger.held[set_a]))
            assert _pasids(opened.conflicts) == [5, 6]
            call.cancel()  # the witness's set lives on, detached (test_witness.py)
            fail.write_text("")  # every backend free fails from now on
            assert admin.revoke(other_id, "test") == 2  # 5, 6: contested, free failed
            assert c.info().quarantined == 2
            assert admin.list_withheld() == [
                WithheldView(p, "free", other_id, claimant=set_a) for p in (5, 6)
            ]
        if restart is not None:
            b.kill(restart)
            with open_db(b.db) as con:
                rows = con.execute(
                    "SELECT pasid, kind, set_id, claimant FROM quarantine ORDER BY pasid"
                ).fetchall()
            # The wait (the backend's free, of the gone set) and the claim, both.
            assert rows == [(5, "free", other_id, set_a), (6, "free", other_id, set_a)]
            b.start()
        with Client(b.address) as c, Client(b.admin_address) as admin:
            third = c.session("vm-c")
            fail.unlink()  # the retried free lands now
            wait_until(lambda: "withheld PASIDs released" in b.read_log(), what="retry")
            assert c.info().quarantined == 2  # freed in the backend, still claimed
            with pytest.raises(ResourceExhausted):
                third.alloc(5, 6)
            # The witness's set ends: nobody claims them; back in the pool, and the
            # backend gives them too (its free really happened).
            assert admin.revoke(set_a, "test") == 6
            wait_until(lambda: c.info().quarantined == 0, what="the contest's end")
            assert third.alloc(5, 6, count=2) == [5, 6]
    finally:
        holder.close()
        b.cleanup()


def _pasidctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pasid_client.cli", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def _withheld_cli(b: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", LAUNCHER, "withheld", "--db", b.db, "--socket", b.socket, *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def test_a_detach_without_proof_stays_withheld_until_the_operator_releases_it(
    tmp_path: Path,
) -> None:
    """A stored "detach" row that names no device (written before migration 0010, or by
    an iommufd broker restarted on another backend) cannot be proven free by this
    broker: it stays withheld across restarts, says why at ERROR, and goes back only
    when the operator releases it with `pasid-broker withheld --release` (refused while
    the broker runs: it holds the PASID in memory and the file exclusively)."""
    b = BrokerProcess()
    st = SqliteStore(b.db)
    st.open()
    st.commit([Withhold((7,), "detach", 9, None, None)])  # no holder, no devices
    st.close()
    try:
        b.start()
        with Client(b.address) as c, c.session("vm") as s:
            assert c.info().quarantined == 1
            time.sleep(2.5)  # retried every second: no proof comes
            assert c.info().quarantined == 1
            with pytest.raises(ResourceExhausted):
                s.alloc(7, 7)
        assert "PASIDs stay withheld" in b.read_log()
        # While it runs, the operator sees it and why (PasidAdmin.ListWithheld).
        ctl = _pasidctl("withheld", "--socket", b.socket, "--json")
        assert ctl.returncode == 0, ctl.stderr
        assert json.loads(ctl.stdout)["withheld"] == [
            {"pasid": 7, "kind": "detach", "set_id": 9, "holder_pid": 0, "claimant": 0,
             "devices": []}
        ]  # fmt: skip
        ctl = _pasidctl("withheld", "--socket", b.socket)
        assert "devices not recorded" in ctl.stdout, ctl
        running = _withheld_cli(b)
        assert running.returncode == 1 and "stop the broker first" in running.stderr, running
        assert b.stop() == 0
        listed = _withheld_cli(b)
        assert listed.returncode == 0, listed.stderr
        assert "7 detach: DETACH failed at set 9's end" in listed.stdout
        assert "devices not recorded" in listed.stdout
        bad = _withheld_cli(b, "--release", "8")
        assert bad.returncode == 1 and "not withheld" in bad.stderr, bad
        done = _withheld_cli(b, "--release", "7")
        assert done.returncode == 0 and "released 1" in done.stdout, done
        b.start()
        with Client(b.address) as c, c.session("vm") as s:
            assert c.info().quarantined == 0
            assert s.alloc(7, 7) == [7]
    finally:
        b.cleanup()
