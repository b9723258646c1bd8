"""The asyncio client. A VMM opens one AsyncSession for its lifetime:

async with AsyncClient() as client:
    async with client.session("qemu-vm42") as s:
        pasid, = await s.alloc(1, 1023)
        ...
# leaving the session frees every PASID it still holds
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from pasid_client import address as _address
from pasid_client.errors import (
    PasidClientError,
    Unavailable,
    from_admin_rpc_error,
    from_rpc_error,
    from_status_code_int,
    make_error,
)
from pasid_client.handshake import Ticket, identity_metadata, open_request, ticket_for
from pasid_client.types import ALL, LIST_PAGE_SIZE, Event, Info, SetView, join_pages


def _error_of(err: pb.Error) -> PasidClientError:
    return make_error(
        from_status_code_int(err.code), err.message, err.reason, err.quota, err.limit, err.errno
    )


class AsyncSession:
    """One ioasid_set, held while this session's stream is open.

    Requests may be issued concurrently; they are pipelined on the stream and answered in
    order. Every method raises a PasidClientError subclass on failure.
    """

    def __init__(
        self, call: Any, responses: AsyncIterator[pb.SessionResponse], opened: pb.SessionOpened
    ) -> None:
        self._call = call
        self._responses = responses
        self.session_id: int = opened.session_id
        self.set_id: int = opened.set_id
        self.token: str = opened.token
        self.pasid_bits: int = opened.pasid_bits
        self.quota: int = opened.quota
        self.resumed: bool = opened.resumed
        self.grace_seconds: int = opened.grace_seconds
        # The broker knows this set's holder from the kernel (the handshake ran).
        self.verified: bool = opened.verified
        self._tags = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[pb.SessionResponse]] = {}
        self._write_lock = asyncio.Lock()
        self._final: PasidClientError | None = None
        self._reader = asyncio.create_task(self._read())
        self._closed = False

    async def _read(self) -> None:
        """Route replies by tag; when the stream ends, fail what is still waiting with the
        stream's own final status (ABORTED for a revoke, UNAVAILABLE for a shutdown)."""
        err: PasidClientError
        try:
            # The iterator, not call.read(): read() on a call whose status has arrived
            # raises at once and drops replies still buffered (grpc.aio _call.py), so a
            # request the broker answered just before ending the stream (SIGTERM drain)
            # would look failed although it was committed.
            async for resp in self._responses:
                fut = self._waiting.pop(resp.tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
            err = Unavailable(grpc.StatusCode.UNAVAILABLE, "session stream ended")
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                # The broker never ends a stream with these: grpc reports them when a
                # write races the broker's end of the stream. The stream is just gone.
                err = Unavailable(grpc.StatusCode.UNAVAILABLE, f"session stream ended ({err})")
        except asyncio.CancelledError:
            err = Unavailable(grpc.StatusCode.CANCELLED, "session closed")
        self._final = err
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiting.clear()

    async def _request(self, **op: Any) -> pb.SessionResponse:
        if self._closed or self._reader.done():
            raise self._final or Unavailable(grpc.StatusCode.UNAVAILABLE, "session is closed")
        tag = next(self._tags)
        fut: asyncio.Future[pb.SessionResponse] = asyncio.get_running_loop().create_future()
        self._waiting[tag] = fut
        try:
            async with self._write_lock:
                await self._call.write(pb.SessionRequest(tag=tag, **op))
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            # The stream ended under the write: report how it ended, not the write.
            self._waiting.pop(tag, None)
            if fut.done():
                fut.exception()  # the reader failed it already; nobody else awaits it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5)
            raise self._final or Unavailable(
                grpc.StatusCode.UNAVAILABLE, "session stream ended"
            ) from None
        resp = await fut
        if resp.WhichOneof("result") == "error":
            raise _error_of(resp.error)
        return resp

    async def alloc(
        self, min: int = 1, max: int | None = None, count: int = 1, device: str = ""
    ) -> list[int]:
        """The `count` lowest free PASIDs in [min, max] (max defaults to the top of the
        namespace), attached to the delegated `device` if named (iommufd backend).
        Raises InvalidRange, ResourceExhausted, QuotaExceeded, Unavailable."""
        hi = (1 << self.pasid_bits) - 1 if max is None else max
        req = pb.AllocRequest(min=min, max=hi, count=count, device=device)
        resp = await self._request(alloc=req)
        return list(resp.alloc.pasids)

    async def free(self, min: int = 0, max: int = ALL) -> int:
        """Free this session's PASIDs in [min, max]; returns how many. Raises InvalidRange
        (min > max) or Unavailable."""
        resp = await self._request(free=pb.FreeRequest(min=min, max=max))
        return resp.free.freed

    async def pasid_request(self, argsz: int, flags: int, min: int, max: int) -> int:
        """VFIO_IOMMU_PASID_REQUEST on this session: the PASID for ALLOC, 0 for FREE. Raises
        as the ioctl fails, with `.errno` set (InvalidArgument EINVAL, ResourceExhausted
        ENOSPC, QuotaExceeded EDQUOT)."""
        req = pb.PasidRequestMessage(argsz=argsz, flags=flags, min=min, max=max)
        return int((await self._request(request=req)).request.ret)

    async def list(self) -> SetView:
        """This session's set (read in pages, however fragmented). Raises Unavailable."""

        async def page(token: str) -> pb.ListResponse:
            req = pb.ListRequest(page_size=LIST_PAGE_SIZE, page_token=token)
            return (await self._request(list=req)).list

        return join_pages(await _pages(page))[0]

    async def close(self) -> None:
        """End the stream: the broker destroys the set (or keeps it for the grace)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._call.done_writing()
            await asyncio.wait_for(asyncio.shield(self._reader), 5)
        except (grpc.RpcError, TimeoutError, asyncio.InvalidStateError):
            self._call.cancel()
        self._reader.cancel()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _SessionOpener:
    """`await client.session(...)` or `async with client.session(...) as s`."""

    def __init__(
        self, client: AsyncClient, open_req: Callable[[], Awaitable[pb.OpenSession]]
    ) -> None:
        self._client = client
        self._open = open_req
        self._session: AsyncSession | None = None

    def __await__(self) -> Any:
        return self._client._open_session(self._open).__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._client._open_session(self._open)
        return self._session

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()


class AsyncClient:
    """A connection to the broker. Unary calls for tools; `session()` for holders.

    `address` is "unix:/path" or "host:port". A TCP address is reached with mutual TLS
    when `tls` (a Tls, or a (ca, cert, key) tuple of PEM paths) or $PASID_BROKER_TLS_CA,
    _CERT and _KEY are given, else in plain text (a broker allows that on loopback with
    --insecure only). `keepalive_seconds`: the ping interval on TCP, where a silent peer
    is otherwise never noticed; a Unix socket is never pinged (a stopped broker is not a
    dead one, and the kernel reports a dead one at once). Raises OSError if a TLS file
    cannot be read.
    """

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
            grpc.aio.insecure_channel(self.target, options=options)
            if t is None
            else grpc.aio.secure_channel(self.target, t.credentials(), options=options)
        )
        self._stub = pb_grpc.PasidBrokerStub(self._channel)
        self._admin = pb_grpc.PasidAdminStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

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
    ) -> _SessionOpener:
        """Open (or with resume_token, resume) a session. On a Unix socket the peer
        handshake runs first (docs/peer-identity.md): the set then dies exactly with this
        process. A sidecar passes `delegate_pid` or `delegate_pidfd` of the process that
        should hold the set (its VMM), or `ticket` one obtained with obtain_ticket
        (e.g. carrying extra fds) instead of the automatic handshake. `reattach_set_id`:
        take back that detached set of this process (or of the delegated one) without
        its token (see held_sets). Raises NotFound for an unknown resume token or a set
        not held by that process, FailedPrecondition if it is attached elsewhere,
        PermissionDenied (delegation refused), Unauthenticated, Unavailable."""

        async def request() -> pb.OpenSession:
            t = ticket or await asyncio.to_thread(
                ticket_for,
                self.target,
                peer_socket=self.peer_socket,
                delegate_pid=delegate_pid,
                delegate_pidfd=delegate_pidfd,
                timeout=self.timeout,
            )
            req = open_request(client, pid, grace_seconds, resume_token, t)
            req.reattach_set_id = reattach_set_id
            return req

        return _SessionOpener(self, request)

    async def held_sets(
        self, *, delegate_pid: int | None = None, delegate_pidfd: int | None = None
    ) -> list[SetView]:
        """As Client.held_sets: the sets held by this process or the delegated one.
        Raises FailedPrecondition (no peer socket), PermissionDenied, Unauthenticated,
        Unavailable."""
        t = await asyncio.to_thread(
            ticket_for,
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
        resp = await self._unary(self._stub.List, pb.ListRequest(ticket=t.ticket))
        return [SetView.from_pb(v) for v in resp.sets]

    async def _open_session(
        self, make_request: Callable[[], Awaitable[pb.OpenSession]]
    ) -> AsyncSession:
        open_req = await make_request()
        call = self._stub.Session(wait_for_ready=False)
        responses = call.__aiter__()
        try:
            await call.write(pb.SessionRequest(tag=0, open=open_req))
            resp = await asyncio.wait_for(anext(responses, None), self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        except TimeoutError:
            call.cancel()
            raise Unavailable(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer to open") from None
        if resp is None:
            raise from_rpc_error(await _finished(call))
        if resp.WhichOneof("result") == "error":
            raise _error_of(resp.error)
        return AsyncSession(call, responses, resp.opened)

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def _identity(self) -> tuple[tuple[str, str], ...]:
        """A per-call ticket: admin calls and Watch are checked against who we are."""
        return await asyncio.to_thread(
            identity_metadata, self.target, peer_socket=self.peer_socket, timeout=self.timeout
        )

    async def _admin_unary(self, method: Any, request: Any) -> Any:
        md = await self._identity()
        try:
            return await method(request, timeout=self.timeout, metadata=md)
        except grpc.RpcError as exc:
            raise from_admin_rpc_error(exc) from None

    async def info(self) -> Info:
        """Backend, pasid_bits, capacity, use and quotas. Raises Unavailable."""
        return Info.from_pb(await self._unary(self._stub.GetInfo, pb.GetInfoRequest()))

    async def alloc(
        self, session_id: int, token: str, min: int, max: int, count: int = 1
    ) -> list[int]:
        """Allocate for a session held elsewhere. Raises NotFound (session/token) and as
        AsyncSession.alloc."""
        ref = pb.SessionRef(session_id=session_id, token=token)
        resp = await self._unary(
            self._stub.Alloc, pb.AllocRequest(session=ref, min=min, max=max, count=count)
        )
        return list(resp.pasids)

    async def free(self, session_id: int, token: str, min: int = 0, max: int = ALL) -> int:
        """Free for a session held elsewhere. Raises NotFound, InvalidRange."""
        ref = pb.SessionRef(session_id=session_id, token=token)
        resp = await self._unary(self._stub.Free, pb.FreeRequest(session=ref, min=min, max=max))
        return int(resp.freed)

    async def list_session(self, session_id: int, token: str) -> SetView:
        """A session's set. Raises NotFound."""
        ref = pb.SessionRef(session_id=session_id, token=token)

        async def page(page_token: str) -> pb.ListResponse:
            req = pb.ListRequest(session=ref, page_size=LIST_PAGE_SIZE, page_token=page_token)
            return await self._unary(self._stub.List, req)  # type: ignore[no-any-return]

        return join_pages(await _pages(page))[0]

    async def pasid_request(
        self, session_id: int, token: str, argsz: int, flags: int, min: int, max: int
    ) -> int:
        """VFIO_IOMMU_PASID_REQUEST for a session held elsewhere; as AsyncSession's."""
        ref = pb.SessionRef(session_id=session_id, token=token)
        req = pb.PasidRequestMessage(session=ref, argsz=argsz, flags=flags, min=min, max=max)
        return int((await self._unary(self._stub.PasidRequest, req)).ret)

    async def watch(
        self, from_revision: int = 0, *, session_id: int = 0, token: str = ""
    ) -> AsyncIterator[Event]:
        """Events from `from_revision` (0: from now on), replayed then live: on the
        admin socket every set's, on the clients' socket only the named session's set.
        Raises OutOfRange (with .oldest_revision) for a compacted revision,
        PermissionDenied without a session on the clients' socket, QuotaExceeded (reason
        LIMIT_EXCEEDED) when too many watchers are open or this one fell behind,
        Unavailable."""
        call = self._stub.Watch(
            _watch_request(from_revision, session_id, token), metadata=await self._identity()
        )
        try:
            async for m in call:
                yield Event.from_pb(m)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    # -- admin (on the admin socket) --------------------------------------------------

    async def list_sets(self, with_ranges: bool = True) -> list[SetView]:
        """Every set with owner, peer, counts, read in pages however many there are.
        Admin socket; else PermissionDenied."""

        async def page(token: str) -> pb.ListResponse:
            req = pb.ListSetsRequest(
                with_ranges=with_ranges, page_size=LIST_PAGE_SIZE, page_token=token
            )
            return await self._admin_unary(self._admin.ListSets, req)  # type: ignore[no-any-return]

        return join_pages(await _pages(page))

    async def revoke(self, set_id: int, reason: str = "") -> int:
        """Destroy a set now; returns how many PASIDs it held. Raises NotFound,
        PermissionDenied."""
        resp = await self._admin_unary(
            self._admin.RevokeSet, pb.RevokeSetRequest(set_id=set_id, reason=reason)
        )
        return int(resp.freed)

    async def set_quotas(
        self, per_set: int, per_client: int = 0, global_: int = 0, set_id: int = 0
    ) -> Info:
        """Change quotas durably (all sets, or one with set_id). Raises NotFound,
        PermissionDenied."""
        q = pb.Quotas(per_set=per_set, per_client=per_client, **{"global": global_})
        resp = await self._admin_unary(
            self._admin.SetQuotas, pb.SetQuotasRequest(set_id=set_id, quotas=q)
        )
        return Info.from_pb(resp)


async def _finished(call: Any) -> grpc.RpcError:
    code = await call.code()
    details = await call.details()
    md = await call.trailing_metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), md or grpc.aio.Metadata(), details)


def _watch_request(from_revision: int, session_id: int, token: str) -> pb.WatchRequest:
    req = pb.WatchRequest(from_revision=from_revision)
    if session_id or token:
        req.session.CopyFrom(pb.SessionRef(session_id=session_id, token=token))
    return req


async def _pages(page: Callable[[str], Awaitable[pb.ListResponse]]) -> list[pb.ListResponse]:
    """Every page of a listing: `page(token)` from the empty token until the broker's
    next_page_token is empty (an older broker sends everything at once, and none)."""
    pages = [await page("")]
    while pages[-1].next_page_token:
        pages.append(await page(pages[-1].next_page_token))
    return pages
