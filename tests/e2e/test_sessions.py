"""Sessions against a real broker process: round trips, isolation, set-destroy-on-exit."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pasid_client import AsyncClient, Client, NotFound

from tests.harness import ROOT, BrokerProcess, open_db, wait_until


def spawn_holder(
    b: BrokerProcess, count: int, grace: int = 0, loops: int = 0
) -> tuple[subprocess.Popen[str], dict[str, object]]:
    p = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.holder", b.address, str(count), str(grace), str(loops)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"holder died: {p.wait()}"
    return p, json.loads(line)


def test_alloc_free_list_round_trip(client: Client) -> None:
    with client.session("vm1") as s:
        assert s.pasid_bits == 20 and s.quota == 1000
        assert s.alloc(1, 100) == [1]
        assert s.alloc(1, 100, count=3) == [2, 3, 4]
        assert s.list().ranges == ((1, 4),)
        assert s.free(2, 3) == 2
        assert s.list().ranges == ((1, 1), (4, 4))
        assert s.alloc(1, 100) == [2]  # lowest free again
        info = client.info()
        assert (info.in_use, info.sessions) == (3, 1)
        assert s.free() == 3  # [0, 2^32-1]: all it holds
        assert client.info().in_use == 0


def test_unary_calls_act_on_a_session_held_elsewhere(client: Client) -> None:
    with client.session("vm1") as s:
        got = client.alloc(s.session_id, s.token, 10, 20, count=2)
        assert got == [10, 11]
        assert list(s.list().pasids()) == [10, 11]
        assert client.free(s.session_id, s.token, 11, 11) == 1
        assert client.list_session(s.session_id, s.token).ranges == ((10, 10),)
        with pytest.raises(NotFound):
            client.alloc(s.session_id, "not-the-token", 1, 5)
        assert client.list_session(s.session_id, s.token).count == 1
    with pytest.raises(NotFound):  # the session ended with its stream
        client.alloc(s.session_id, s.token, 1, 5)


def test_closing_a_session_frees_its_set(client: Client, admin: Client) -> None:
    with client.session("vm1") as s:
        s.alloc(1, 1000, count=50)
        assert client.info().in_use == 50
    wait_until(lambda: client.info().in_use == 0, 5, what="set destroyed on close")
    assert admin.list_sets() == []


def test_async_client_pipelines_in_order(broker: BrokerProcess) -> None:
    async def run() -> None:
        async with AsyncClient(broker.address) as c:
            async with c.session("vmm") as s:
                results = await asyncio.gather(*(s.alloc(1, 10_000) for _ in range(200)))
                flat = sorted(p for r in results for p in r)
                assert flat == list(range(1, 201))
                # answered in request order: each reply is the lowest free at its turn
                assert [r[0] for r in results] == list(range(1, 201))
                assert await s.free(1, 100) == 100
                assert (await s.list()).count == 100
            info = await c.info()
            assert info.in_use == 0

    asyncio.run(run())


def test_two_sessions_never_share_a_pasid(broker: BrokerProcess) -> None:
    """Client processes racing alloc/free against one broker: every PASID they ever saw
    at the same time was distinct, and their final holdings are disjoint."""
    procs = [spawn_holder(broker, 40, loops=60) for _ in range(4)]
    try:
        held = [set(info["pasids"]) for _, info in procs]  # type: ignore[arg-type]
        for i in range(len(held)):
            for j in range(i + 1, len(held)):
                assert not held[i] & held[j]
        with Client(broker.address) as c, Client(broker.admin_address) as a:
            sets = a.list_sets()
            assert sorted(len(list(s.pasids())) for s in sets) == [40] * 4
            every = [p for s in sets for p in s.pasids()]
            assert len(every) == len(set(every)) == c.info().in_use
    finally:
        for p, _ in procs:
            p.kill()
            p.wait()


def test_sigkilled_client_pasids_are_released(broker: BrokerProcess, admin: Client) -> None:
    proc, info = spawn_holder(broker, 25)
    with Client(broker.address) as c:
        assert c.info().in_use == 25
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_until(lambda: c.info().in_use == 0, 5, what="release after SIGKILL")
        assert admin.list_sets() == []
        with c.session("next") as s:  # the freed PASIDs are handed out again
            assert s.alloc(1, 100, count=25) == info["pasids"]


def test_detached_session_survives_its_stream_and_resumes(client: Client, admin: Client) -> None:
    # Its stream breaks (a cancel; close() would release it) while its holder lives.
    s = client.session("vmm", grace_seconds=30)
    got = s.alloc(1, 100, count=3)
    token = s.token
    s.detach()
    assert client.info().in_use == 3
    [view] = admin.list_sets()
    assert view.state == "detached"
    with client.session(resume_token=token) as again:
        assert again.resumed and again.session_id == s.session_id
        assert list(again.list().pasids()) == got
        again.free()


def test_acknowledged_alloc_survives_kill_9_of_the_broker(make_broker: object) -> None:
    b: BrokerProcess = make_broker("--restart-grace", "30")  # type: ignore[operator]
    proc, info = spawn_holder(b, 7, grace=60)
    try:
        b.kill(signal.SIGKILL)
        b.start()
        with Client(b.address) as c:
            assert c.info().in_use == 7
            with c.session(resume_token=str(info["token"])) as s:
                assert list(s.list().pasids()) == info["pasids"]
                # and nobody else can get them
                with c.session("other") as o:
                    assert not set(o.alloc(1, 20, count=7)) & set(info["pasids"])  # type: ignore[arg-type]
    finally:
        proc.kill()
        proc.wait()


def test_sets_of_dead_clients_are_reclaimed_at_restart(make_broker: object) -> None:
    b: BrokerProcess = make_broker("--restart-grace", "60")  # type: ignore[operator]
    proc, _ = spawn_holder(b, 5, grace=60)
    b.kill(signal.SIGKILL)
    proc.kill()
    proc.wait()
    b.start()
    with Client(b.address) as c:
        wait_until(lambda: c.info().in_use == 0, 5, what="dead client's set reclaimed")


def test_db_file_is_real_sqlite(broker: BrokerProcess, client: Client) -> None:

    with client.session("vm") as s:
        got = s.alloc(1, 10, count=2)
        with open_db(broker.db) as con:  # a copy made by the broker: it holds the file
            rows = con.execute("SELECT pasid FROM allocations ORDER BY pasid").fetchall()
        assert [r[0] for r in rows] == got
    assert Path(broker.db).exists()


def test_quarantined_pasid_is_not_reissued_and_is_counted(make_broker: object) -> None:
    b = make_broker("--quarantine-allocs", "2")  # type: ignore[operator]
    with Client(b.address) as c, c.session("vm1") as s, c.session("vm2") as t:
        assert s.alloc(1, 100) == [1]
        assert s.free(1, 1) == 1
        info = c.info()
        assert (info.in_use, info.quarantined) == (0, 1)
        assert t.alloc(1, 100, count=2) == [2, 3]  # 1 is held back for 2 allocs
        assert t.alloc(1, 100) == [1]
        assert c.info().quarantined == 0
