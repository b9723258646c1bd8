"""The peer socket: one SOCK_SEQPACKET exchange that turns kernel credentials into a ticket.

grpcio never shows the broker a peer's socket, so identity is learned here, on a socket the
broker accepts itself. Wire format (docs/peer-identity.md): the client sends
one JSON object, optionally with SCM_RIGHTS fds whose roles `"fds"` lists in order; the
broker answers one JSON object with a one-time ticket, or with a code and an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.peer import credentials as cred
from broker.peer.tickets import DelegatedFd, PeerIdentity, TicketBook, TooManyTickets

log = logging.getLogger("pasid_broker.peer")

VERSION = 1
MAX_MESSAGE = 4096
MAX_FDS = 16
# A handshake is one message each way, sent at once by a client that connected: a peer
# that has not been answered within this is dropped (with DEADLINE_EXCEEDED if it still
# listens), so a connection that never sends holds its slot no longer than this.
HANDSHAKE_SECONDS = 2.0
# A connection whose message is there at accept (a client sends it right after connect)
# is answered then and there. One that has sent nothing yet waits, in one of at most
# MAX_PER_UID slots per uid (SO_PEERCRED at accept) and MAX_CONCURRENT in all; one over
# either is answered RESOURCE_EXHAUSTED at once, never queued: the accept loop never
# waits for a slot, so no uid can fill the listen backlog for the others (issue 20: 193
# connections that never sent used to stop every other uid's handshake).
MAX_PER_UID = 32
MAX_CONCURRENT = 512
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
ACCEPT_BATCH = 64  # connections accepted (and answered) per wake-up before the loop yields
MAX_DEPTH = 4  # {"devices": [{...}]} is 3 deep; json.loads recurses per level

# A check for an extra fd role ("iommufd", "device": issue 14). It gets the fd, the
# request object and the identity's facts, and raises Refused to turn the client away;
# accepted fds travel with the ticket (PeerIdentity.fds) to the session that takes it.
FdCheck = Callable[[int, Mapping[str, Any], cred.ProcessFacts], None]


class Refused(Exception):
    """The handshake's answer is no: `code` is a gRPC status name, `message` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Request:
    claim: int | None
    roles: tuple[str, ...]
    devices: tuple[dict[str, Any], ...]
    raw: Mapping[str, Any]


def decode(data: bytes) -> Any:
    """The message as JSON, parsed only once it is known to be shallow.

    json.loads recurses once per nesting level: `b"[" * 4000` raised RecursionError, which
    nothing caught, and the fds that came with it leaked (issue 20). The nesting is
    counted first, in one pass over at most MAX_MESSAGE bytes, so the parser never sees a
    deep message; NaN and Infinity, which no field takes, are refused too.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused("INVALID_ARGUMENT", f"handshake is not UTF-8: {exc.reason}") from None
    if _nesting(text) > MAX_DEPTH:
        raise Refused("INVALID_ARGUMENT", f"handshake nests deeper than {MAX_DEPTH} levels of JSON")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: unreachable, kept as a net
        raise Refused(
            "INVALID_ARGUMENT", f"handshake is not a UTF-8 JSON object: {_clip(str(exc))}"
        ) from None


def _nesting(text: str) -> int:
    """The deepest nesting of [ and { outside strings (an unbalanced text counts too)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    break
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a value any handshake field takes")


def _clip(text: str, limit: int = 80) -> str:
    """A client-supplied value as a refusal quotes it: never more than `limit` chars."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def parse_request(data: bytes, nfds: int, roles_known: frozenset[str]) -> _Request:
    """Decode and check the client's message against the fds that came with it."""
    msg = decode(data)
    if not isinstance(msg, dict):
        raise Refused("INVALID_ARGUMENT", "handshake must be a JSON object")
    if msg.get("v") != VERSION:
        raise Refused(
            "INVALID_ARGUMENT",
            f"handshake version {_clip(repr(msg.get('v')))}; this broker speaks 1",
        )
    claim = msg.get("pid")
    if claim is not None and (not isinstance(claim, int) or isinstance(claim, bool) or claim <= 0):
        raise Refused(
            "INVALID_ARGUMENT", f"pid must be a positive integer, got {_clip(repr(claim))}"
        )
    roles = msg.get("fds", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Refused("INVALID_ARGUMENT", "fds must be a list of role names")
    if len(roles) != nfds:
        raise Refused(
            "INVALID_ARGUMENT", f"fds names {len(roles)} roles but {nfds} fds were attached"
        )
    for r in roles:
        if r not in roles_known:
            raise Refused(
                "INVALID_ARGUMENT",
                f"fd role {_clip(repr(r))} is not accepted by this broker"
                f" (accepted: {sorted(roles_known)})",
            )
    if roles.count("pidfd") > 1:
        raise Refused("INVALID_ARGUMENT", "at most one pidfd may be delegated")
    devices = msg.get("devices", [])
    if not isinstance(devices, list) or not all(_is_device(d) for d in devices):
        raise Refused(
            "INVALID_ARGUMENT",
            'devices must be a list of {"name": str, "pt_id": int, "dev_id": int}',
        )
    return _Request(claim, tuple(roles), tuple(devices), msg)


def _is_device(d: object) -> bool:
    return (
        isinstance(d, dict)
        and isinstance(d.get("name"), str)
        and all(isinstance(d.get(k), int) for k in ("pt_id", "dev_id"))
    )


def identify(
    conn: socket.socket,
    accepted_ticks: int,
    request: _Request,
    fds: list[int],
    fd_checks: Mapping[str, FdCheck],
) -> PeerIdentity:
    """The holder the kernel vouches for. Takes ownership of `fds` (closes them on error)."""
    owned = list(fds)
    peer_fd = -1
    try:
        c = cred.peer_cred(conn)
        peer_fd = cred.peer_pidfd(conn, c, accepted_ticks)
        me = cred.process_facts(peer_fd)
        if request.claim is not None and request.claim not in (me.ns_pid, me.pid):
            raise Refused(
                "PERMISSION_DENIED",
                f"declared pid {request.claim} is not this process: the kernel says pid"
                f" {me.pid} (pid {me.ns_pid} in its own namespace)",
            )
        holder_fd, holder, delegated_by = peer_fd, me, None
        uid, gid = c.uid, c.gid
        extra: list[DelegatedFd] = []
        for role, fd in zip(request.roles, fds, strict=True):
            if role == "pidfd":
                if not cred.is_pidfd(fd):
                    raise Refused("INVALID_ARGUMENT", "the fd sent as pidfd is not a pidfd")
                target = cred.process_facts(fd)
                if target.is_thread or cred.is_thread_pidfd(fd):
                    # Its pidfd reports the thread's exit: the set would die with a thread
                    # while its process lives. Refused rather than resolved to the leader,
                    # which would open a process by number.
                    raise Refused(
                        "INVALID_ARGUMENT",
                        f"the pidfd names thread {target.pid} of process {target.tgid}, not a"
                        f" process: a set follows a process; delegate process {target.tgid}"
                        " with a pidfd opened without PIDFD_THREAD",
                    )
                if not cred.may_delegate(c.uid, target):
                    held = ", ".join(str(u) for u in sorted(target.uids))
                    raise Refused(
                        "PERMISSION_DENIED",
                        f"uid {c.uid} may not delegate process {target.pid}: it holds uid(s)"
                        f" {held} (real, effective, saved, fs); only root may delegate a"
                        " process that holds a uid other than the caller's",
                    )
                # The holder is the process; the identity (quotas, admin, listings,
                # tickets) stays the caller's: a delegate never lends its uid.
                holder_fd, holder, delegated_by = fd, target, (c.pid, c.uid)
            else:
                fd_checks[role](fd, request.raw, me)
                extra.append(DelegatedFd(role, fd))
        if holder_fd != peer_fd:
            os.close(peer_fd)
            peer_fd = -1
        identity = PeerIdentity(
            pid=holder.pid,
            uid=uid,
            gid=gid,
            ns_pid=holder.ns_pid,
            start_time=holder.start_time,
            pidfd=holder_fd,
            delegated_by=delegated_by,
            fds=tuple(extra),
            devices=request.devices,
        )
        owned, peer_fd = [], -1  # the identity owns them now
        return identity
    except cred.CredentialError as exc:
        raise Refused(exc.code, exc.message) from None
    finally:
        for fd in owned + ([peer_fd] if peer_fd >= 0 else []):
            with contextlib.suppress(OSError):
                os.close(fd)


def _recv(conn: socket.socket) -> tuple[bytes, list[int], int]:
    data, anc, flags, _ = conn.recvmsg(
        MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds.extend(int.from_bytes(payload[i * 4 : i * 4 + 4], "little") for i in range(n))
    return data, fds, flags


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until `sock` is readable (or hung up)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _refusal(code: str, error: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": error}


def _send_now(conn: socket.socket, reply: Mapping[str, Any]) -> None:
    """Send a reply without waiting: a fresh connection's buffer takes one small
    message, and a peer that hung up (or never reads) gets nothing more. Best effort."""
    with contextlib.suppress(OSError):
        conn.send(json.dumps(reply).encode(), socket.MSG_DONTWAIT)


class PeerServer:
    """Accepts handshakes on `path` and issues tickets into `book`."""

    def __init__(
        self,
        path: str,
        book: TicketBook,
        *,
        mode: int = 0o660,
        fd_checks: Mapping[str, FdCheck] | None = None,
        deadline: float = HANDSHAKE_SECONDS,
        max_per_uid: int = MAX_PER_UID,
        max_concurrent: int = MAX_CONCURRENT,
    ) -> None:
        self.path = path
        self.book = book
        self.mode = mode
        # Roles besides "pidfd" are accepted only where a check for them is registered.
        self.fd_checks: dict[str, FdCheck] = dict(fd_checks or {})
        self.deadline = deadline
        self.max_per_uid = max_per_uid
        self.max_concurrent = max_concurrent
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._in_progress: dict[int, int] = {}  # uid -> connections waiting for a message
        self._busy_total = 0
        self.refusals = RefusalLog()
        # Set by refuse_all (the broker draining): why every handshake is now refused.
        self._stopping: str | None = None

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(("pidfd", *self.fd_checks))

    def start(self) -> None:
        """Bind (replacing a stale socket file), listen and serve in the background."""
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.setblocking(False)
        s.bind(self.path)
        os.chmod(self.path, self.mode)
        s.listen(BACKLOG)
        self._sock = s
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._accept_loop(s))
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close the fds of tickets nobody used, soon after they expire, even when no
        handshake or open comes along to prune the book."""
        while True:
            await asyncio.sleep(max(self.book.ttl / 2, 0.5))
            self.book.expire()

    def refuse_all(self, why: str) -> None:
        """Answer every handshake from now on UNAVAILABLE with `why` (the broker drains
        after SIGTERM): a ticket issued now would die with this process, and the open it
        is for is refused anyway. The client library retries UNAVAILABLE, so its
        reconnect hands over to the restarted broker as it does for the gRPC socket's
        refusal. The socket stays bound: a missing one would read as a broker without
        the handshake, or one still starting."""
        self._stopping = why

    async def close(self) -> None:
        for task in (self._task, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for t in list(self._conns):
            t.cancel()
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.book.close()

    async def _accept_loop(self, s: socket.socket) -> None:
        """Accept whatever is queued, in batches, and never wait for a free slot: a
        connection over its uid's share (or the total) is refused at once."""
        loop = asyncio.get_running_loop()
        while True:
            await _readable(loop, s)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # EMFILE and the like: log, let fds free up
                    log.warning("peer socket accept failed: %s", exc)
                    await asyncio.sleep(0.1)
                    break
                self._admit(loop, conn, cred.boot_ticks())
            await asyncio.sleep(0)  # a full batch: let the handshakes in progress run

    def _admit(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, accepted: int) -> None:
        """Answer `conn` now if its message is there (a client sends it right after
        connect); else let it wait, if its uid has a waiting slot, or refuse it at once.
        Kept cheap: a connect flood is paid for here, per connection."""
        try:
            conn.setblocking(False)
            uid = cred.peer_cred(conn).uid
            data, fds, flags = _recv(conn)
        except BlockingIOError:
            self._wait_for_message(loop, conn, uid, accepted)
            return
        except OSError:
            conn.close()
            return
        try:
            reply = self.answer(conn, accepted, data, fds, flags, uid)  # owns the fds
            _send_now(conn, reply)
        finally:
            conn.close()

    def _wait_for_message(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, uid: int, accepted: int
    ) -> None:
        busy = self._in_progress.get(uid, 0)
        if busy >= self.max_per_uid or self._busy_total >= self.max_concurrent:
            why = (
                f"uid {uid} has {busy} connections waiting to send a handshake (at most"
                f" {self.max_per_uid})"
                if busy >= self.max_per_uid
                else f"{self.max_concurrent} connections waiting to send a handshake"
            )
            _send_now(conn, _refusal("RESOURCE_EXHAUSTED", f"{why}; try again"))
            conn.close()
            self.refusals.report(uid, "RESOURCE_EXHAUSTED", why)
            return
        self._in_progress[uid] = busy + 1
        self._busy_total += 1
        t = loop.create_task(self._serve(conn, uid, accepted))
        self._conns.add(t)
        t.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket, uid: int, accepted_ticks: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.deadline):
                await _readable(loop, conn)
                data, fds, flags = _recv(conn)
                # From here `answer` owns the fds: nothing may come between (no await).
                reply = self.answer(conn, accepted_ticks, data, fds, flags, uid)
                await loop.sock_sendall(conn, json.dumps(reply).encode())
        except TimeoutError:
            why = f"no handshake within {self.deadline:g} s of connecting"
            _send_now(conn, _refusal("DEADLINE_EXCEEDED", why))
            self.refusals.report(uid, "DEADLINE_EXCEEDED", why)
        except OSError:
            pass  # a vanished peer: nothing to answer
        finally:
            conn.close()
            self._busy_total -= 1
            left = self._in_progress.get(uid, 1) - 1
            if left > 0:
                self._in_progress[uid] = left
            else:
                self._in_progress.pop(uid, None)

    def answer(
        self,
        conn: socket.socket,
        accepted_ticks: int,
        data: bytes,
        fds: list[int],
        flags: int,
        uid: int | None = None,
    ) -> dict[str, Any]:
        """The reply to one message: a ticket, or why not.

        Owns `fds` on every path: the ticket adopts them, or they are closed, whatever
        the message was (issue 20: a parse error that escaped leaked all 16).
        """
        pending = list(fds)  # closed below unless handed on
        try:
            if self._stopping is not None:
                raise Refused("UNAVAILABLE", self._stopping)
            if flags & socket.MSG_CTRUNC:
                raise Refused("INVALID_ARGUMENT", f"at most {MAX_FDS} fds per handshake")
            if flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE:
                raise Refused("INVALID_ARGUMENT", f"handshake longer than {MAX_MESSAGE} bytes")
            if not data:
                raise Refused("INVALID_ARGUMENT", "empty handshake")
            request = parse_request(data, len(fds), self.roles)
            pending = []  # identify adopts them into the identity or closes them
            identity = identify(conn, accepted_ticks, request, fds, self.fd_checks)
            try:
                ticket = self.book.issue(identity)
            except TooManyTickets as exc:
                identity.close()
                raise Refused("RESOURCE_EXHAUSTED", str(exc)) from None
            except BaseException:
                identity.close()
                raise
        except Refused as exc:
            self.refusals.report(uid, exc.code, exc.message)
            return {"ok": False, "code": exc.code, "error": exc.message}
        except Exception as exc:  # a bug in a check: answered, logged (rate-limited), held
            self.refusals.report(uid, "INTERNAL", f"{type(exc).__name__}: {exc}", exc)
            return {
                "ok": False,
                "code": "INTERNAL",
                "error": "the broker failed to check this handshake (logged); try again",
            }
        finally:
            for fd in pending:
                with contextlib.suppress(OSError):
                    os.close(fd)
        log.debug(
            "ticket issued",
            extra={"pid": identity.pid, "uid": identity.uid, "ns_pid": identity.ns_pid},
        )
        return {
            "ok": True,
            "ticket": ticket,
            "expires_in": self.book.ttl,
            "pid": identity.pid,
            "uid": identity.uid,
            "gid": identity.gid,
            "ns_pid": identity.ns_pid,
            "delegated": identity.delegated,
        }


class RefusalLog:
    """Refused handshakes, logged as one line per uid per `interval` seconds with how
    many were not logged since: a loop of bad handshakes cannot flood the log (the model
    is broker/service/wire.py's MalformedRequests)."""

    _MAX_KEYS = 4096

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._interval = interval
        self._clock = clock
        self._last: dict[int | None, tuple[float, int]] = {}  # uid -> (logged at, suppressed)
        self.total = 0

    def report(
        self, uid: int | None, code: str, error: str, exc: BaseException | None = None
    ) -> None:
        self.total += 1
        now = self._clock()
        last, suppressed = self._last.get(uid, (float("-inf"), 0))
        if now - last < self._interval:
            self._last[uid] = (last, suppressed + 1)
            return
        if len(self._last) >= self._MAX_KEYS:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self._interval}
        self._last[uid] = (now, 0)
        extra = {"uid": uid, "code": code, "error": _clip(error, 300), "suppressed": suppressed}
        if exc is None:
            log.info("handshake refused", extra=extra)
        else:
            log.error("handshake check failed", extra=extra, exc_info=exc)
