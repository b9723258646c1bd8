"""What the hostile-client suite shares: raw calls, honest tenants, the invariants.

A hostile client here speaks gRPC directly (generic calls with arbitrary bytes, or stubs
with arbitrary field values), never through pasid_client, which would refuse to send
most of it. Honest tenants use pasid_client and hold sessions with grace, so that they
survive the restarts the suite makes and can be checked after each one.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid_client import Client, Info
from pasid_client.sync import Session

from tests.harness import BrokerProcess, db_holdings, wait_until

# Codes a hostile request may get. UNKNOWN and INTERNAL mean a traceback on the broker.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,  # admin methods on the clients' socket
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a Watch or Session that simply waits
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED,  # admin calls from an anonymous caller (authz.py)
}

# Every method a client can call: (service, method, request type, streaming kind).
METHODS: tuple[tuple[str, str, type, str], ...] = (
    ("PasidBroker", "Session", pb.SessionRequest, "stream_stream"),
    ("PasidBroker", "Alloc", pb.AllocRequest, "unary_unary"),
    ("PasidBroker", "Free", pb.FreeRequest, "unary_unary"),
    ("PasidBroker", "List", pb.ListRequest, "unary_unary"),
    ("PasidBroker", "GetInfo", pb.GetInfoRequest, "unary_unary"),
    ("PasidBroker", "Watch", pb.WatchRequest, "unary_stream"),
    ("PasidBroker", "PasidRequest", pb.PasidRequestMessage, "unary_unary"),
    ("PasidAdmin", "ListSets", pb.ListSetsRequest, "unary_unary"),
    ("PasidAdmin", "RevokeSet", pb.RevokeSetRequest, "unary_unary"),
    ("PasidAdmin", "SetQuotas", pb.SetQuotasRequest, "unary_unary"),
    ("PasidAdmin", "ListWithheld", pb.ListWithheldRequest, "unary_unary"),
)


def raw_call(
    channel: grpc.Channel,
    service: str,
    method: str,
    kind: str,
    messages: list[bytes],
    metadata: tuple[tuple[str, str], ...] = (),
) -> grpc.StatusCode:
    """Send `messages` (bytes, unchecked) to a method; the status it ends with. Streams
    are read for a moment only: a hostile client need not wait for them."""
    path = f"/pasid.v1.{service}/{method}"
    timeout = 0.5 if kind != "unary_unary" else 5.0
    try:
        if kind == "unary_unary":
            channel.unary_unary(path)(
                messages[0] if messages else b"", timeout=timeout, metadata=metadata
            )
        elif kind == "unary_stream":
            call = channel.unary_stream(path)
            for _ in call(messages[0] if messages else b"", timeout=timeout, metadata=metadata):
                pass
        else:
            for _ in channel.stream_stream(path)(
                iter(messages), timeout=timeout, metadata=metadata
            ):
                pass
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@dataclass
class Tenant:
    """An honest client holding a set with grace; `given` is what the broker gave it."""

    name: str
    session: Session
    given: set[int] = field(default_factory=set)

    @property
    def set_id(self) -> int:
        return self.session.set_id

    def resume(self, client: Client) -> None:
        """After a restart: take the set back with its token."""
        token = self.session.token
        with contextlib.suppress(Exception):  # the old stream died with the broker
            self.session.close()
        self.session = client.session(resume_token=token, reconnect_deadline_seconds=0)
        assert self.session.resumed and self.session.set_id == self.set_id


def tenants(client: Client, n: int, held: int) -> list[Tenant]:
    out = []
    for i in range(n):
        # No reconnect of its own: resume() takes the set back by hand after a restart.
        s = client.session(f"tenant-{i}", grace_seconds=600, reconnect_deadline_seconds=0)
        t = Tenant(f"tenant-{i}", s)
        t.given.update(s.alloc(1, (1 << 20) - 1, count=held))
        out.append(t)
    return out


def check_invariants(b: BrokerProcess, held_by: Iterable[Tenant]) -> None:
    """No PASID in two sets, in_use equals the sum of the sets, memory equals disk, and
    every surviving tenant holds exactly what it was given."""

    def settled() -> tuple[dict[int, list[int]], Info] | None:
        # Memory changes before its commit lands: compare once nothing is in flight.
        with Client(b.admin_address) as a:
            sets = {s.set_id: sorted(s.pasids()) for s in a.list_sets()}
            info = a.info()
        return (sets, info) if db_holdings(b.db) == sets else None

    got = settled() or wait_until(settled, 10, 0.05, "the broker's memory to match its file")
    sets, info = got
    seen: dict[int, int] = {}
    for set_id, pasids in sets.items():
        for p in pasids:
            assert p not in seen, f"PASID {p} in sets {seen[p]} and {set_id}"
            seen[p] = set_id
    assert info.in_use == len(seen), f"in_use {info.in_use} != {len(seen)} held in sets"
    for t in held_by:
        assert sorted(t.given) == sets.get(t.set_id), f"{t.name} lost or gained PASIDs"


TRACEBACK = re.compile(r"Traceback|\"exc\":|Exception in callback|Unexpected error")


def assert_no_traceback(b: BrokerProcess) -> None:
    """Nothing a client sent reached a traceback in the broker's log."""
    log = b.read_log()
    hits = [line for line in log.splitlines() if TRACEBACK.search(line)]
    assert not hits, "broker logged a traceback:\n" + "\n".join(hits[:5])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fuzz_cases(short: int) -> int:
    """Cases per run: `short` in make test, PASID_FUZZ_CASES (make fuzz: 10000) if set."""
    return int(os.environ.get("PASID_FUZZ_CASES", short))
