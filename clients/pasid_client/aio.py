"""The asyncio client. A VMM opens one AsyncSession for its lifetime:

async with AsyncClient() as client:
    async with client.session("qemu-vm42") as s:
        pasid, = await s.alloc(1, 1023)
        ...
# leaving the session releases every PASID it still holds

When the broker goes away (a crash, a restart), the session reconnects and resumes its set
by itself (reconnect.py); `on_state_change` tells the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from pasid_client import access
from pasid_client import address as _address
from pasid_client.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    OutcomeUnknown,
    PasidClientError,
    PermissionDenied,
    Revoked,
    SessionLost,
    Unavailable,
    from_admin_rpc_error,
    from_rpc_error,
    from_status_code_int,
    make_error,
    socket_refused,
)
from pasid_client.handshake import (
    Ticket,
    holder_ticket,
    identity_metadata,
    open_delegate,
    open_request,
    peer_socket_path,
    socket_exists,
    ticket_for,
    unix_path,
)
from pasid_client.reconnect import (
    RECONNECT_DEADLINE_SECONDS,
    Backoff,
    HeldPasids,
    SessionState,
    StateCallback,
    StateChange,
    log,
    notify,
    open_retryable,
    ranges_of,
    runs_of,
    stream_end_resumable,
)
from pasid_client.types import (
    ALL,
    LIST_PAGE_SIZE,
    Event,
    Info,
    SetView,
    WithheldView,
    join_pages,
)

# VFIO_IOMMU_FLAG_ALLOC_PASID / _FREE_PASID: how a pasid_request's reply changes the set.
_FLAG_ALLOC, _FLAG_FREE = 1 << 0, 1 << 1
# Requests whose effect a broken stream leaves unknown (a listing changes nothing).
_MUTATING = frozenset({"alloc", "free", "request", "release"})


def _error_of(err: pb.Error) -> PasidClientError:
    return make_error(
        from_status_code_int(err.code), err.message, err.reason, err.quota, err.limit, err.errno
    )


TicketSource = Ticket | Callable[[], Ticket] | None


@dataclasses.dataclass(frozen=True)
class _SessionSpec:
    """What opens a session, and opens it again on every reconnect."""

    client: str
    pid: int | None
    grace_seconds: int
    # The holder's pidfd when delegating (ours when made from delegate_pid): every
    # resume re-proves the same process, never a pid number that may have been reused.
    delegate_pidfd: int | None
    delegate_pid: int | None
    ticket: TicketSource
    on_state_change: StateCallback | None
    deadline: float
    # The first open re-attaches this detached set of the holder (no token).
    reattach_set_id: int = 0


_Stream = tuple[Any, AsyncIterator[pb.SessionResponse]]


class AsyncSession:
    """One ioasid_set, held by this session until it is released (close(), release(),
    leaving its `async with`, or the client's) or its holder process exits.

    Requests may be issued concurrently; they are pipelined on the stream and answered in
    order. Every method raises a PasidClientError subclass on failure.

    When the stream breaks because the broker went away, the session reconnects (backoff
    with jitter) and resumes its set with its token, a fresh peer handshake and the
    PASIDs it holds as witness, within `reconnect_deadline_seconds`. Meanwhile `state` is
    RECONNECTING and new requests wait for the resume. A request already sent when the
    stream broke fails with OutcomeUnknown if it may have changed the set (never sent
    again: an alloc may have committed before a crash); `list()` is asked again. After
    the deadline, or when the broker no longer knows the set, the session is LOST and
    every call raises SessionLost. close() carries its release through such a break
    (its docstring); `kept` says when it could not.
    """

    def __init__(
        self,
        client: AsyncClient,
        spec: _SessionSpec,
        stream: _Stream,
        opened: pb.SessionOpened,
        owned_pidfd: int = -1,
    ) -> None:
        self._client = client
        self._spec = spec
        self._owned_pidfd = owned_pidfd
        self._call, self._responses = stream
        self.session_id: int = opened.session_id
        self.set_id: int = opened.set_id
        self.token: str = opened.token
        self.pasid_bits: int = opened.pasid_bits
        self.quota: int = opened.quota
        self.resumed: bool = opened.resumed
        self.grace_seconds: int = opened.grace_seconds
        # The broker knows this set's holder from the kernel (the handshake ran).
        self.verified: bool = opened.verified
        self.state: SessionState = SessionState.CONNECTED
        # Reconnects that resumed the set since it was opened.
        self.reconnects: int = 0
        self._held = HeldPasids()
        if not opened.resumed:  # a new set: empty, and we know it whole
            self._held.epoch = opened.witness_epoch
        # This set's PASIDs that another set's client claims (a conflict): kept, never
        # dropped from _held (our device may still use them).
        self._contested: set[int] = set()
        self._contest_told(ranges_of(opened.contested))
        # Listings asked while no change of ours was in flight: their reply is the whole
        # set as it is, with its witness epoch (HeldPasids.learn).
        self._clean_lists: set[int] = set()
        self._tags = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[pb.SessionResponse], pb.SessionRequest]] = {}
        self._write_lock = asyncio.Lock()
        self._final: PasidClientError | None = None
        # Set while requests may go out (connected, or ended: then they raise at once).
        self._ready = asyncio.Event()
        self._ready.set()
        self._ended = asyncio.Event()
        self._closed = False  # no new requests
        self._closing = False  # the stream's end is ours (close, release): not resumed
        # close() carries its release through a broken stream (a broker restarting or
        # draining): reconnect, re-attach or resume, release; within the deadline.
        self._releasing = False
        self._clean_end = False  # the last stream ended with the broker's OK
        self._release_answered = False  # ... after the broker answered our half-close
        # close() returned without the broker taking the release: it keeps the set.
        self.kept = False
        self._how_closed = "session closed"  # or released, detached: what later calls say
        self._resync = False  # re-read the set once resumed: an outcome is unknown
        self._supervisor = asyncio.create_task(self._supervise())

    @property
    def held(self) -> list[tuple[int, int]]:
        """The PASIDs this session holds as it last heard from the broker (the witness it
        states on a resume), as inclusive ranges."""
        return self._held.ranges()

    @property
    def contested(self) -> list[tuple[int, int]]:
        """This set's PASIDs that another set's client claims as its own (a conflict the
        broker reported: SessionOpened.contested, or a notice on the stream), as
        inclusive ranges. Still held: the broker withholds one once this set lets go of
        it, and hands it to the claimant only when this session's complete witness no
        longer states it (docs/durability.md)."""
        return runs_of(self._contested)

    @property
    def witness_complete(self) -> bool:
        """Whether `held` is known to be everything the set holds, so that a resume now
        states a complete witness (the broker may then free what it omits: frees it
        acknowledged and lost). False while an outcome is unknown or the set was taken
        back by hand, until a listing with nothing in flight settles it."""
        return self._held.epoch != 0

    # -- the stream, and what happens when it breaks ------------------------------------

    async def _supervise(self) -> None:
        """Read the stream; when it breaks, resume, until the session ends. Closing, a
        stream that ends without the broker's OK to the half-close did not carry the
        release (the broker drained it, or died): resumed, and released again."""
        while True:
            err = await self._read()
            carry = self._releasing and not self._clean_end and stream_end_resumable(err)
            if carry and self._release_answered and err.reason == "STORE":
                # The broker took the release and could not commit it (a full disk): it
                # retries the destroy itself while it runs. Coming back would only race it.
                carry = False
                log.warning(
                    "pasid session %d (set %d): closed; the broker took the release but"
                    " could not commit it yet (%s): it retries it while it runs",
                    self.session_id,
                    self.set_id,
                    err.message,
                )
            if self._closing and not carry:
                self._end(
                    SessionState.CLOSED, Unavailable(grpc.StatusCode.CANCELLED, self._how_closed)
                )
                return
            if not stream_end_resumable(err) or self._spec.deadline <= 0:
                self._lost(err)
                return
            self._ready.clear()
            self._fail_in_flight(err)
            self.state = SessionState.RECONNECTING
            log.info(
                "pasid session %d (set %d): stream broke (%s); reconnecting",
                self.session_id,
                self.set_id,
                err,
            )
            notify(
                self._spec.on_state_change,
                StateChange(self.state, self.set_id, err, releasing=self._releasing),
            )
            if not await self._resume(err):
                return
            if self._releasing:
                await self._half_close()

    async def _read(self) -> PasidClientError:
        """Route replies by tag until the stream ends; how it ended. The iterator, not
        call.read(): read() on a call whose status has arrived raises at once and drops
        replies still buffered (grpc.aio _call.py), so a request the broker answered just
        before ending the stream (SIGTERM drain) would look failed although committed.
        A call cancelled here (close()'s half-close unanswered) ends like a broken one."""
        self._clean_end = False
        self._release_answered = False
        try:
            async for resp in self._responses:
                if resp.tag == 0 and resp.WhichOneof("result") == "notice":
                    self._noticed(resp.notice)
                    continue
                entry = self._waiting.pop(resp.tag, None)
                if entry is None:
                    # Tag 0 `release`: the broker's answer to our half-close.
                    self._release_answered = resp.WhichOneof("result") == "release"
                    continue
                fut, req = entry
                self._track(req, resp)
                if not fut.done():
                    fut.set_result(resp)
            self._clean_end = True
            return Unavailable(grpc.StatusCode.UNAVAILABLE, "session stream ended")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the supervisor itself is cancelled
            # grpc.aio raises CancelledError from a call we cancelled (_call.py).
            return Unavailable(grpc.StatusCode.CANCELLED, "session stream cancelled")
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                # The broker never ends a stream with these: grpc reports them when a
                # write races the broker's end of the stream. The stream is just gone.
                err = Unavailable(grpc.StatusCode.UNAVAILABLE, f"session stream ended ({err})")
            return err

    def _contest_told(self, contested: tuple[tuple[int, int], ...]) -> None:
        """An open's word on this set's contested PASIDs (a resume or re-attach: the
        broker's whole list now; a new set has none)."""
        self._contested = {p for lo, hi in contested for p in range(lo, hi + 1)}
        if contested:
            log.warning(
                "pasid session %d (set %d): PASIDs %s of this set are claimed by another"
                " set's client (a conflict); kept, and withheld by the broker once let go",
                self.session_id,
                self.set_id,
                list(contested),
            )

    def _noticed(self, n: pb.Notice) -> None:
        """The broker told us something unprompted (SessionResponse.notice, tag 0)."""
        ps = ranges_of(n.pasids)
        some = {p for lo, hi in ps for p in range(lo, hi + 1)}
        if n.kind == "pasid_contested":
            # Never dropped from _held, the witness unchanged: our device may use them.
            self._contested |= some
            log.warning(
                "pasid session %d (set %d): set %d's client claims PASIDs %s of this set as"
                " its own (a conflict: %s); kept, and withheld by the broker once let go",
                self.session_id,
                self.set_id,
                n.other_set_id,
                list(ps),
                n.reason,
            )
            change = StateChange(
                self.state, self.set_id, contested=ps, notice=n.kind, other_set_id=n.other_set_id
            )
        elif n.kind == "pasid_conflict_resolved":
            self._contested -= some
            if n.received:
                # Ours again; the set changed where we could not see (its witness epoch
                # with it): list it whole before stating a complete witness.
                self._held.add(some)
                self._held.doubt()
                asyncio.get_running_loop().create_task(self._relist())
            log.warning(
                "pasid session %d (set %d): conflict resolved: PASIDs %s %s set %d",
                self.session_id,
                self.set_id,
                list(ps),
                "handed to this set from" if n.received else "handed from this set to",
                n.other_set_id,
            )
            change = StateChange(
                self.state,
                self.set_id,
                notice=n.kind,
                other_set_id=n.other_set_id,
                handed_over=ps,
                received=n.received,
            )
        else:
            log.info("pasid session %d: notice %r ignored", self.session_id, n.kind)
            return
        notify(self._spec.on_state_change, change)

    def _track(self, req: pb.SessionRequest, resp: pb.SessionResponse) -> None:
        """What an answered request did to the set, for the witness; in reply order, so
        a listing replaces exactly what the requests before it made."""
        kind = resp.WhichOneof("result")
        if kind == "alloc":
            self._held.add(resp.alloc.pasids)
        elif kind == "free":
            self._freed(req.free.min, req.free.max)
        elif kind == "request":
            r = req.request
            if r.flags == _FLAG_ALLOC:
                self._held.add((resp.request.ret,))
            elif r.flags == _FLAG_FREE:
                self._freed(r.min, r.max)
        elif kind == "list":
            clean = resp.tag in self._clean_lists
            self._clean_lists.discard(resp.tag)
            if len(resp.list.sets) == 1 and not req.list.page_token:
                # A whole listing in one page (a page of several says too little).
                self._listed(resp.list, clean)
        elif kind == "release":
            self._held.replace(())
            self._contested.clear()
            self._closing = True  # the broker ends the stream next: not a break
            self._how_closed = "session released"

    def _freed(self, lo: int, hi: int) -> None:
        self._held.free(lo, hi)
        if self._contested:  # not this set's any more: the broker withholds them
            self._contested = {p for p in self._contested if not lo <= p <= hi}

    def _listed(self, page: pb.ListResponse, clean: bool) -> None:
        """A listing of the whole set. Asked while nothing of ours was in flight it is the
        set as it is (with its witness epoch); else it may show a change in flight that
        its commit then undid: taken only while in doubt anyway (a partial witness)."""
        if page.next_page_token:
            return
        ranges, epoch = ranges_of(page.sets[0].ranges), page.sets[0].witness_epoch
        if clean and epoch:
            self._held.learn(ranges, epoch)
        elif not self._held.epoch:
            self._held.replace(ranges)

    def _fail_in_flight(self, err: PasidClientError) -> None:
        waiting, self._waiting = self._waiting, {}
        self._clean_lists.clear()
        for fut, req in waiting.values():
            op = req.WhichOneof("op") or "request"
            if op in _MUTATING:
                self._resync = True
                self._held.doubt()  # it may or may not have changed the set
            if not fut.done():
                fut.set_exception(
                    OutcomeUnknown(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the session's stream broke before the broker answered this {op}"
                        f" ({err.message}); it may or may not have been applied, and is not"
                        " sent again. The session resumes by itself: its listing tells what"
                        " the set holds",
                    )
                )

    async def _resume(self, broke: PasidClientError) -> bool:
        """Open again with the token, within the deadline; False when the session is lost."""
        deadline = time.monotonic() + self._spec.deadline
        backoff = Backoff()
        last = broke
        attempts = 0
        while (remaining := deadline - time.monotonic()) > 0:
            attempts += 1
            try:
                stream, opened = await self._client._open_stream(
                    self._spec,
                    self.token,
                    self._held,
                    # A re-attached session has no token (the broker keeps only its
                    # hash): it re-attaches again, by its holder's ticket.
                    reattach_set_id=0 if self.token else self.set_id,
                    verified=self.verified,
                    ticket=None,
                    within=min(self._client.timeout, remaining),
                )
            except PasidClientError as exc:
                last = exc
                if isinstance(exc, Revoked):  # the stream's ABORTED, had it arrived
                    self._lost(Aborted(grpc.StatusCode.ABORTED, exc.message), gone=True)
                    return False
                if not open_retryable(exc, resuming=True, own_ticket=True):
                    gone = isinstance(exc, NotFound)
                    why = "the broker no longer has its set" if gone else exc
                    self._lost(
                        SessionLost(f"session {self.session_id} not resumed: {why}", exc),
                        attempts,
                        gone=gone,
                    )
                    return False
                await asyncio.sleep(min(backoff.next(), max(deadline - time.monotonic(), 0)))
                continue
            self._resumed(stream, opened, attempts)
            return True
        self._lost(
            SessionLost(
                f"session {self.session_id} not resumed within {self._spec.deadline:g} s"
                f" (reconnect_deadline_seconds): {last.message}",
                last,
            ),
            attempts,
        )
        return False

    def _resumed(self, stream: _Stream, opened: pb.SessionOpened, attempts: int) -> None:
        self._call, self._responses = stream
        self.resumed = True
        self.reconnects += 1
        self.verified = opened.verified
        self.quota = opened.quota
        reclaimed, conflicts = ranges_of(opened.reclaimed), ranges_of(opened.conflicts)
        refreed = ranges_of(opened.refreed)
        for lo, hi in reclaimed:
            self._held.add(range(lo, hi + 1))
        self._held.drop(conflicts)
        self._held.drop(refreed)  # not ours already: the broker agrees again
        self._contest_told(contested := ranges_of(opened.contested))
        complete = opened.witness_complete and opened.witness_epoch == self._held.epoch != 0
        if not complete:
            # Partial (in doubt, an older broker, or the set changed where we could not
            # see): learn the whole set again before stating a complete witness.
            self._held.doubt()
            self._resync = True
        if refreed:
            log.warning(
                "pasid session %d (set %d): the broker had lost this session's frees of"
                " PASIDs %s and still gave them to the set: freed again on its witness",
                self.session_id,
                self.set_id,
                refreed,
            )
        if reclaimed:
            log.warning(
                "pasid session %d (set %d): the broker had lost PASIDs %s and took them back"
                " on this session's word",
                self.session_id,
                self.set_id,
                reclaimed,
            )
        if conflicts:
            log.warning(
                "pasid session %d (set %d): PASIDs %s that this session held now belong to"
                " another set: they are no longer this session's",
                self.session_id,
                self.set_id,
                conflicts,
            )
        self.state = SessionState.RESUMED
        if self._resync and not self._releasing:
            # Before the application's requests (which wait for _ready): the listing is
            # asked with nothing of ours in flight, so it is the whole set as it is.
            self._resync = False
            asyncio.get_running_loop().create_task(self._relist())
        self._ready.set()
        log.info(
            "pasid session %d (set %d): resumed after %d attempt(s)",
            self.session_id,
            self.set_id,
            attempts,
        )
        notify(
            self._spec.on_state_change,
            StateChange(
                self.state,
                self.set_id,
                None,
                attempts,
                reclaimed,
                conflicts,
                refreed,
                complete,
                self._releasing,
                contested=contested,
            ),
        )

    async def _relist(self) -> None:
        """After an unknown outcome or a partial witness: what the broker says the set
        holds becomes what we state on the next resume (a listing reply replaces the
        witness, _track; asked with nothing of ours in flight, it makes it complete)."""
        with contextlib.suppress(PasidClientError):
            await self.list()

    def _lost(self, err: PasidClientError, attempts: int = 0, *, gone: bool = False) -> None:
        """The set cannot be resumed (`err`; `gone`: the broker has it no more). The
        session is LOST; or, being closed, CLOSED, with the release either done already
        (gone) or not delivered: then the broker keeps the set (`kept`), says the log."""
        if not self._releasing:
            self._end(SessionState.LOST, err, attempts)
            return
        if not gone:
            self._keep(err.message)
        self._end(SessionState.CLOSED, Unavailable(grpc.StatusCode.CANCELLED, self._how_closed))

    def _keep(self, why: str) -> None:
        """close() gives up on its release: the broker keeps the set as after any broken
        stream (a verified holder's until it exits; an anonymous one for its grace)."""
        if self.kept:
            return
        self.kept = True
        until = "its holder process exits" if self.verified else "its grace ends"
        log.warning(
            "pasid session %d (set %d): closed without the broker confirming its release"
            " (%s); unless the release landed, the broker keeps the set until %s",
            self.session_id,
            self.set_id,
            why,
            until,
        )

    def _end(self, state: SessionState, err: PasidClientError, attempts: int = 0) -> None:
        """The session's last state: fail what waits, wake what waits for a resume."""
        if self.state in (SessionState.LOST, SessionState.CLOSED):
            return
        self.state = state
        self._final = err
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        for fut, _ in waiting.values():
            if not fut.done():
                fut.set_exception(err)
        self._ready.set()
        self._ended.set()
        self._client._sessions.discard(self)
        if self._owned_pidfd >= 0:
            os.close(self._owned_pidfd)
            self._owned_pidfd = -1
        if state is SessionState.LOST:
            log.warning("pasid session %d (set %d): lost: %s", self.session_id, self.set_id, err)
            notify(self._spec.on_state_change, StateChange(state, self.set_id, err, attempts))

    # -- requests -------------------------------------------------------------------------

    async def _request(self, **op: Any) -> pb.SessionResponse:
        if self._closed:
            raise self._final or Unavailable(grpc.StatusCode.UNAVAILABLE, "session is closed")
        if not self._ready.is_set():
            await self._ready.wait()  # a reconnect: bounded by its deadline
        if self._closed:
            raise self._final or Unavailable(grpc.StatusCode.UNAVAILABLE, "session is closed")
        tag = next(self._tags)
        req = pb.SessionRequest(tag=tag, **op)
        fut: asyncio.Future[pb.SessionResponse] = asyncio.get_running_loop().create_future()
        if "list" in op and not any(
            r.WhichOneof("op") in _MUTATING for _, r in self._waiting.values()
        ):
            self._clean_lists.add(tag)
        self._waiting[tag] = (fut, req)
        call = self._call
        try:
            async with self._write_lock:
                await call.write(req)
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            # The stream ended under the write: the supervisor fails or resumes what
            # waits, and says how the stream ended.
            pass
        resp = await fut
        if resp.WhichOneof("result") == "error":
            raise _error_of(resp.error)
        return resp

    async def alloc(
        self, min: int = 1, max: int | None = None, count: int = 1, device: str = ""
    ) -> list[int]:
        """The `count` lowest free PASIDs in [min, max] (max defaults to the top of the
        namespace), attached to the delegated `device` if named (iommufd backend).
        Raises InvalidRange, ResourceExhausted, QuotaExceeded, Unavailable; OutcomeUnknown
        if the stream broke before the answer; SessionLost, Aborted once the session is."""
        hi = (1 << self.pasid_bits) - 1 if max is None else max
        req = pb.AllocRequest(min=min, max=hi, count=count, device=device)
        resp = await self._request(alloc=req)
        return list(resp.alloc.pasids)

    async def free(self, min: int = 0, max: int = ALL) -> int:
        """Free this session's PASIDs in [min, max]; returns how many. Raises InvalidRange
        (min > max), Unavailable, OutcomeUnknown, SessionLost, Aborted."""
        resp = await self._request(free=pb.FreeRequest(min=min, max=max))
        return resp.free.freed

    async def pasid_request(self, argsz: int, flags: int, min: int, max: int) -> int:
        """VFIO_IOMMU_PASID_REQUEST on this session: the PASID for ALLOC, 0 for FREE. Raises
        as the ioctl fails, with `.errno` set (InvalidArgument EINVAL, ResourceExhausted
        ENOSPC, QuotaExceeded EDQUOT); OutcomeUnknown, SessionLost, Aborted as alloc."""
        req = pb.PasidRequestMessage(argsz=argsz, flags=flags, min=min, max=max)
        return int((await self._request(request=req)).request.ret)

    async def list(self) -> SetView:
        """This session's set, as the broker has it (read in pages, however fragmented).
        Asked again (once resumed) if the stream breaks first: a listing changes nothing.
        Raises Unavailable, SessionLost, Aborted."""

        async def page(token: str) -> pb.ListResponse:
            req = pb.ListRequest(page_size=LIST_PAGE_SIZE, page_token=token)
            return (await self._request(list=req)).list

        try:
            return join_pages(await _pages(page))[0]
        except OutcomeUnknown:
            return join_pages(await _pages(page))[0]

    async def detach(self) -> None:
        """End this stream without releasing the set (a cancel, not a half-close), and
        stop reconnecting: a verified holder's set lives on, detached, until that process
        exits or is re-attached (`reattach_set_id`); an anonymous one waits out its
        grace. What a sidecar that stops to be restarted does; close() releases instead.
        Raises nothing."""
        if self.state in (SessionState.LOST, SessionState.CLOSED):
            return
        self._closed = True
        self._closing = True
        self._how_closed = "session detached"
        self._call.cancel()
        self._supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._supervisor
        self._end(SessionState.CLOSED, Unavailable(grpc.StatusCode.CANCELLED, self._how_closed))

    async def release(self) -> int:
        """Release the set now, whatever its grace (ReleaseRequest: the seed's close of
        the fd); returns how many PASIDs it held. The session ends. Raises
        InvalidArgument from a broker that predates ReleaseRequest (the session stays),
        OutcomeUnknown if the stream broke first (if the release landed, the resume finds
        no set and the session is lost: released), SessionLost, Aborted."""
        resp = await self._request(release=pb.ReleaseRequest())
        self._closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._supervisor), self._client.timeout)
        self._end(SessionState.CLOSED, Unavailable(grpc.StatusCode.CANCELLED, self._how_closed))
        return resp.release.freed

    async def wait_ended(self) -> PasidClientError:
        """Wait until the session ends for good and return how: Aborted (the broker took
        the set: revoked, its holder exited), SessionLost (not resumed in time, or the set
        was gone), or the error of a close(). Reconnects do not end it. Raises nothing."""
        await self._ended.wait()
        assert self._final is not None
        return self._final

    async def close(self) -> None:
        """Release the session: half-close its stream and wait for the broker to end it.
        The broker then ends the set: the seed's close of the fd (a set with a grace may
        wait for a resume, docs/peer-identity.md). The release is not lost to a broker
        that is restarting or draining: closed while reconnecting, or when the stream
        ends without the broker's OK (a drain, a crash), the session goes on
        reconnecting, resumes or re-attaches its set as a reconnect does, and releases
        it then. It gives up after `reconnect_deadline_seconds` (plus the client's
        timeout for the broker's answer): then `kept` is True and a warning says that
        the broker keeps the set until its holder exits (an anonymous set: its grace).
        Raises nothing."""
        if self.state in (SessionState.LOST, SessionState.CLOSED):
            return
        bound = self._client.timeout + max(self._spec.deadline, 0.0)
        if self._releasing:  # closed already (the session's, then its client's close)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), bound)
            return
        self._closed = True
        self._closing = True
        self._releasing = True
        self._ready.set()  # what waits for a resume raises now: the session is closed
        if self.state is SessionState.RECONNECTING:
            log.info(
                "pasid session %d (set %d): closed while reconnecting; releasing the set"
                " once the broker is back (within %g s)",
                self.session_id,
                self.set_id,
                self._spec.deadline,
            )
        try:
            async with asyncio.timeout(bound):
                if self.state in (SessionState.CONNECTED, SessionState.RESUMED):
                    await self._half_close()
                await asyncio.shield(self._supervisor)
        except TimeoutError:
            self._keep(f"no broker to take it within {bound:g} s")
        finally:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            if not self._clean_end:
                self._call.cancel()
            self._end(SessionState.CLOSED, Unavailable(grpc.StatusCode.CANCELLED, self._how_closed))

    async def _half_close(self) -> None:
        """Send the release: half-close the stream; the broker's end of it is its answer
        (read by the supervisor). A half-close grpc cannot send, or one the broker does
        not answer within the client's timeout (a stalled transport, a frozen broker),
        cancels the stream: a broken one, which the supervisor resumes and releases."""
        call = self._call
        try:
            async with asyncio.timeout(self._client.timeout):
                await call.done_writing()
        except (grpc.RpcError, TimeoutError, asyncio.InvalidStateError, grpc.aio.UsageError):
            call.cancel()
            return
        asyncio.get_running_loop().call_later(self._client.timeout, call.cancel)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _SessionOpener:
    """`await client.session(...)` or `async with client.session(...) as s`."""

    def __init__(self, client: AsyncClient, spec: _SessionSpec, resume_token: str) -> None:
        self._client = client
        self._spec = spec
        self._resume_token = resume_token
        self._session: AsyncSession | None = None

    def __await__(self) -> Any:
        return self._client._open_session(self._spec, self._resume_token).__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._client._open_session(self._spec, self._resume_token)
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
    dead one, and the kernel reports a dead one at once). `reconnect_deadline_seconds`
    bounds how long a session reconnects after its broker went away, and how long
    opening one waits for a broker that is starting or recovering (0: never retry).
    Leaving `async with` (close()) releases every session opened through this client.
    Raises OSError if a TLS file cannot be read.
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
        reconnect_deadline_seconds: float = RECONNECT_DEADLINE_SECONDS,
    ) -> None:
        self.target = _address.resolve(address, socket)
        self.timeout = timeout
        self.reconnect_deadline_seconds = reconnect_deadline_seconds
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
        self._sessions: set[AsyncSession] = set()

    async def close(self) -> None:
        """Release every session opened through this client (each one's close()), then
        close the channel. Raises nothing."""
        await asyncio.gather(*(s.close() for s in list(self._sessions)), return_exceptions=True)
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
        ticket: TicketSource = None,
        on_state_change: StateCallback | None = None,
        reconnect_deadline_seconds: float | None = None,
        reattach_set_id: int = 0,
    ) -> _SessionOpener:
        """Open (or with resume_token, resume) a session. On a Unix socket the peer
        handshake runs first (docs/peer-identity.md): the set then dies exactly with this
        process. A sidecar passes `delegate_pid` (the library keeps a pidfd on it for
        the session's life) or `delegate_pidfd` (keep it open as long) of the process
        that should hold the set (its VMM). `ticket`: one obtained with obtain_ticket
        (e.g. carrying extra fds) instead of the automatic handshake; a callable making
        one is called again on every reconnect, a plain Ticket is used once (reconnects
        then handshake as this process). `reattach_set_id`: take back that detached set
        of this process (or of the delegated one) without its token (see held_sets).

        `on_state_change(StateChange)` is called (on the event loop) when the stream
        breaks (RECONNECTING), when the set is back (RESUMED, with what the broker
        reclaimed or reports in conflict) and when the session is LOST.
        `reconnect_deadline_seconds` (default: the client's) bounds both the reconnects
        and this open's wait for a broker that is starting or recovering.

        Raises NotFound for an unknown resume token or delegate_pid, or a set not held by
        that process; InvalidArgument for a delegate_pid that is a thread's id;
        FailedPrecondition
        if the token's session is attached elsewhere, PermissionDenied (delegation
        refused), Unauthenticated, Unavailable (no broker within the deadline),
        QuotaExceeded (a limit)."""
        deadline = (
            self.reconnect_deadline_seconds
            if reconnect_deadline_seconds is None
            else reconnect_deadline_seconds
        )
        spec = _SessionSpec(
            client,
            pid,
            grace_seconds,
            delegate_pidfd,
            delegate_pid,
            ticket,
            on_state_change,
            deadline,
            reattach_set_id,
        )
        return _SessionOpener(self, spec, resume_token)

    async def held_sets(
        self, *, delegate_pid: int | None = None, delegate_pidfd: int | None = None
    ) -> list[SetView]:
        """As Client.held_sets: the sets held by this process or the delegated one.
        Raises FailedPrecondition (no peer socket), PermissionDenied, Unauthenticated,
        Unavailable."""
        t = await asyncio.to_thread(
            holder_ticket,
            self.target,
            peer_socket=self.peer_socket,
            delegate_pid=delegate_pid,
            delegate_pidfd=delegate_pidfd,
            timeout=self.timeout,
        )
        resp = await self._unary(self._stub.List, pb.ListRequest(ticket=t.ticket))
        return [SetView.from_pb(v) for v in resp.sets]

    async def _open_session(self, spec: _SessionSpec, resume_token: str) -> AsyncSession:
        """Open, waiting (within the deadline) for a broker that is not there yet."""
        owned = -1
        if spec.delegate_pid is not None:
            owned = open_delegate(spec.delegate_pid)
            spec = dataclasses.replace(spec, delegate_pidfd=owned, delegate_pid=None)
        given = spec.ticket if isinstance(spec.ticket, Ticket) else None
        deadline = time.monotonic() + spec.deadline
        backoff = Backoff()
        within = self.timeout  # the first try has the whole call timeout, as ever
        try:
            while True:
                try:
                    stream, opened = await self._open_stream(
                        spec,
                        resume_token,
                        None,
                        reattach_set_id=spec.reattach_set_id,
                        verified=None,
                        ticket=given,
                        within=within,
                    )
                    break
                except PasidClientError as exc:
                    if (
                        not open_retryable(exc, resuming=False, own_ticket=given is None)
                        or time.monotonic() >= deadline
                    ):
                        raise
                await asyncio.sleep(min(backoff.next(), max(deadline - time.monotonic(), 0)))
                within = max(min(self.timeout, deadline - time.monotonic()), 0.1)
        except BaseException:
            if owned >= 0:
                os.close(owned)
            raise
        s = AsyncSession(self, spec, stream, opened, owned)
        self._sessions.add(s)
        if resume_token or spec.reattach_set_id:
            # Taken back by hand: what the set holds is the broker's word until we hear more.
            with contextlib.suppress(PasidClientError):
                await s.list()
        return s

    async def _open_stream(
        self,
        spec: _SessionSpec,
        resume_token: str,
        held: HeldPasids | None,
        *,
        reattach_set_id: int = 0,
        verified: bool | None,
        ticket: Ticket | None,
        within: float,
    ) -> tuple[_Stream, pb.SessionOpened]:
        """One open: handshake, OpenSession (with the witness when resuming), its answer.
        Waits for the channel to be ready (gRPC wait-for-ready), `within` seconds at most."""
        t = ticket or await self._ticket(spec, verified)
        req = open_request(spec.client, spec.pid, spec.grace_seconds, resume_token, t)
        req.reattach_set_id = reattach_set_id
        if held is not None:
            held.witness(req)
        call = self._stub.Session(wait_for_ready=True)
        responses = call.__aiter__()
        try:
            async with asyncio.timeout(within):
                await call.write(pb.SessionRequest(tag=0, open=req))
                resp = await anext(responses, None)
        except grpc.RpcError as exc:
            call.cancel()
            raise from_rpc_error(exc) from None
        except TimeoutError:
            call.cancel()
            # wait-for-ready waits out any connect failure, a refused one too.
            path = unix_path(self.target)
            if path is not None and access.probe_refused(path):
                raise socket_refused(path) from None
            raise Unavailable(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer to the open from {self.target} within {within:.3g} s",
            ) from None
        except BaseException:
            call.cancel()
            raise
        if resp is None:
            raise from_rpc_error(await _finished(call))
        if resp.WhichOneof("result") == "error":
            call.cancel()
            raise _error_of(resp.error)
        return (call, responses), resp.opened

    async def _ticket(self, spec: _SessionSpec, verified: bool | None) -> Ticket | None:
        """A fresh ticket for an open. `verified`: whether the session being resumed was
        (None for a first open). A Unix broker whose peer socket is missing is starting
        (it binds it just after the gRPC socket) unless it serves without one."""
        if callable(spec.ticket) and not isinstance(spec.ticket, Ticket):
            return await asyncio.to_thread(spec.ticket)
        missing = _missing_socket(self.target, self.peer_socket)
        if missing is not None:
            peer, sock = missing
            if verified:
                raise Unavailable(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no peer socket at {peer} yet: the holder must be proved again to resume",
                )
            if sock is not None:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"no broker socket at {sock}")
            if not await self._serving():
                raise Unavailable(
                    grpc.StatusCode.UNAVAILABLE, f"broker at {self.target} not serving yet"
                )
        try:
            t = await asyncio.to_thread(
                ticket_for,
                self.target,
                peer_socket=self.peer_socket,
                delegate_pidfd=spec.delegate_pidfd,
                timeout=self.timeout,
            )
        except FailedPrecondition:
            if not verified or _missing_socket(self.target, self.peer_socket) is None:
                raise
            # A delegated resume found no peer socket: it went between the two looks (a
            # broker stopping after SIGTERM removes it), a broker to wait for, as above.
            raise Unavailable(
                grpc.StatusCode.UNAVAILABLE, "no peer socket to handshake on yet"
            ) from None
        if t is None and verified:
            # The peer socket went between the two looks (a broker replacing it as it
            # starts): without a ticket the resume would be anonymous, and refused.
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "no peer socket to handshake on")
        return t

    async def _serving(self) -> bool:
        try:
            resp = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=min(2.0, self.timeout)
            )
        except grpc.RpcError as exc:
            if isinstance(err := from_rpc_error(exc), PermissionDenied):
                raise err from None  # a socket we may not connect to: final
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

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

    async def list_withheld(self) -> list[WithheldView]:
        """The PASIDs the broker withholds (a failed kernel call at a set's end, a
        witness's claim) and what keeps each. Admin socket; else PermissionDenied."""
        resp = await self._admin_unary(self._admin.ListWithheld, pb.ListWithheldRequest())
        return [WithheldView.from_pb(m) for m in resp.pasids]

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


def _missing_socket(target: str, peer_socket: str | None) -> tuple[str, str | None] | None:
    """For a Unix target whose peer socket does not exist: (its path, the gRPC socket's
    path if that is missing too, else None). None when the peer socket is there, or TCP.
    Raises PermissionDenied (SOCKET_ACCESS) where a directory above it is closed to us."""
    peer = peer_socket_path(target, peer_socket)
    if peer is None or socket_exists(peer):
        return None
    sock = unix_path(target)
    return peer, sock if sock is not None and not socket_exists(sock) else None


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
