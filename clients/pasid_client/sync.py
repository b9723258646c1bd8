"""The blocking facade, for scripts and tools that do not run an event loop:

with Client() as client, client.session("sidecar") as s:
    pasids = s.alloc(1, 1023, count=4)
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from pasid_client import address as _address
from pasid_client.aio import _error_of, _watch_request
from pasid_client.errors import (
    PasidClientError,
    Unavailable,
    from_admin_rpc_error,
    from_rpc_error,
    make_error,
)
from pasid_client.handshake import Ticket, identity_metadata, open_request, ticket_for
from pasid_client.types import ALL, LIST_PAGE_SIZE, Event, Info, SetView, join_pages


class Session:
    """One ioasid_set, held while this object is open. Not thread-safe: one caller."""

    def __init__(
        self, stub: pb_grpc.PasidBrokerStub, open_req: pb.OpenSession, timeout: float
    ) -> None:
        self._q: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()
        self._tags = itertools.count(1)
        self._closed = False
        self._timeout = timeout
        # One reader of the stream at a time: close() may run while wait_ended() reads in
        # another thread (pasidctl hold), and two readers of one call fail inside grpc
        # ("Internal gRPC call error 8").
        self._reading = threading.Lock()
        self._q.put(pb.SessionRequest(tag=0, open=open_req))
        self._call: Any = stub.Session(iter(self._q.get, None))
        self._responses: Iterator[pb.SessionResponse] = self._call
        resp = self._next()
        if resp.WhichOneof("result") == "error":
            raise _error_of(resp.error)
        o = resp.opened
        self.session_id: int = o.session_id
        self.set_id: int = o.set_id
        self.token: str = o.token
        self.pasid_bits: int = o.pasid_bits
        self.quota: int = o.quota
        self.resumed: bool = o.resumed
        self.grace_seconds: int = o.grace_seconds
        # The broker knows this set's holder from the kernel (the handshake ran).
        self.verified: bool = o.verified

    def _next(self) -> pb.SessionResponse:
        try:
            with self._reading:
                return next(self._responses)
        except StopIteration:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "session stream ended") from None
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _request(self, **op: Any) -> pb.SessionResponse:
        if self._closed:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "session is closed")
        self._q.put(pb.SessionRequest(tag=next(self._tags), **op))
        resp = self._next()
        if resp.WhichOneof("result") == "error":
            raise _error_of(resp.error)
        return resp

    def alloc(
        self, min: int = 1, max: int | None = None, count: int = 1, device: str = ""
    ) -> list[int]:
        """As AsyncSession.alloc. Raises InvalidRange, ResourceExhausted, QuotaExceeded."""
        hi = (1 << self.pasid_bits) - 1 if max is None else max
        req = pb.AllocRequest(min=min, max=hi, count=count, device=device)
        return list(self._request(alloc=req).alloc.pasids)

    def free(self, min: int = 0, max: int = ALL) -> int:
        """As AsyncSession.free. Raises InvalidRange."""
        return int(self._request(free=pb.FreeRequest(min=min, max=max)).free.freed)

    def pasid_request(self, argsz: int, flags: int, min: int, max: int) -> int:
        """VFIO_IOMMU_PASID_REQUEST on this session: the PASID for ALLOC, 0 for FREE.
        Raises InvalidArgument (errno EINVAL), ResourceExhausted, QuotaExceeded."""
        req = pb.PasidRequestMessage(argsz=argsz, flags=flags, min=min, max=max)
        return int(self._request(request=req).request.ret)

    def list(self) -> SetView:
        """This session's set (read in pages, however fragmented)."""

        def page(token: str) -> pb.ListResponse:
            req = pb.ListRequest(page_size=LIST_PAGE_SIZE, page_token=token)
            return self._request(list=req).list

        return join_pages(_pages(page))[0]

    def wait_ended(self) -> PasidClientError:
        """Block until the broker ends this session's stream (its holder exited, a revoke,
        a shutdown) and return how it ended (Aborted, Unavailable, ...). Call it only with
        no request in flight: the session is not thread-safe."""
        try:
            while True:
                self._next()
        except PasidClientError as exc:
            return exc

    def close(self) -> None:
        """End the stream; the broker destroys the set (or keeps it for the grace)."""
        if self._closed:
            return
        self._closed = True
        self._q.put(None)  # done writing: the broker ends the stream
        if not self._reading.acquire(timeout=self._timeout):
            self._call.cancel()  # a reader elsewhere never saw the end
            return
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass
        finally:
            self._reading.release()

    def detach(self) -> None:
        """End this stream without releasing the set (a cancel, not a half-close): a
        verified holder's set lives on, detached, until that process exits or is
        re-attached (`reattach_set_id`); an anonymous one waits out its grace. What a
        sidecar that stops to be restarted does. close() instead releases it."""
        if self._closed:
            return
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class WatchStream:
    """A Watch in progress: an iterator of Events that any thread may close."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._closed = False

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return Event.from_pb(next(self._call))
        except grpc.RpcError as exc:
            if self._closed and exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(exc) from None

    def close(self) -> None:
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Client:
    """A blocking connection to the broker; see AsyncClient for each call's meaning (and
    for `tls`: mutual TLS to a TCP address)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        socket: str | None = None,
        timeout: float = 10.0,
        keepalive_seconds: float = 10.0,
        peer_socket: str | None = None,
        tls: _address.TlsArg = None,
    ) -> None:
        self.target = _address.resolve(address, socket)
        self.timeout = timeout
        # Where sessions do the peer handshake (None: beside a Unix socket target).
        self.peer_socket = peer_socket
        options = _address.channel_options(self.target, keepalive_seconds)
        t = _address.tls_of(tls) if not self.target.startswith("unix:") else None
        self._channel = (
            grpc.insecure_channel(self.target, options=options)
            if t is None
            else grpc.secure_channel(self.target, t.credentials(), options=options)
        )
        self._stub = pb_grpc.PasidBrokerStub(self._channel)
        self._admin = pb_grpc.PasidAdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _identity(self) -> tuple[tuple[str, str], ...]:
        """A per-call ticket: admin calls and Watch are checked against who we are."""
        return identity_metadata(self.target, peer_socket=self.peer_socket, timeout=self.timeout)

    def _admin_unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._identity())
        except grpc.RpcError as exc:
            raise from_admin_rpc_error(exc) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the broker says SERVING (grpc.health.v1): it listens before its
        recovery is done, and answers UNAVAILABLE until then. Raises Unavailable."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                req = health_pb2.HealthCheckRequest()
                if stub.Check(req, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(
                    grpc.StatusCode.UNAVAILABLE, f"broker at {self.target} not serving"
                )
            time.sleep(0.05)

    def session(
        self,
        client: str = "",
        *,
        pid: int | None = None,
        grace_seconds: int = 0,
        resume_token: str = "",
        delegate_pid: int | None = None,
        delegate_pidfd: int | None = None,
        ticket: Ticket | None = None,
        reattach_set_id: int = 0,
    ) -> Session:
        """Open or resume a session. On a Unix socket the peer handshake runs first, so
        the broker knows this process from the kernel and destroys the set when it exits.
        A sidecar passes `delegate_pid` (or a pidfd it holds, `delegate_pidfd`) of the
        process that should hold the set, e.g. its VMM; it must be allowed to signal it.
        `ticket`: one obtained with pasid_client.obtain_ticket (e.g. carrying extra fds)
        instead of the automatic handshake. `reattach_set_id`: take back that detached
        set of this process (or of the delegated one), without its token (see held_sets).
        Raises NotFound, FailedPrecondition, PermissionDenied (delegation refused),
        Unauthenticated, Unavailable."""
        t = ticket or ticket_for(
            self.target,
            peer_socket=self.peer_socket,
            delegate_pid=delegate_pid,
            delegate_pidfd=delegate_pidfd,
            timeout=self.timeout,
        )
        req = open_request(client, pid, grace_seconds, resume_token, t)
        req.reattach_set_id = reattach_set_id
        return Session(self._stub, req, self.timeout)

    def held_sets(
        self, *, delegate_pid: int | None = None, delegate_pidfd: int | None = None
    ) -> list[SetView]:
        """The sets (attached or detached) held by this process, or by the one named by
        `delegate_pid`/`delegate_pidfd` (which we must be allowed to delegate): what a
        restarted sidecar re-attaches (`session(reattach_set_id=...)`). Needs the peer
        socket. Raises FailedPrecondition (no peer socket), PermissionDenied,
        Unauthenticated, Unavailable."""
        t = ticket_for(
            self.target,
            peer_socket=self.peer_socket,
            delegate_pid=delegate_pid,
            delegate_pidfd=delegate_pidfd,
            timeout=self.timeout,
        )
        if t is None:
            raise make_error(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"listing a holder's sets needs the broker's peer socket; none for {self.target}",
                "HANDSHAKE",
            )
        resp = self._unary(self._stub.List, pb.ListRequest(ticket=t.ticket))
        return [SetView.from_pb(v) for v in resp.sets]

    def info(self) -> Info:
        """Raises Unavailable."""
        return Info.from_pb(self._unary(self._stub.GetInfo, pb.GetInfoRequest()))

    def alloc(self, session_id: int, token: str, min: int, max: int, count: int = 1) -> list[int]:
        """Raises NotFound, InvalidRange, ResourceExhausted, QuotaExceeded."""
        ref = pb.SessionRef(session_id=session_id, token=token)
        resp = self._unary(
            self._stub.Alloc, pb.AllocRequest(session=ref, min=min, max=max, count=count)
        )
        return list(resp.pasids)

    def free(self, session_id: int, token: str, min: int = 0, max: int = ALL) -> int:
        """Raises NotFound, InvalidRange."""
        ref = pb.SessionRef(session_id=session_id, token=token)
        return int(
            self._unary(self._stub.Free, pb.FreeRequest(session=ref, min=min, max=max)).freed
        )

    def list_session(self, session_id: int, token: str) -> SetView:
        """Raises NotFound."""
        ref = pb.SessionRef(session_id=session_id, token=token)

        def page(page_token: str) -> pb.ListResponse:
            req = pb.ListRequest(session=ref, page_size=LIST_PAGE_SIZE, page_token=page_token)
            return self._unary(self._stub.List, req)  # type: ignore[no-any-return]

        return join_pages(_pages(page))[0]

    def pasid_request(
        self, session_id: int, token: str, argsz: int, flags: int, min: int, max: int
    ) -> int:
        """VFIO_IOMMU_PASID_REQUEST for a session held elsewhere. Raises as the ioctl
        fails, with `.errno`; NotFound for a wrong session or token."""
        ref = pb.SessionRef(session_id=session_id, token=token)
        req = pb.PasidRequestMessage(session=ref, argsz=argsz, flags=flags, min=min, max=max)
        return int(self._unary(self._stub.PasidRequest, req).ret)

    def watch(self, from_revision: int = 0, *, session_id: int = 0, token: str = "") -> WatchStream:
        """Events from `from_revision` (0: from now on), replayed then live: on the
        admin socket every set's, on the clients' socket only the named session's set.
        Iterate it; `close()` (from any thread) ends it. Iterating raises OutOfRange for
        a compacted revision, PermissionDenied without a session on the clients' socket,
        QuotaExceeded (reason LIMIT_EXCEEDED) for too many watchers or a watcher fallen
        behind, Unavailable when the broker goes away."""
        return WatchStream(
            self._stub.Watch(
                _watch_request(from_revision, session_id, token), metadata=self._identity()
            )
        )

    def list_sets(self, with_ranges: bool = True) -> list[SetView]:
        """Every set (admin socket), read in pages however many there are. Raises
        PermissionDenied elsewhere."""

        def page(token: str) -> pb.ListResponse:
            req = pb.ListSetsRequest(
                with_ranges=with_ranges, page_size=LIST_PAGE_SIZE, page_token=token
            )
            return self._admin_unary(self._admin.ListSets, req)  # type: ignore[no-any-return]

        return join_pages(_pages(page))

    def revoke(self, set_id: int, reason: str = "") -> int:
        """Destroy a set now (admin socket); returns how many PASIDs it held. Raises
        NotFound, PermissionDenied."""
        resp = self._admin_unary(
            self._admin.RevokeSet, pb.RevokeSetRequest(set_id=set_id, reason=reason)
        )
        return int(resp.freed)

    def set_quotas(
        self, per_set: int, per_client: int = 0, global_: int = 0, set_id: int = 0
    ) -> Info:
        """Change quotas durably (they outlive a restart; admin only). Raises NotFound,
        PermissionDenied."""
        q = pb.Quotas(per_set=per_set, per_client=per_client, **{"global": global_})
        return Info.from_pb(
            self._admin_unary(self._admin.SetQuotas, pb.SetQuotasRequest(set_id=set_id, quotas=q))
        )


def _pages(page: Callable[[str], pb.ListResponse]) -> Iterator[pb.ListResponse]:
    """Every page of a listing: `page(token)` from the empty token until the broker's
    next_page_token is empty (an older broker sends everything at once, and none)."""
    token = ""
    while True:
        resp = page(token)
        yield resp
        token = resp.next_page_token
        if not token:
            return
