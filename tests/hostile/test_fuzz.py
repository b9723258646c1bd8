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

peer.sock (issue 20) is fuzzed too, by uid 65534: random bytes, JSON-ish structures and
fd sets, with the broker's descriptor count, precise answers and other uids' service
checked after every batch (300 cases in `make test`).
"""

from __future__ import annotations

import json
import subprocess
import time
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
from pasid_client.handshake import obtain_ticket, ticket_for

from tests.e2e.other_uid import open_for_nobody, require_setpriv
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
from tests.hostile.test_peer_socket import (
    OTHER,
    Attacker,
    assert_fds_back,
    fd_count,
    peer_path,
    served_as,
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
        repeated = getattr(f, "is_repeated", False) or getattr(f, "label", 0) == 3  # REPEATED
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            if repeated:  # e.g. OpenSession.held: a list of messages, each filled in turn
                for item in draw(st.lists(messages(f.message_type, depth + 1), max_size=3)):
                    getattr(msg, f.name).add().CopyFrom(item)
            else:
                getattr(msg, f.name).CopyFrom(draw(messages(f.message_type, depth + 1)))
        elif repeated:
            getattr(msg, f.name).extend(draw(st.lists(SCALARS[f.type], max_size=3)))
        else:
            setattr(msg, f.name, draw(SCALARS[f.type]))
    return msg


class Fuzzer:
    """The live broker, its tenants, and a session of the fuzzer's own whose real token
    it may use (so that Alloc/Free/List act, not only refuse)."""

    def __init__(self, b: BrokerProcess) -> None:
        self.b = b
        self.client = Client(b.address, reconnect_deadline_seconds=0)  # resumed by hand
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
        self.client = Client(self.b.address, reconnect_deadline_seconds=0)
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


# -- peer.sock (issue 20) -------------------------------------------------------------------

PEER_KEYS = ["v", "pid", "fds", "devices", "name", "pt_id", "dev_id"]
PEER_ROLES = ["pidfd", "iommufd", "device", "", "x" * 200]
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**40]),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.sampled_from(PEER_ROLES),
)
JSONISH = st.recursive(
    JSON_LEAF,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(PEER_KEYS), st.text(max_size=8)), kids, max_size=5
        ),
    ),
    max_leaves=30,
)


@st.composite
def peer_messages(draw: st.DrawFn, nfds: int) -> bytes:
    """What a hostile client sends on peer.sock: bytes, JSON-ish structures, nearly valid
    handshakes (their role list sometimes matching the fds sent), and deep nesting."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=5000))
    if kind == 1:
        return json.dumps(draw(JSONISH)).encode()
    if kind == 2:
        depth = draw(st.integers(1, 5000))
        return (draw(st.sampled_from(["[", "{", '{"a":'])) * depth).encode()[:6000]
    msg: dict[str, Any] = {"v": draw(st.sampled_from([1, 1, 1, 2, "1", None, True]))}
    roles = ["pidfd"] + ["device"] * (nfds - 1) if nfds else []
    if draw(st.booleans()):
        roles = draw(st.lists(st.sampled_from(PEER_ROLES), max_size=18))
    msg["fds"] = roles
    if draw(st.booleans()):
        msg["pid"] = draw(JSON_LEAF)
    if draw(st.booleans()):
        msg["devices"] = draw(JSONISH)
    if kind == 4:
        msg.update(draw(st.dictionaries(st.sampled_from(PEER_KEYS), JSONISH, max_size=3)))
    return json.dumps(msg).encode()


# A hostile handshake's answer: a precise refusal, or a ticket (for its own processes).
# Never INTERNAL (a bug caught by the broker), nor silence (a dead or hung handshake).
PEER_ANSWERS = {
    "OK",
    "INVALID_ARGUMENT",
    "PERMISSION_DENIED",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
}


@pytest.mark.timeout(120 + fuzz_cases(300) * 0.1)
def test_fuzz_peer_socket_as_another_uid() -> None:
    """Random bytes, structures and fd sets (pipes, sockets, /dev/null, eventfds, memfds,
    pidfds of the sender, of pid 1, of the broker and of another uid's process) sent on
    peer.sock by uid 65534. After every batch: the broker holds the descriptors it held
    before (unused tickets live 1 s here), every answer was precise, no traceback, and
    root and uid 4242 are served."""
    require_setpriv()
    total = fuzz_cases(300)
    b = BrokerProcess("--socket-mode", "0666", "--ticket-seconds", "1")
    open_for_nobody(b.dir)
    b.start()
    other = subprocess.Popen(["sleep", "600"])  # a root process to hand over
    attacker = None
    try:
        obtain_ticket(peer_path(b))
        time.sleep(1.6)  # its ticket expired and swept: the baseline holds no ticket
        baseline = fd_count(b)
        assert b.proc is not None
        pidfds = [f"pidfd:{b.proc.pid}", f"pidfd:{other.pid}", "pidfd:self", "pidfd:1"]
        fd_kinds = st.sampled_from(["null", "pipe", "socket", "eventfd", "memfd", *pidfds])
        fd_sets = st.one_of(
            st.just([]),
            st.lists(st.sampled_from(pidfds), min_size=1, max_size=1),  # a delegation
            st.lists(fd_kinds, max_size=20),
        )
        attacker = Attacker(peer_path(b))
        codes: Counter[str] = Counter()

        @settings(
            max_examples=min(total, 100),
            deadline=None,
            derandomize=False,
            print_blob=True,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def batch(data: st.DataObject) -> None:
            fds = data.draw(fd_sets)
            msg = data.draw(peer_messages(len(fds)))
            assert attacker is not None
            got = attacker.send(msg, fds)
            for answer in got:
                code = answer.split(":", 1)[0]
                codes[code] += 1
                assert code in PEER_ANSWERS, (msg[:200], fds, answer)

        for _ in range(max(total // 100, 1)):
            batch()
            assert_fds_back(b, baseline, "a batch of fuzzed handshakes")
            assert obtain_ticket(peer_path(b)).uid == 0
            assert served_as(b, OTHER)["ok"]
            assert_no_traceback(b)
        print(f"{codes.total()} peer.sock cases:", dict(sorted(codes.items())))
        assert codes["INVALID_ARGUMENT"] > 0 and codes["OK"] + codes["PERMISSION_DENIED"] > 0
    finally:
        if attacker is not None:
            attacker.close()
        other.kill()
        other.wait()
        b.cleanup()
