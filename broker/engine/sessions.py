"""Sessions: open, resume, grace, reclaim, and the end of a set.

`Sessions.destroy_set` is the one function through which every set is destroyed,
whoever destroys it: its client (end with no grace), its grace expiring, its holder
process exiting, an admin's revoke, or recovery finding its holder gone (the seed's
vfio_mm_put funnel).

The liveness rule (docs/peer-identity.md): a set with a kernel-verified holder ends when
that process exits (its pidfd polls readable) or its stream ends (then at once, or after
its grace); never because pings went unanswered. Anonymous and remote sets are bound to
their stream and grace only. No pid a client wrote is ever opened, signalled or read.
Who the holder is and whether it still runs are holders.py's; what its exit does to the
set is decided here (_holder_exited, reclaim_departed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.core import (
    ANONYMOUS,
    Conflict,
    InvalidArgument,
    IoasidSet,
    NotFound,
    NotReady,
    StoreError,
    Unsupported,
    describe_error,
    uid_identity,
)
from broker.engine.holders import Holder, Holders, reopen_holder
from broker.peer import credentials
from broker.peer.tickets import PeerIdentity, TicketBook
from broker.store import CreateSet, DestroySet, SetRow

if TYPE_CHECKING:
    from broker.engine.broker import Broker

log = logging.getLogger("pasid_broker")

# A release (set destroy) that failed is tried again this often until it lands.
RELEASE_RETRY_SECONDS = 1.0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(eq=False)
class Session:
    """A client's hold on one ioasid_set. `attached` while a stream carries it."""

    set: IoasidSet
    holder: Holder | None  # None: anonymous (or remote): bound to stream and grace only
    grace_seconds: int
    token_hash: str
    created_unix: float
    attached: bool = True
    peer: str = ""
    # Set by the stream that holds the session: ends it with the given message when the
    # broker takes the set (revoke, the holder process exited).
    on_revoke: Callable[[str], None] | None = None
    # A failed destroy's undo did not complete: the next try deletes what the store has.
    release_partial: bool = False

    @property
    def session_id(self) -> int:
        return self.set.set_id

    @property
    def pid(self) -> int:
        """The verified holder's pid in the broker's namespace; 0 when unverified."""
        return self.holder.pid if self.holder is not None else 0

    @property
    def client(self) -> str:
        return self.set.client


class Sessions:
    """Every live session (attached, or detached in its grace), by set id and by token."""

    def __init__(
        self, engine: Broker, tickets: TicketBook | None = None, anonymous: str = "allow"
    ) -> None:
        self._engine = engine
        # The holders' identities (tickets) and liveness (pidfds): holders.py.
        self.holders = Holders(tickets, anonymous)
        self._sessions: dict[int, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
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
        """After recovery: destroy the sets whose verified holder is gone (pid plus start
        time no longer match a live process); give the others their grace (at least
        `restart_grace`) to resume, and watch the live holders again."""
        for sess in list(self._sessions.values()):
            h = sess.holder
            fd = reopen_holder(h) if h is not None else None
            if h is not None and fd is None:
                self.destroy_set(
                    sess, f"holder process {h.pid} exited before restart", "set_reclaimed"
                )
                continue
            if h is not None and fd is not None and self._engine.devices is not None:
                # iommufd: attachments made before the restart live on in the holder's own
                # device fd, which this broker cannot detach: the set's PASIDs go back
                # only when the holder exits (the kernel detaches at the last close).
                self._watch(sess, PeerIdentity(h.pid, h.uid, -1, h.ns_pid, h.start_time, fd))
                continue
            self._schedule_reclaim(
                sess, max(restart_grace, sess.grace_seconds), "grace expired after restart"
            )
            if h is not None and fd is not None:
                self._watch(sess, PeerIdentity(h.pid, h.uid, -1, h.ns_pid, h.start_time, fd))

    def close(self) -> None:
        """Stop: keep every set, cancel every timer and pidfd watch."""
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        self.holders.close()

    # -- open / resume ------------------------------------------------------------------

    def open(
        self,
        client: str,
        pid: int,
        grace_seconds: int,
        resume_token: str,
        peer: str,
        ticket: str = "",
        owner: str = ANONYMOUS,
    ) -> tuple[Session, str, bool, asyncio.Future[None]]:
        """See Broker.open_session. Synchronous on purpose: the set exists from here on,
        and the caller owns it (ends it in its finally) before it awaits anything.

        `owner` is the caller's identity as its transport verified it (a certificate
        subject over TCP, else "anonymous"); a ticket's holder overrides it: "uid:N"."""
        identity = self.holders.take_identity(ticket, peer)
        if identity is not None:
            owner = uid_identity(identity.uid)
        try:
            return self._open(client, pid, grace_seconds, resume_token, peer, identity, owner)
        except BaseException:
            if identity is not None:
                identity.close()
            raise

    def _open(
        self,
        client: str,
        pid: int,
        grace_seconds: int,
        resume_token: str,
        peer: str,
        identity: PeerIdentity | None,
        owner: str,
    ) -> tuple[Session, str, bool, asyncio.Future[None]]:
        e = self._engine
        loop = asyncio.get_running_loop()
        if identity is not None:
            if pid and pid not in (identity.ns_pid, identity.pid):
                raise InvalidArgument(
                    f"declared pid {pid} is not the verified holder: the kernel says pid"
                    f" {identity.pid} (pid {identity.ns_pid} in its own namespace)"
                )
            if not credentials.pidfd_alive(identity.pidfd):
                raise Conflict(f"holder process {identity.pid} has already exited")
        if resume_token:
            sess = self._by_token.get(hash_token(resume_token))
            if sess is None:
                raise NotFound(
                    "resume token matches no session (expired, reclaimed or never issued)"
                )
            if sess.set.owner not in (owner, ANONYMOUS):
                # A token is a bearer secret, but a verified identity's set resumes only
                # for it: another identity would allocate on its quota. An anonymous set
                # (its owner never proved anything) resumes for whoever holds the token,
                # and stays anonymous: its PASIDs keep counting where they did.
                raise NotFound(
                    "resume token matches no session (expired, reclaimed or never issued)"
                )
            if sess.attached:
                raise Conflict(f"session {sess.session_id} is attached to another stream")
            # A resuming holder re-delegates its devices (after a broker restart, what it
            # held may still be attached: adopt counts it so that a free detaches it).
            self._adopt_devices(sess, identity)
            timer = self._timers.pop(sess.session_id, None)
            if timer is not None:
                timer.cancel()
            sess.attached = True
            sess.peer = peer
            if identity is not None:
                identity.close()  # the set keeps the holder it was created for
            e.observers.session_opened(sess.session_id, True)
            log.info(
                "session resumed",
                extra={"session": sess.session_id, "set": sess.session_id, "held": len(sess.set)},
            )
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return sess, resume_token, True, done

        grace = min(max(grace_seconds, 0), e.max_grace)
        set_id = self.next_set_id
        self.next_set_id += 1
        # Hex, not url-safe base64: a token that began with '-' was read as an option
        # by pasidctl's `--token TOKEN` (argparse), failing about 1 command in 64.
        token = secrets.token_hex(24)
        th = hash_token(token)
        now = e.clock()
        s = e.allocator.create_set(set_id, client, owner=owner)
        holder = Holder.of(identity) if identity is not None else None
        sess = Session(s, holder, grace, th, now, peer=peer)
        self._sessions[set_id] = sess
        self._by_token[th] = sess
        if identity is not None:
            self._watch(sess, identity)

        def undo() -> None:
            e.allocator.destroy_set(set_id)
            self._forget(sess)
            self.holders.unwatch(set_id)
            if e.devices is not None:
                e.devices.drop_set(set_id)

        try:
            self._adopt_devices(sess, identity)
        except BaseException:
            undo()
            raise

        h = holder
        row = SetRow(
            set_id,
            client,
            sess.pid,
            s.quota,
            grace,
            th,
            now,
            h.start_time if h else None,
            h.uid if h else None,
            h.ns_pid if h else None,
            (h.delegated_by_pid or None) if h else None,
            owner,
        )
        created = e.journal.submit(CreateSet(row), undo, None)

        def opened(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            e.observers.session_opened(set_id, False)
            log.info(
                "session opened",
                extra={
                    "session": set_id,
                    "set": set_id,
                    "client": client,
                    "owner": owner,
                    "pid": sess.pid,
                    "uid": h.uid if h else None,
                    "ns_pid": h.ns_pid if h else None,
                    "delegated_by": h.delegated_by_pid if h else None,
                    "verified": h is not None,
                    "grace": grace,
                    "peer": peer,
                },
            )

        created.add_done_callback(opened)
        return sess, token, False, created

    # -- the holder's process -------------------------------------------------------------

    def _adopt_devices(self, sess: Session, identity: PeerIdentity | None) -> None:
        """The device fds a ticket delegated (issue 14) go to the backend for this set;
        a refusal refuses the open, and nothing is created."""
        if identity is None or not identity.fds:
            return
        devices = self._engine.devices
        if devices is None:
            raise Unsupported("delegated device fds need --backend iommufd")
        devices.adopt_delegated(
            sess.session_id,
            [(d.role, d.fd) for d in identity.fds],
            identity.devices,
            holder_pid=identity.pid,
            held=list(sess.set.pasids),
        )

    def _watch(self, sess: Session, identity: PeerIdentity) -> None:
        """Reclaim the set the moment its holder process exits."""
        self.holders.watch(sess.session_id, identity, self._holder_exited, sess)

    def _holder_exited(self, sess: Session) -> None:
        self.holders.unwatch(sess.session_id)
        if self._sessions.get(sess.session_id) is sess and not self._engine.stopping:
            self.reclaim(sess, f"holder process {sess.pid} exited")

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
        if self._engine.stopping or self._sessions.get(sess.session_id) is not sess:
            return  # kept for a restart; or its creation was undone (a failed commit)
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
        Resolves once the destroy is durable. If it fails (the commit, or a step before
        it, e.g. a MemoryError), the set is restored, detached, and its reclaim retried
        every RELEASE_RETRY_SECONDS until it lands: a dead holder's set never stays
        stored for good (issue 22).
        """
        try:
            return self._destroy_set(sess, reason, kind)
        except Exception as exc:  # nothing of it was queued: the store still holds the set
            self._release_failed(sess, reason)
            sess.release_partial = True  # memory may have let go of some of it already
            err = StoreError(f"release of set {sess.session_id} failed: {describe_error(exc)}")
            log.error(
                "set release failed; retried in %g s",
                RELEASE_RETRY_SECONDS,
                extra={"session": sess.session_id, "set": sess.session_id, "error": err.message},
            )
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(err)
            fut.add_done_callback(lambda f: f.exception())  # retrieved: logged above
            return fut

    def _destroy_set(self, sess: Session, reason: str, kind: str) -> asyncio.Future[None]:
        e = self._engine
        set_id = sess.session_id
        client = sess.client
        quota = sess.set.quota
        owner = sess.set.owner
        # A retry after an undo that did not complete: memory may hold less of the set
        # than the store, so the store deletes what it has for it (a scan, rare).
        partial = sess.release_partial or set_id not in e.allocator.sets
        freed = e.allocator.destroy_set(set_id) if set_id in e.allocator.sets else []
        self._forget(sess)
        self.holders.unwatch(set_id)
        e.drop_devices(set_id, freed)
        e.backend_calls.release(freed)

        def undo() -> None:
            # The retry first, then memory back to what the store holds: if a step of
            # the restore fails too (MemoryError), the retry still comes, and scans.
            self._release_failed(sess, reason)
            sess.release_partial = True
            s = e.allocator.sets.get(set_id) or e.allocator.create_set(
                set_id, client, quota, owner=owner
            )
            sess.set = s
            e.backend_calls.alloc_exact(e.allocator.claim(set_id, freed))
            sess.release_partial = partial

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
        pasids = None if partial else tuple(freed)
        rec = DestroySet(set_id, reason, kind, pasids, e.quarantine_until())
        fut = e.journal.submit(rec, undo, None)

        def durable(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                e.observers.set_destroyed(set_id, reason, kind, len(freed))

        fut.add_done_callback(durable)
        return fut

    def _release_failed(self, sess: Session, reason: str) -> None:
        """A destroy did not land: the set is live again (detached) and its reclaim is
        retried (the store may recover; memory may be had again)."""
        self._sessions[sess.session_id] = sess
        self._by_token[sess.token_hash] = sess
        sess.attached = False
        self._schedule_reclaim(sess, RELEASE_RETRY_SECONDS, reason)

    def _forget(self, sess: Session) -> None:
        self._sessions.pop(sess.session_id, None)
        self._by_token.pop(sess.token_hash, None)
