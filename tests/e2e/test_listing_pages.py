"""Listings page (issue 21): `pasidctl sets` and `list --all` with a million PASIDs in
fragmented sets, where one reply would be over gRPC's 4 MiB receive limit; and the pages
themselves, small, against a real broker: a set split across pages is joined back, in
set_id order, and a token the broker did not make is INVALID_ARGUMENT."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client
from pasid_client.handshake import ticket_for

from broker.store import AddPasids, CreateSet, SetRow, SqliteStore
from tests.harness import ROOT, BrokerProcess

SETS = 1000
PER_SET = 1000  # every other PASID: each a range of its own


def _pasids(i: int) -> range:
    """Set i's PASIDs: every other one of its own block (PASID 0 stays reserved)."""
    base = i * 2 * PER_SET
    return range(base, base + 2 * PER_SET, 2)


@pytest.fixture
def big_broker() -> Iterator[BrokerProcess]:
    """A broker recovering a million PASIDs in SETS fragmented sets. The state is written
    straight into its store (as test_lifecycle builds big states), then recovered by
    the broker like any other: the listing, not the allocation path, is under test. A
    live declared holder (a sleeper) and the grace keep every set through the start."""
    b = BrokerProcess(
        "--backend", "simulator", "--pasid-bits", "21", "--restart-grace", "600",
        "--quota-per-set", str(PER_SET),
    )  # fmt: skip
    sleeper = subprocess.Popen(["sleep", "900"])
    try:
        st = SqliteStore(b.db)
        st.open()
        for i in range(1, SETS + 1):
            row = SetRow(i, f"vm{i}", sleeper.pid, PER_SET, 600, f"{i:064x}", 0.0)
            st.commit([CreateSet(row), AddPasids(i, tuple(_pasids(i)))])
        st.close()
        b.start(timeout=300)
        yield b
    finally:
        b.cleanup()
        sleeper.kill()
        sleeper.wait()


def _as_admin(b: BrokerProcess) -> tuple[tuple[str, str]]:
    """A raw call's admin identity: a fresh one-time peer ticket (the tests run as root)."""
    t = ticket_for(b.address)
    assert t is not None, "no peer socket beside the broker's"
    return (("pasid-ticket", t.ticket),)


def _pasidctl(b: BrokerProcess, *args: str) -> dict[str, list[dict[str, object]]]:
    r = subprocess.run(
        [sys.executable, "-m", "pasid_client.cli", *args, "--socket", b.socket, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.backend_pinned  # big_broker runs --backend simulator (21 bits)
def test_sets_and_list_all_with_a_million_fragmented_pasids(big_broker: BrokerProcess) -> None:
    b = big_broker
    # The premise: as one reply, the listing is over what a client accepts by default.
    with grpc.insecure_channel(b.admin_address) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.PasidAdminStub(ch).ListSets(
                pb.ListSetsRequest(with_ranges=True), metadata=_as_admin(b)
            )
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.value
    for args in (("sets",), ("list", "--all")):
        t0 = time.perf_counter()
        got = _pasidctl(b, *args)
        took = time.perf_counter() - t0
        sets = got["sets"]
        print(f"\npasidctl {' '.join(args)} --json: {len(sets)} sets in {took:.1f} s")
        assert [s["set_id"] for s in sets] == list(range(1, SETS + 1))
        ranges = 0
        for s in sets:
            i = int(s["set_id"])  # type: ignore[call-overload]
            assert s["count"] == PER_SET
            assert s["ranges"] == [[p, p] for p in _pasids(i)], i
            ranges += len(s["ranges"])  # type: ignore[arg-type]
        assert ranges == SETS * PER_SET
        # The JSON keeps its shape: one object per set, ranges as [min, max] pairs.
        assert set(sets[0]) >= {"set_id", "client", "count", "ranges", "state"}


def test_pages_split_a_set_and_join_back(broker: BrokerProcess) -> None:
    """Small pages over a real broker: each page at most page_size entries, one set's
    ranges carried over to the next page under the same set_id, every PASID once."""
    with Client(broker.address) as c, c.session("a") as a, c.session("b") as bb:
        for p in range(10, 60, 2):  # 25 ranges of one PASID each
            a.alloc(p, p)
        bb.alloc(100, 104, count=5)  # one range
        want = {a.set_id: [(p, p) for p in range(10, 60, 2)], bb.set_id: [(100, 104)]}
        with grpc.insecure_channel(broker.admin_address) as ch:
            stub = pb_grpc.PasidAdminStub(ch)
            token, pages = "", []
            while True:
                req = pb.ListSetsRequest(with_ranges=True, page_size=7, page_token=token)
                page = stub.ListSets(req, metadata=_as_admin(broker))
                assert sum(1 + len(s.ranges) for s in page.sets) <= 7
                pages.append(page)
                token = page.next_page_token
                if not token:
                    break
            assert len(pages) >= 4
            ids = [s.set_id for p in pages for s in p.sets]
            assert ids == sorted(ids) and set(ids) == set(want)
            for sid, ranges in want.items():
                got = [
                    (r.min, r.max) for p in pages for s in p.sets if s.set_id == sid
                    for r in s.ranges
                ]  # fmt: skip
                assert got == ranges
            with pytest.raises(grpc.RpcError) as exc:
                stub.ListSets(
                    pb.ListSetsRequest(page_size=7, page_token="nonsense"),
                    metadata=_as_admin(broker),
                )
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The client library follows the pages, whatever their size, and joins the set.
        with Client(broker.admin_address) as adm:
            views = {v.set_id: v for v in adm.list_sets()}
        assert {k: list(v.ranges) for k, v in views.items()} == want
        assert list(a.list().ranges) == want[a.set_id]
