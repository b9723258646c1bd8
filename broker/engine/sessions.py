"""Sessions: open, resume, grace, reclaim, the holder's process, and the end of a set.

`Sessions.destroy_set` is the one function through which every set is destroyed,
whoever destroys it: its client (end with no grace), its grace expiring, its declared
process exiting, an admin's revoke, or recovery finding its holder gone (the seed's
vfio_mm_put funnel).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.core import Conflict, InvalidArgument, IoasidSet, NotFound, NotReady
from broker.store import CreateSet, DestroySet, SetRow

if TYPE_CHECKING:
    from broker.engine.broker import Broker

log = logging.getLogger("pasid_broker")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def pid_alive(pid: int) -> bool:
    """False only when the declared local pid certainly no longer exists."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(eq=False)
class Session:
    """A client's hold on one ioasid_set. `attached` while a stream carries it."""

    set: IoasidSet
    pid: int
    grace_seconds: int
    token_hash: str
    created_unix: float
    attached: bool = True
    peer: str = ""
    # Set by the stream that holds the session: ends it with the given message when the
    # broker takes the set (revoke, the declared process exited).
    on_revoke: Callable[[str], None] | None = None

    @property
    def session_id(self) -> int:
        return self.set.set_id

    @property
    def client(self) -> str:
        return self.set.client


class Sessions:
    """Every live session (attached, or detached in its grace), by set id and by token."""

    def __init__(self, engine: Broker) -> None:
        self._engine = engine
        self._sessions: dict[int, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._pidfds: dict[int, int] = {}  # set_id -> pidfd watched for the holder's exit
        self.next_set_id = 1

    # -- lookups ------------------------------------------------------------------------

    def get(self, set_id: int) -> Session | None:
        return self._sessions.get(set_id)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def attached(self) -> int:
        return sum(1 for s in self._sessions.values() if s.attached)

    def authenticate(self, session_id: int, token: str) -> Session:
        """The live session that (session_id, token) names; NotFound otherwise."""
        sess = self._sessions.get(session_id)
        if sess is None or not secrets.compare_digest(sess.token_hash, hash_token(token)):
            raise NotFound(f"no session {session_id} with that token")
        return sess

    def require_attached(self, sess: Session) -> None:
        if self._sessions.get(sess.session_id) is not sess:
            raise NotFound(f"session {sess.session_id} has ended")
        if self._engine.stopping:
            raise NotReady("broker is shutting down; resume the session once it is back")

    # -- start / stop -------------------------------------------------------------------

    def restore(self, recovered: Iterable[Session], next_set_id: int) -> None:
        """Recovery's sessions (detached); runs before the loop serves anything."""
        for sess in recovered:
            self._sessions[sess.session_id] = sess
            self._by_token[sess.token_hash] = sess
        self.next_set_id = next_set_id

    def reclaim_departed(self, restart_grace: int) -> None:
        """After recovery: destroy the sets whose holder died meanwhile; give the others
        their grace (at least `restart_grace`) to resume."""
        for sess in list(self._sessions.values()):
            if not pid_alive(sess.pid):
                self.destroy_set(sess, "client exited before restart", "set_reclaimed")
            else:
                self._schedule_reclaim(
                    sess, max(restart_grace, sess.grace_seconds), "grace expired after restart"
                )
                self._watch_pid(sess)

    def close(self) -> None:
        """Stop: keep every set, cancel every timer and pid watch."""
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        for set_id in list(self._pidfds):
            self._unwatch_pid(set_id)

    # -- open / resume ------------------------------------------------------------------

    async def open(
        self, client: str, pid: int, grace_seconds: int, resume_token: str, peer: str
    ) -> tuple[Session, str, bool]:
        """See Broker.open_session."""
        e = self._engine
        local = peer.startswith("unix") or peer == ""
        if local and pid > 0 and not pid_alive(pid):
            raise InvalidArgument(f"declared pid {pid} does not exist on this host")
        if resume_token:
            sess = self._by_token.get(hash_token(resume_token))
            if sess is None:
                raise NotFound(
                    "resume token matches no session (expired, reclaimed or never issued)"
                )
            if sess.attached:
                raise Conflict(f"session {sess.session_id} is attached to another stream")
            timer = self._timers.pop(sess.session_id, None)
            if timer is not None:
                timer.cancel()
            sess.attached = True
            sess.peer = peer
            e.observers.session_opened(sess.session_id, True)
            log.info(
                "session resumed",
                extra={"session": sess.session_id, "set": sess.session_id, "held": len(sess.set)},
            )
            return sess, resume_token, True

        grace = min(max(grace_seconds, 0), e.max_grace)
        set_id = self.next_set_id
        self.next_set_id += 1
        token = secrets.token_urlsafe(24)
        th = hash_token(token)
        now = e.clock()
        s = e.allocator.create_set(set_id, client)
        sess = Session(s, pid, grace, th, now, peer=peer)
        self._sessions[set_id] = sess
        self._by_token[th] = sess

        def undo() -> None:
            e.allocator.destroy_set(set_id)
            self._forget(sess)

        row = SetRow(set_id, client, pid, s.quota, grace, th, now)
        await e.journal.submit(CreateSet(row), undo, None)
        e.observers.session_opened(set_id, False)
        if local:
            self._watch_pid(sess)
        log.info(
            "session opened",
            extra={
                "session": set_id,
                "set": set_id,
                "client": client,
                "pid": pid,
                "grace": grace,
                "peer": peer,
            },
        )
        return sess, token, False

    # -- the holder's process -------------------------------------------------------------

    def _watch_pid(self, sess: Session) -> None:
        """Reclaim the set when its declared local process exits, even if a connection
        lingers (e.g. held by a helper). pidfd: no polling, no pid-reuse race."""
        if sess.pid <= 0 or sess.session_id in self._pidfds:
            return
        try:
            fd = os.pidfd_open(sess.pid)
        except (OSError, AttributeError):
            return  # gone already (recovery handles it), or no pidfd: the stream still tells
        self._pidfds[sess.session_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._pid_exited, sess)

    def _unwatch_pid(self, set_id: int) -> None:
        fd = self._pidfds.pop(set_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _pid_exited(self, sess: Session) -> None:
        self._unwatch_pid(sess.session_id)
        if self._sessions.get(sess.session_id) is sess and not self._engine.stopping:
            self.reclaim(sess, f"client process {sess.pid} exited")

    # -- ends -----------------------------------------------------------------------------

    def reclaim(self, sess: Session, reason: str) -> asyncio.Future[None]:
        """The broker takes a set now, whatever its grace: its stream, if any, ends."""
        was_attached = sess.attached
        sess.attached = False
        timer = self._timers.pop(sess.session_id, None)
        if timer is not None:
            timer.cancel()
        if was_attached and sess.on_revoke is not None:
            sess.on_revoke(f"set {sess.session_id} reclaimed: {reason}")
        return self.destroy_set(sess, reason, "set_reclaimed")

    async def revoke(self, set_id: int, reason: str) -> int:
        """Admin: destroy a set now; returns how many PASIDs it held."""
        sess = self._sessions.get(set_id)
        if sess is None:
            raise NotFound(f"no set {set_id}")
        held = len(sess.set)
        await self.reclaim(sess, f"revoked: {reason or 'by admin'}")
        return held

    def end(self, sess: Session, reason: str) -> None:
        """A session's stream is over: destroy its set now, or after its grace.

        While the broker is stopping, sets are kept: a broker restart is not the client's
        exit.
        """
        if not sess.attached:
            return
        sess.attached = False
        if self._engine.stopping:
            return
        if sess.grace_seconds > 0:
            log.info(
                "session detached",
                extra={
                    "session": sess.session_id,
                    "set": sess.session_id,
                    "reason": reason,
                    "grace": sess.grace_seconds,
                },
            )
            self._schedule_reclaim(sess, sess.grace_seconds, "grace expired")
        else:
            self.destroy_set(sess, reason)

    def _schedule_reclaim(self, sess: Session, delay: float, reason: str) -> None:
        loop = asyncio.get_running_loop()
        old = self._timers.pop(sess.session_id, None)
        if old is not None:
            old.cancel()
        self._timers[sess.session_id] = loop.call_later(delay, self._grace_over, sess, reason)

    def _grace_over(self, sess: Session, reason: str) -> None:
        self._timers.pop(sess.session_id, None)
        if not sess.attached and self._sessions.get(sess.session_id) is sess:
            self.destroy_set(sess, reason, "set_reclaimed")

    def destroy_set(
        self, sess: Session, reason: str, kind: str = "set_destroyed"
    ) -> asyncio.Future[None]:
        """THE place a set is destroyed: allocator, then backend, then store.

        kind "set_destroyed": its client ended it; "set_reclaimed": the broker took it.
        Resolves once the destroy is durable; if the commit fails, the set is restored
        and retried a second later (the store may recover).
        """
        e = self._engine
        set_id = sess.session_id
        client = sess.client
        quota = sess.set.quota
        freed = e.allocator.destroy_set(set_id)
        self._forget(sess)
        self._unwatch_pid(set_id)
        e.backend_calls.release(freed)

        def undo() -> None:
            s = e.allocator.create_set(set_id, client, quota)
            e.backend_calls.alloc_exact(e.allocator.claim(set_id, freed))
            sess.set = s
            self._sessions[set_id] = sess
            self._by_token[sess.token_hash] = sess
            self._schedule_reclaim(sess, 1.0, reason)  # retry: the store may recover

        log.info(
            "set destroyed" if kind == "set_destroyed" else "set reclaimed",
            extra={
                "session": set_id,
                "set": set_id,
                "client": client,
                "freed": len(freed),
                "reason": reason,
            },
        )
        fut = e.journal.submit(DestroySet(set_id, reason, kind), undo, None)

        def durable(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                e.observers.set_destroyed(set_id, reason, kind, len(freed))

        fut.add_done_callback(durable)
        return fut

    def _forget(self, sess: Session) -> None:
        self._sessions.pop(sess.session_id, None)
        self._by_token.pop(sess.token_hash, None)
