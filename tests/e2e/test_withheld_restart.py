"""A contested PASID whose backend free fails at its set's end (issue 22, points 2 and 7),
on a real broker (simulator backend behind the test launcher's failing free,
tests/faults): the free is retried, and its stored row keeps both the wait and the
witness's claim, so that neither the retry nor a restart puts it back in the pool while
the witness's set lives; once that set is gone it goes back, and the backend agrees.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from pasid_client import Client, ResourceExhausted

from tests.e2e.test_witness import _pasids, _restored, witnessed_resume
from tests.harness import open_db, wait_until


@pytest.mark.parametrize("restart", [None, signal.SIGKILL], ids=["running", "kill9"])
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
