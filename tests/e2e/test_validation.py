"""Bad input: a precise status and message, nothing lost, the daemon still serving."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import (
    Client,
    InvalidRange,
    PasidClientError,
    QuotaExceeded,
    ResourceExhausted,
    Session,
)

from tests.harness import BrokerProcess, admin_address_of

TOP = (1 << 20) - 1


def snapshot(c: Client) -> tuple[int, list[tuple[int, tuple[tuple[int, int], ...]]]]:
    """What is held, read through the admin socket beside c's."""
    with Client(admin_address_of(c.target)) as a:
        return c.info().in_use, [(s.set_id, s.ranges) for s in a.list_sets()]


@pytest.mark.parametrize(
    ("call", "exc", "code", "message"),
    [
        (lambda s: s.alloc(5, 4), InvalidRange, "INVALID_ARGUMENT", "min 5 > max 4"),
        (
            lambda s: s.alloc(1, TOP + 1),
            InvalidRange,
            "INVALID_ARGUMENT",
            "max 1048576 >= 2^20 (1048576)",
        ),
        (
            lambda s: s.alloc(TOP + 1, TOP + 1),
            InvalidRange,
            "INVALID_ARGUMENT",
            "max 1048576 >= 2^20",
        ),
        (lambda s: s.alloc(1, 10, count=0), None, None, None),  # count 0 means 1: allowed
        (lambda s: s.free(9, 8), InvalidRange, "INVALID_ARGUMENT", "min 9 > max 8"),
        (
            lambda s: s.alloc(0, 0),
            ResourceExhausted,
            "RESOURCE_EXHAUSTED",
            "no 1 free PASID in [0, 0]",
        ),  # 0 is reserved: an empty range
        (
            lambda s: s.alloc(1, 3, count=4),
            ResourceExhausted,
            "RESOURCE_EXHAUSTED",
            "no 4 free PASIDs in [1, 3]",
        ),
        (
            lambda s: s.alloc(1, TOP, count=1001),
            QuotaExceeded,
            "RESOURCE_EXHAUSTED",
            "set quota 1000 exceeded",
        ),
    ],
)
def test_bad_requests_on_the_stream(
    client: Client,
    call: Callable[[Session], object],
    exc: type[PasidClientError] | None,
    code: str | None,
    message: str | None,
) -> None:
    with client.session("vm") as s:
        s.alloc(1, 2)  # something to lose
        before = snapshot(client)
        if exc is None:
            call(s)
            return
        with pytest.raises(exc) as e:
            call(s)
        assert e.value.code.name == code
        assert message is not None and message in e.value.message
        assert snapshot(client) == before  # nothing lost, nothing gained
        assert s.alloc(1, 100) == [2]  # the same stream still serves


def test_quota_error_names_quota_and_limit(make_broker: Callable[..., BrokerProcess]) -> None:
    b = make_broker("--quota-per-set", "5", "--quota-global", "8")
    with Client(b.address) as c, c.session("a") as s1, c.session("b") as s2:
        s1.alloc(1, 100, count=5)
        with pytest.raises(QuotaExceeded) as e:
            s1.alloc(1, 100)
        assert (e.value.quota, e.value.limit) == ("set", 5)
        s2.alloc(1, 100, count=3)
        with pytest.raises(QuotaExceeded) as e:
            s2.alloc(1, 100)
        assert (e.value.quota, e.value.limit) == ("global", 8)
        assert "global quota 8 exceeded" in e.value.message


def test_bad_unary_requests_get_status_and_metadata(broker: BrokerProcess, client: Client) -> None:
    with client.session("vm") as s:
        ref = pb.SessionRef(session_id=s.session_id, token=s.token)
        with grpc.insecure_channel(broker.address) as ch:
            stub = pb_grpc.PasidBrokerStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.Alloc(pb.AllocRequest(session=ref, min=7, max=3))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details() == "min 7 > max 3"
            assert ("pasid-reason", "INVALID_RANGE") in tuple(e.value.trailing_metadata())
            with pytest.raises(grpc.RpcError) as e:
                stub.Free(pb.FreeRequest(session=pb.SessionRef(session_id=999, token="x")))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.info().in_use == 0


def test_malformed_streams(broker: BrokerProcess, client: Client) -> None:
    with grpc.insecure_channel(broker.address) as ch:
        stub = pb_grpc.PasidBrokerStub(ch)
        # the first message must be open
        resp = stub.Session(iter([pb.SessionRequest(tag=1, alloc=pb.AllocRequest(min=1, max=2))]))
        with pytest.raises(grpc.RpcError) as e:
            list(resp)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "first message of a Session must be open" in (e.value.details() or "")
        # an empty request, a second open, and a session named on the stream: errors, stream lives
        reqs = [
            pb.SessionRequest(tag=1, open=pb.OpenSession(client="x")),
            pb.SessionRequest(tag=2),
            pb.SessionRequest(tag=3, open=pb.OpenSession(client="x")),
            pb.SessionRequest(
                tag=4, alloc=pb.AllocRequest(session=pb.SessionRef(session_id=1), min=1, max=2)
            ),
            pb.SessionRequest(tag=5, alloc=pb.AllocRequest(min=1, max=2)),
        ]
        out = list(stub.Session(iter(reqs)))
        assert [r.tag for r in out] == [1, 2, 3, 4, 5]
        assert [r.WhichOneof("result") for r in out] == [
            "opened",
            "error",
            "error",
            "error",
            "alloc",
        ]
        assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in out[1:4])
    assert client.info().in_use == 0  # the stream ended: its set is gone
