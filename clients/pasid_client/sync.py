"""The blocking facade, for scripts and tools that do not run an event loop:

with Client() as client, client.session("sidecar") as s:
    pasids = s.alloc(1, 1023, count=4)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from pasid_client import address as _address
from pasid_client.aio import AsyncClient, AsyncSession, TicketSource, _watch_request
from pasid_client.errors import (
    PasidClientError,
    PermissionDenied,
    Unavailable,
    from_admin_rpc_error,
    from_rpc_error,
)
from pasid_client.handshake import holder_ticket, identity_metadata
from pasid_client.reconnect import RECONNECT_DEADLINE_SECONDS, SessionState, StateCallback
from pasid_client.types import (
    ALL,
    LIST_PAGE_SIZE,
    Event,
    Info,
    SetView,
    WithheldView,
    join_pages,
)

T = TypeVar("T")


class _Loop:
    """An event loop on a thread of its own: the blocking Session runs AsyncSession there,
    so that both share one implementation of the stream and of its reconnects."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._stopped = False
        self._thread = threading.Thread(target=self.loop.run_forever, name="pasid-client")
        self._thread.daemon = True
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` there and wait for its result (or exception). Raises Unavailable
        once the client is closed (its loop would never answer)."""
        if self._stopped:
            coro.close()
            raise Unavailable(grpc.StatusCode.CANCELLED, "the client is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        while True:
            try:
                return fut.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if self._stopped and not fut.done():
                    raise Unavailable(grpc.StatusCode.CANCELLED, "the client is closed") from None

    def stop(self) -> None:
        self._stopped = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class Session:
    """One ioasid_set, held until it is released (close(), release(), leaving its `with`
    block or the client's) or its holder process exits. The blocking face of
    AsyncSession, whose docstring says how it reconnects; safe to use from several
    threads. Every method raises a PasidClientError subclass on failure."""

    def __init__(self, loop: _Loop, session: AsyncSession) -> None:
        self._loop = loop
        self._s = session

    @property
    def session_id(self) -> int:
        return self._s.session_id

    @property
    def set_id(self) -> int:
        return self._s.set_id

    @property
    def token(self) -> str:
        """The session's secret: names it in unary calls and resumes it."""
        return self._s.token

    @property
    def pasid_bits(self) -> int:
        return self._s.pasid_bits

    @property
    def quota(self) -> int:
        return self._s.quota

    @property
    def resumed(self) -> bool:
        """True when the open resumed an earlier session, or a reconnect resumed this one."""
        return self._s.resumed

    @property
    def grace_seconds(self) -> int:
        return self._s.grace_seconds

    @property
    def verified(self) -> bool:
        """The broker knows this set's holder from the kernel (the handshake ran)."""
        return self._s.verified

    @property
    def state(self) -> SessionState:
        """CONNECTED, RECONNECTING, RESUMED, LOST or CLOSED (reconnect.SessionState)."""
        return self._s.state

    @property
    def reconnects(self) -> int:
        return self._s.reconnects

    @property
    def held(self) -> list[tuple[int, int]]:
        """The PASIDs held as last heard from the broker (the witness of a resume)."""
        return self._s.held

    @property
    def contested(self) -> list[tuple[int, int]]:
        """This set's PASIDs that another set's client claims (a conflict; still held):
        AsyncSession.contested."""
        return self._s.contested

    @property
    def witness_complete(self) -> bool:
        """Whether a resume now states a complete witness (AsyncSession's)."""
        return self._s.witness_complete

    @property
    def kept(self) -> bool:
        """True once close() gave up on its release (no broker took it within the
        reconnect deadline): the broker keeps the set until its holder exits (an
        anonymous one: its grace)."""
        return self._s.kept

    def alloc(
        self, min: int = 1, max: int | None = None, count: int = 1, device: str = ""
    ) -> list[int]:
        """As AsyncSession.alloc. Raises InvalidRange, ResourceExhausted, QuotaExceeded,
        Unavailable, OutcomeUnknown, SessionLost, Aborted."""
        return self._loop.run(self._s.alloc(min, max, count, device))

    def free(self, min: int = 0, max: int = ALL) -> int:
        """As AsyncSession.free. Raises InvalidRange, Unavailable, OutcomeUnknown,
        SessionLost, Aborted."""
        return self._loop.run(self._s.free(min, max))

    def pasid_request(self, argsz: int, flags: int, min: int, max: int) -> int:
        """VFIO_IOMMU_PASID_REQUEST on this session: the PASID for ALLOC, 0 for FREE.
        Raises InvalidArgument (errno EINVAL), ResourceExhausted, QuotaExceeded;
        OutcomeUnknown, SessionLost, Aborted."""
        return self._loop.run(self._s.pasid_request(argsz, flags, min, max))

    def list(self) -> SetView:
        """This session's set. Raises Unavailable, SessionLost, Aborted."""
        return self._loop.run(self._s.list())

    def detach(self) -> None:
        """As AsyncSession.detach: end this stream without releasing the set (a verified
        holder's set lives on, detached, until that process exits or is re-attached), and
        stop reconnecting. close() releases instead. Raises nothing."""
        with contextlib.suppress(Unavailable):  # the client is closed: so is the session
            self._loop.run(self._s.detach())

    def release(self) -> int:
        """As AsyncSession.release: the set is destroyed now; returns how many PASIDs it
        held. Raises InvalidArgument (a broker without ReleaseRequest), OutcomeUnknown,
        SessionLost, Aborted."""
        return self._loop.run(self._s.release())

    def wait_ended(self) -> PasidClientError:
        """Block until the session ends for good and return how (Aborted: the broker took
        the set; SessionLost: not resumed in time; or close()'s). Reconnects do not end
        it. Raises nothing."""
        try:
            return self._loop.run(self._s.wait_ended())
        except Unavailable as exc:  # the client is closed
            return exc

    def close(self) -> None:
        """As AsyncSession.close: release the set (half-close the stream) and wait for the
        broker's end of it; a broker restarting or draining meanwhile is waited for,
        reconnected to and released on, within `reconnect_deadline_seconds` (plus the
        client's timeout), else `kept`. Raises nothing."""
        with contextlib.suppress(Unavailable):  # the client is closed: so is the session
            self._loop.run(self._s.close())

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
    for `tls`: mutual TLS to a TCP address; `keepalive_seconds`: TCP only;
    `reconnect_deadline_seconds`: how long sessions reconnect, and opens wait for a
    starting broker). Leaving `with` (close()) releases every session opened through it.
    Raises OSError if a TLS file cannot be read."""

    def __init__(
        self,
        address: str | None = None,
        *,
        socket: str | None = None,
        timeout: float = 10.0,
        keepalive_seconds: float = 10.0,
        peer_socket: str | None = None,
        tls: _address.TlsArg = None,
        reconnect_deadline_seconds: float = RECONNECT_DEADLINE_SECONDS,
    ) -> None:
        self.target = _address.resolve(address, socket)
        self.timeout = timeout
        self.reconnect_deadline_seconds = reconnect_deadline_seconds
        # Where sessions do the peer handshake (None: beside a Unix socket target).
        self.peer_socket = peer_socket
        self._keepalive_seconds = keepalive_seconds
        self._tls = tls
        options = _address.channel_options(self.target, keepalive_seconds)
        t = _address.tls_of(tls) if not self.target.startswith("unix:") else None
        self._channel = (
            grpc.insecure_channel(self.target, options=options)
            if t is None
            else grpc.secure_channel(self.target, t.credentials(), options=options)
        )
        self._stub = pb_grpc.PasidBrokerStub(self._channel)
        self._admin = pb_grpc.PasidAdminStub(self._channel)
        # Sessions run on an AsyncClient in a loop thread, made at the first session.
        self._sessions_lock = threading.Lock()
        self._loop: _Loop | None = None
        self._aio: AsyncClient | None = None

    def close(self) -> None:
        """Release every session opened through this client (each one's close()), then
        close the connection. Raises nothing."""
        with self._sessions_lock:
            loop, aio, self._loop, self._aio = self._loop, self._aio, None, None
        if loop is not None and aio is not None:
            loop.run(aio.close())
            loop.stop()
        self._channel.close()

    def _async(self) -> tuple[_Loop, AsyncClient]:
        with self._sessions_lock:
            if self._loop is None or self._aio is None:
                loop = _Loop()

                async def make() -> AsyncClient:  # grpc.aio binds a channel to its loop
                    return AsyncClient(
                        self.target,
                        timeout=self.timeout,
                        keepalive_seconds=self._keepalive_seconds,
                        peer_socket=self.peer_socket,
                        tls=self._tls,
                        reconnect_deadline_seconds=self.reconnect_deadline_seconds,
                    )

                self._aio = loop.run(make())
                self._loop = loop
            return self._loop, self._aio

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
        recovery is done, and answers UNAVAILABLE until then. Raises Unavailable;
        PermissionDenied (SOCKET_ACCESS) at once where this user may not connect."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                req = health_pb2.HealthCheckRequest()
                if stub.Check(req, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                if isinstance(err := from_rpc_error(exc), PermissionDenied):
                    raise err from None  # a socket we may not connect to: final
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
        ticket: TicketSource = None,
        on_state_change: StateCallback | None = None,
        reconnect_deadline_seconds: float | None = None,
        reattach_set_id: int = 0,
    ) -> Session:
        """Open or resume a session; as AsyncClient.session, whose docstring says what each
        argument does. On a Unix socket the peer handshake runs first, so the broker knows
        this process from the kernel and destroys the set when it exits. A sidecar passes
        `delegate_pid` (or a pidfd it holds, `delegate_pidfd`) of the process that should
        hold the set, e.g. its VMM; it must be allowed to signal it. `on_state_change` is
        called on the library's own thread: keep it short. The session reconnects by
        itself after its broker went away, within `reconnect_deadline_seconds`.
        `reattach_set_id`: take back that detached set of this process (or of the
        delegated one), without its token (see held_sets).
        Raises NotFound, FailedPrecondition, PermissionDenied (delegation refused),
        Unauthenticated, Unavailable (no broker within the deadline), QuotaExceeded."""
        loop, aio = self._async()
        opener = aio.session(
            client,
            pid=pid,
            grace_seconds=grace_seconds,
            resume_token=resume_token,
            delegate_pid=delegate_pid,
            delegate_pidfd=delegate_pidfd,
            ticket=ticket,
            on_state_change=on_state_change,
            reconnect_deadline_seconds=reconnect_deadline_seconds,
            reattach_set_id=reattach_set_id,
        )

        async def open_() -> AsyncSession:
            s: AsyncSession = await opener
            return s

        return Session(loop, loop.run(open_()))

    def held_sets(
        self, *, delegate_pid: int | None = None, delegate_pidfd: int | None = None
    ) -> list[SetView]:
        """The sets (attached or detached) held by this process, or by the one named by
        `delegate_pid`/`delegate_pidfd` (which we must be allowed to signal): what a
        restarted sidecar re-attaches (`session(reattach_set_id=...)`). Needs the peer
        socket. Raises FailedPrecondition (no peer socket), PermissionDenied,
        Unauthenticated, Unavailable."""
        t = holder_ticket(
            self.target,
            peer_socket=self.peer_socket,
            delegate_pid=delegate_pid,
            delegate_pidfd=delegate_pidfd,
            timeout=self.timeout,
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

    def list_withheld(self) -> list[WithheldView]:
        """The PASIDs the broker withholds (a failed kernel call at a set's end, a
        witness's claim) and what keeps each (admin socket). Raises PermissionDenied
        elsewhere."""
        resp = self._admin_unary(self._admin.ListWithheld, pb.ListWithheldRequest())
        return [WithheldView.from_pb(m) for m in resp.pasids]

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
