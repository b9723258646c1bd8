"""Fuzzing every method of a live broker, with a restart and the invariants after each batch.

Each case calls one method (PasidBroker on the clients' socket, PasidAdmin on the admin
socket) with either random bytes or a message whose every field has a random value of
its type (edge values favoured: 0, 2^31, 2^32-1, 2^63, 2^64-1, names with newlines, long
strings). A case passes when the broker answers with a precise refusal or success: never
UNKNOWN/INTERNAL (a traceback) nor UNAVAILABLE (a dead daemon). Honest tenants hold sets
meanwhile; after every batch the broker is restarted and they resume them: no PASID in
two sets, in_use equal to the sum of the sets, memory equal to disk, every tenant holding
exactly what it was given, and no traceback in the log.

`make test` runs a short form (about 500 cases); `make fuzz` runs 10,000
(PASID_FUZZ_CASES).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pasid.v1 import broker_pb2 as pb
from pasid_client import Client, NotFound
from pasid_client.handshake import ticket_for

from tests.harness import BrokerProcess
from tests.hostile.common import (
    METHODS,
    REFUSALS,
    Tenant,
    assert_no_traceback,
    check_invariants,
    fuzz_cases,
    raw_call,
    tenants,
)

BATCH = 100 if fuzz_cases(500) <= 500 else 500

U32_EDGES = [0, 1, 2, 1000, (1 << 20) - 1, 1 << 20, (1 << 22), (1 << 31) - 1, 1 << 31, 2**32 - 1]
U64_EDGES = [*U32_EDGES, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
I32_EDGES = [0, -1, 1, -(2**31), 2**31 - 1]
I64_EDGES = [0, -1, 1, -(2**63), 2**63 - 1]
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "vm\nforged line", "x" * 300, "\x1b[31m", "é" * 200, "a=b c"]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=2000),
)


def _ints(edges: list[int], lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_UINT32: _ints(U32_EDGES, 0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: _ints(U64_EDGES, 0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: _ints(I32_EDGES, -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: _ints(I64_EDGES, -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=40),
}


@st.composite
def messages(draw: st.DrawFn, desc: Descriptor, depth: int = 0) -> Any:
    """A message of type `desc` with random values in random fields (one of a oneof)."""
    msg = message_factory.GetMessageClass(desc)()
    oneof_fields = {f.name for o in desc.oneofs for f in o.fields}
    fields = [f for f in desc.fields if f.name not in oneof_fields]
    for o in desc.oneofs:
        fields.append(draw(st.sampled_from(list(o.fields))))
    for f in fields:
        if not draw(st.booleans()):
            continue
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth < 2:
                getattr(msg, f.name).CopyFrom(draw(messages(f.message_type, depth + 1)))
        elif getattr(f, "is_repeated", False) or getattr(f, "label", 0) == 3:  # REPEATED
            getattr(msg, f.name).extend(draw(st.lists(SCALARS[f.type], max_size=3)))
        else:
            setattr(msg, f.name, draw(SCALARS[f.type]))
    return msg


class Fuzzer:
    """The live broker, its tenants, and a session of the fuzzer's own whose real token
    it may use (so that Alloc/Free/List act, not only refuse)."""

    def __init__(self, b: BrokerProcess) -> None:
        self.b = b
        self.client = Client(b.address)
        self.tenants: list[Tenant] = tenants(self.client, 3, 40)
        self.own = self.client.session("fuzzer", grace_seconds=600)
        self.codes: Counter[tuple[str, str]] = Counter()  # (method, status) seen
        self._channels()

    def _channels(self) -> None:
        self.main = grpc.insecure_channel(self.b.address)
        self.admin = grpc.insecure_channel(self.b.admin_address)

    def close(self) -> None:
        self.main.close()
        self.admin.close()
        self.client.close()

    def aim(self, msg: Any, use_own: bool) -> Any:
        """Point session refs at the fuzzer's own session sometimes; never let RevokeSet
        take a tenant's set (that would be an honest change of what it holds)."""
        if use_own:
            for name in ("session",):
                if msg.DESCRIPTOR.fields_by_name.get(name) is not None:
                    getattr(msg, name).CopyFrom(
                        pb.SessionRef(session_id=self.own.session_id, token=self.own.token)
                    )
        if isinstance(msg, pb.RevokeSetRequest) and msg.set_id in {t.set_id for t in self.tenants}:
            msg.set_id = self.own.set_id
        return msg

    def call(
        self, method_index: int, payload: list[bytes] | list[Any], raw: bool, as_admin: bool
    ) -> None:
        service, method, _, kind = METHODS[method_index]
        channel = self.admin if service == "PasidAdmin" else self.main
        data = payload if raw else [m.SerializeToString() for m in payload]
        # Admin calls as an admin half the time (a fresh one-time peer ticket: this test
        # runs as root), so that the fuzz reaches their handlers, not only the authorizer.
        md: tuple[tuple[str, str], ...] = ()
        if service == "PasidAdmin" and as_admin:
            t = ticket_for(self.b.address)
            assert t is not None, "no peer socket beside the broker's"
            md = (("pasid-ticket", t.ticket),)
        code = raw_call(channel, service, method, kind, data, md)  # type: ignore[arg-type]
        self.codes[(method, code.name)] += 1
        assert code is grpc.StatusCode.OK or code in REFUSALS, (
            f"{service}/{method} answered {code.name}:\n{self.b.read_log()[-3000:]}"
        )

    def restart(self) -> None:
        self.main.close()
        self.admin.close()
        self.b.restart()
        self._channels()
        self.client.close()
        self.client = Client(self.b.address)
        for t in self.tenants:
            t.resume(self.client)
        try:
            self.own = self.client.session(resume_token=self.own.token)
        except NotFound:  # the fuzz may revoke (or end) its own session: a new one
            self.own = self.client.session("fuzzer", grace_seconds=600)
        with Client(self.b.admin_address) as a:  # undo whatever quotas the fuzz set
            a.set_quotas(per_set=1000, per_client=0, global_=0)


@pytest.fixture
def fuzzer() -> Iterator[Fuzzer]:
    b = BrokerProcess("--session-opens-per-second", "1000", "--session-open-burst", "1000")
    b.start()
    f = Fuzzer(b)
    yield f
    f.close()
    b.cleanup()


CASE = st.tuples(
    st.integers(0, len(METHODS) - 1),
    st.booleans(),  # raw bytes, or typed fields
    st.booleans(),  # aim at the fuzzer's own session
    st.data(),
)


# The suite's 120 s timeout is for one test of ordinary length; the fuzz scales with its cases.
@pytest.mark.timeout(120 + fuzz_cases(500) * 0.2)
def test_fuzz_every_method_restart_after_each_batch(fuzzer: Fuzzer) -> None:
    total = fuzz_cases(500)

    @settings(
        max_examples=BATCH,
        deadline=None,
        # Hypothesis's CI profile (CI=true, as .ci/run has) derandomizes: every batch then
        # replays the same cases, and CI fuzzed a tenth of what it says. Fresh cases each
        # batch; a failure prints the seed that reproduces it.
        derandomize=False,
        print_blob=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(CASE)
    def batch(case: tuple[int, bool, bool, st.DataObject]) -> None:
        index, raw, use_own, data = case
        _, method, req_type, kind = METHODS[index]
        n = data.draw(st.integers(1, 4)) if kind == "stream_stream" else 1
        if raw:
            payload: list[Any] = [data.draw(st.binary(max_size=300)) for _ in range(n)]
        else:
            payload = [
                fuzzer.aim(data.draw(messages(req_type.DESCRIPTOR)), use_own) for _ in range(n)
            ]
            if method == "Session" and use_own:  # a well-formed open, then random ops
                name = data.draw(
                    st.text(st.characters(codec="ascii", min_codepoint=32), max_size=20)
                )
                grace = data.draw(st.integers(0, 5))
                payload[0] = pb.SessionRequest(
                    open=pb.OpenSession(client=name, grace_seconds=grace)
                )
        fuzzer.call(index, payload, raw, as_admin=use_own)

    for _ in range(max(total // BATCH, 1)):
        batch()
        fuzzer.restart()
        check_invariants(fuzzer.b, fuzzer.tenants)
        assert_no_traceback(fuzzer.b)
    print(f"{sum(fuzzer.codes.values())} cases:", dict(sorted(fuzzer.codes.items())))
    # The fuzz reached the engine, not only the decoder: some calls that need a live
    # session (a valid token and set) succeeded.
    reached = ("Alloc", "Free", "Session", "PasidRequest")
    assert sum(fuzzer.codes[(m, "OK")] for m in reached) > 0, dict(fuzzer.codes)
