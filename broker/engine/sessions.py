"""Sessions: open, resume or re-attach, detach, grace, and the end of a set.

What each event does to a set is one table, lifecycle.py's, and `Sessions.apply` is the
one function that applies it: a release, a half-close, a broken stream, the holder's
exit, a grace ending, a revoke, a broker restart. `Sessions.destroy_set` is the one
function through which every set is destroyed, whoever destroys it (the seed's
vfio_mm_put funnel).

The rule (docs/peer-identity.md): a set with a kernel-verified holder follows that
process: it ends when the process exits (its pidfd polls readable) or its owner releases
it; a stream that merely breaks detaches it. Anonymous and remote sets are bound to
their stream and grace. No pid a client wrote is ever opened, signalled or read. Who the
holder is and whether it still runs are holders.py's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.core import (
    ANONYMOUS,
    Conflict,
    InvalidArgument,
    IoasidSet,
    NotFound,
    NotReady,
    PasidError,
    PermissionDenied,
    Revoked,
    StoreError,
    Unauthenticated,
    Unsupported,
    describe_error,
    uid_identity,
)
from broker.engine.holders import Holder, Holders, reopen_holder
from broker.engine.journal import no_undo
from broker.engine.lifecycle import Action, SetEvent, action_for, action_while_stopping
from broker.engine.witness import SetNotice, new_epoch
from broker.peer import credentials
from broker.peer.tickets import PeerIdentity, TicketBook
from broker.store import (
    CreateSet,
    DestroySet,
    NoteSetState,
    SetRow,
)

if TYPE_CHECKING:
    from broker.engine.broker import Broker

log = logging.getLogger("pasid_broker")

# A release (set destroy) that failed is tried again this often until it lands.
RELEASE_RETRY_SECONDS = 1.0
# Revoked sets remembered for a late resume's answer (Sessions._revoked).
REVOKED_KEPT = 1024


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(eq=False)
class Session:
    """A client's hold on one ioasid_set. `attached` while a stream carries it; else
    detached since `detached_unix` (wall clock)."""

    set: IoasidSet
    holder: Holder | None  # None: anonymous (or remote): bound to stream and grace only
    grace_seconds: int
    token_hash: str
    created_unix: float
    attached: bool = True
    peer: str = ""
    detached_unix: float = 0.0
    # Set by the stream that holds the session: ends it with the given message when the
    # broker takes the set (revoke, the holder process exited).
    on_revoke: Callable[[str], None] | None = None
    # Set by the stream that holds the session: tells its client a SetNotice.
    on_notice: Callable[[SetNotice], None] | None = None
    # A failed destroy's undo did not complete: the next try deletes what the store has.
    release_partial: bool = False
    # The last witnessed resume's outcome (Witnesses.reconcile): for SessionOpened.
    reclaimed: list[int] = field(default_factory=list)
    conflicts: list[int] = field(default_factory=list)
    # ... and what a complete witness freed (frees whose acknowledgement the store lost),
    # and whether the witness was taken as complete.
    refreed: list[int] = field(default_factory=list)
    witness_complete: bool = False
    # A complete witness is honoured only when it states this epoch: it changes when
    # something the set's stream client cannot see changes the set
    # (Witnesses.new_witness_epoch).
    witness_epoch: int = 0
    # The epoch was told to a client (a new set's open, a listing) since it last changed:
    # the next unseen change needs a new one (else the current one stays unknown).
    epoch_told: bool = True

    @property
    def session_id(self) -> int:
        return self.set.set_id

    def tell_witness_epoch(self) -> int:
        """The witness epoch, as a listing or a new set's open gives it with the whole set
        (the next change its client cannot see then needs a new one)."""
        self.epoch_told = True
        return self.witness_epoch

    @property
    def pid(self) -> int:
        """The verified holder's pid in the broker's namespace; 0 when unverified."""
        return self.holder.pid if self.holder is not None else 0

    @property
    def client(self) -> str:
        return self.set.client


def _not_the_owner(sess: Session, caller: str) -> PasidError:
    """Why a valid token does not resume its set for `caller`: the set is a verified
    identity's. Said precisely (the caller holds the token, so its set's existence is
    no secret to it); nothing about the set changes."""
    if sess.holder is not None:
        what = f"a kernel-verified process of {sess.set.owner}"
        how = (
            f"a peer ticket of {sess.set.owner} (the handshake on the Unix socket, which"
            " the client library does), or re-attach it (reattach_set_id) from its holder"
        )
    else:
        what = "a verified identity (a client certificate's subject)"
        how = "that identity's certificate"
    if caller == ANONYMOUS:
        return Unauthenticated(
            f"session {sess.session_id}'s set is held by {what}: a resume without an"
            f" identity is refused; resume it with {how}"
        )
    return PermissionDenied(
        f"session {sess.session_id}'s set is held by {what}, not by {caller}: it resumes"
        f" only with {how}"
    )


class Sessions:
    """Every live set's session (attached or detached), by set id and by token."""

    def __init__(
        self, engine: Broker, tickets: TicketBook | None = None, anonymous: str = "allow"
    ) -> None:
        self._engine = engine
        # The holders' identities (tickets) and liveness (pidfds): holders.py.
        self.holders = Holders(tickets, anonymous)
        self._sessions: dict[int, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._restart_grace = 0
        self.next_set_id = 1
        # The last REVOKED_KEPT revoked sets, by set id: (token hash, holder, why). A
        # resume or re-attach that comes after a revoke is told so (Revoked), not only
        # "no such set": grpc can hide the stream's ABORTED from a client whose write
        # raced the stream's end, and its reconnect then asks. Memory only.
        self._revoked: OrderedDict[int, tuple[str, tuple[int, float] | None, str]] = OrderedDict()

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

    def recover_holders(self, restart_grace: int) -> None:
        """After recovery, every set is detached: apply the restart to each. A verified
        set whose holder still runs (pid plus start time, reopened as a pidfd; running or
        frozen) is kept for as long as it lives, whatever the backend; one whose holder
        exited while the broker was down is reclaimed; an anonymous one gets its grace
        (at least `restart_grace`) to resume."""
        self._restart_grace = restart_grace
        now = self._engine.clock()
        for sess in list(self._sessions.values()):
            # Attached when the last run ended: the restart detached it.
            was_attached = not sess.detached_unix
            sess.detached_unix = sess.detached_unix or now
            h = sess.holder
            fd = reopen_holder(h) if h is not None else None
            if h is not None and fd is None:
                self.apply(
                    sess, SetEvent.RECOVERED_GONE, f"holder process {h.pid} exited before restart"
                )
                continue
            if was_attached:
                # Said as any detach is (Watch sees set_detached, then set_reattached when
                # its client is back), and its time stored so that the next restart does
                # not reset the age.
                self._note(sess, "set_detached", "broker restarted", now)
            if h is not None and fd is not None:
                self._watch(sess, PeerIdentity(h.pid, h.uid, -1, h.ns_pid, h.start_time, fd))
            self.apply(sess, SetEvent.RECOVERED_LIVE, "recovered after restart")

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
        reattach_set_id: int = 0,
        held: Sequence[int] | None = None,
        complete_epoch: int = 0,
    ) -> tuple[Session, str, bool, asyncio.Future[None]]:
        """See Broker.open_session. Synchronous on purpose: the set exists from here on,
        and the caller owns it (ends it in its finally) before it awaits anything.

        `owner` is the caller's identity as its transport verified it (a certificate
        subject over TCP, else "anonymous"); a ticket's holder overrides it: "uid:N"."""
        if reattach_set_id and resume_token:
            raise InvalidArgument("give resume_token or reattach_set_id, not both")
        identity = self.holders.take_identity(ticket, peer)
        if identity is not None:
            owner = uid_identity(identity.uid)
        try:
            if reattach_set_id:
                out = self._reattach(reattach_set_id, peer, identity)
            else:
                out = self._open(client, pid, grace_seconds, resume_token, peer, identity, owner)
        except BaseException:
            if identity is not None:  # refused: the ticket is the caller's again
                self.holders.give_back(ticket, identity)
            raise
        sess, token, resumed, _ = out
        sess.reclaimed, sess.conflicts, sess.refreed = [], [], []
        sess.witness_complete = False
        if not resumed:
            return out
        self._engine.witness_seen(sess.session_id)
        witnesses = self._engine.witnesses  # witness.py: the client's word against the store
        try:
            if held is not None:
                return sess, token, resumed, witnesses.reconcile(sess, held, complete_epoch)
            # Taken back by hand (no witness): what an earlier client of the set knew is
            # no longer the whole set; this one learns it from a listing.
            return sess, token, resumed, witnesses.new_witness_epoch(sess)
        except BaseException:
            # The set was attached for this open, which no stream will carry now.
            self.apply(sess, SetEvent.STREAM_BROKEN, "its resume failed")
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
        if identity is not None:
            if pid and pid not in (identity.ns_pid, identity.pid):
                raise InvalidArgument(
                    f"declared pid {pid} is not the verified holder: the kernel says pid"
                    f" {identity.pid} (pid {identity.ns_pid} in its own namespace)"
                )
            if not credentials.pidfd_alive(identity.pidfd):
                raise Conflict(f"holder process {identity.pid} has already exited")
        if resume_token:
            th = hash_token(resume_token)
            sess = self._by_token.get(th)
            if sess is None:
                why = next((w for t, _, w in self._revoked.values() if t == th), None)
                if why is not None:
                    raise Revoked(why)
                raise NotFound(
                    "resume token matches no session (expired, reclaimed or never issued)"
                )
            if sess.set.owner not in (owner, ANONYMOUS):
                # A token is a bearer secret, but a verified identity's set resumes only
                # for it: another identity would allocate on its quota. An anonymous set
                # (its owner never proved anything) resumes for whoever holds the token,
                # and stays anonymous: its PASIDs keep counting where they did.
                raise _not_the_owner(sess, owner)
            return self._attach(sess, resume_token, peer, identity)

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
        sess = Session(s, holder, grace, th, now, peer=peer, witness_epoch=new_epoch())
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
            witness_epoch=sess.witness_epoch,
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

    def _reattach(
        self, set_id: int, peer: str, identity: PeerIdentity | None
    ) -> tuple[Session, str, bool, asyncio.Future[None]]:
        """A verified holder's set back without its token: the ticket's holder (the
        process itself, or one allowed to delegate it that presented its pidfd: the
        handshake's delegation rule) must be the set's holder, the very process (pid and
        start time). Anything else is NotFound and changes nothing; attached elsewhere
        is Conflict. The answer carries no token (the broker keeps only its hash)."""
        sess = self._sessions.get(set_id)
        gone = self._revoked.get(set_id)
        if sess is None and gone and identity and gone[1] == (identity.pid, identity.start_time):
            raise Revoked(gone[2])  # told only to its holder, as the set itself would be
        if sess is None or not self.holds(sess, identity):
            raise NotFound(
                f"no set {set_id} held by this process (re-attach needs a ticket of the"
                " set's verified holder, or of a process delegating it)"
            )
        return self._attach(sess, "", peer, identity)

    @staticmethod
    def holds(sess: Session, identity: PeerIdentity | None) -> bool:
        """Whether `identity` (a ticket's) is `sess`'s verified holder process."""
        h = sess.holder
        return (
            identity is not None
            and h is not None
            and (h.pid, h.start_time) == (identity.pid, identity.start_time)
        )

    def held_by(self, ticket: str, peer: str) -> list[Session]:
        """The sets (attached or detached) whose verified holder is the ticket's holder
        process: what a restarted sidecar lists to re-attach. Uses the ticket up."""
        identity = self.holders.take_identity(ticket, peer)
        if identity is None:
            raise InvalidArgument("listing a holder's sets needs a peer-handshake ticket")
        try:
            if not credentials.pidfd_alive(identity.pidfd):
                return []
            return [s for s in self._sessions.values() if self.holds(s, identity)]
        finally:
            identity.close()

    def _attach(
        self, sess: Session, token: str, peer: str, identity: PeerIdentity | None
    ) -> tuple[Session, str, bool, asyncio.Future[None]]:
        """A detached set goes back to a stream: THE path of a token resume and of a
        re-attach. Raises Conflict if another stream holds it."""
        if sess.attached:
            raise Conflict(f"session {sess.session_id} is attached to another stream")
        # A resuming holder re-delegates its devices (after a broker restart, what it
        # held may still be attached: adopt counts it so that a free detaches it).
        self._adopt_devices(sess, identity)
        timer = self._timers.pop(sess.session_id, None)
        if timer is not None:
            timer.cancel()
        detached_for = self._engine.clock() - sess.detached_unix if sess.detached_unix else 0.0
        sess.attached = True
        sess.detached_unix = 0.0
        sess.peer = peer
        self._note(sess, "set_reattached", f"detached for {detached_for:.3f} s")
        if identity is not None:
            identity.close()  # the set keeps the holder (and pidfd) it was created for
        self._engine.observers.session_opened(sess.session_id, True)
        log.info(
            "session resumed",
            extra={
                "session": sess.session_id,
                "set": sess.session_id,
                "held": len(sess.set),
                "detached_seconds": round(detached_for, 3),
            },
        )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return sess, token, True, done

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
        self.apply(sess, SetEvent.HOLDER_EXIT, f"holder process {sess.pid} exited")

    # -- the lifecycle (lifecycle.py's table) ---------------------------------------------

    def apply(self, sess: Session, event: SetEvent, reason: str) -> asyncio.Future[None] | None:
        """THE function that moves a set through its lifecycle: `event` happened to it;
        lifecycle.py's table says what that does. Returns the destroy's future (durable
        when it resolves) if the set is destroyed, else None.

        While the broker is stopping every event but an explicit release is its stop:
        sets are kept (a broker restart is not the client's exit) and recovery applies
        the restart to them (lifecycle.action_while_stopping)."""
        if self._sessions.get(sess.session_id) is not sess:
            return None  # already destroyed, or its creation was undone (failed commit)
        verified = sess.holder is not None
        if self._engine.stopping:
            action = action_while_stopping(verified, event)
        else:
            if event is SetEvent.STREAM_BROKEN and self.holders.exited(sess.session_id):
                # A killed holder's stream often ends before its pidfd's callback runs:
                # its exit it is, now (no detach to note, no wait for the watch).
                event, reason = SetEvent.HOLDER_EXIT, f"holder process {sess.pid} exited"
            action = action_for(verified, event)
        if action is Action.KEEP:
            return None
        if action is Action.DESTROY:
            self._cancel_timer(sess)
            sess.attached = False
            return self.destroy_set(sess, reason, "set_destroyed")
        if action is Action.RECLAIM:
            return self.reclaim(sess, reason)
        self._detach(sess, event, reason)
        if action is Action.GRACE:
            grace, why = sess.grace_seconds, "grace expired"
            if event is SetEvent.RECOVERED_LIVE:
                grace, why = max(grace, self._restart_grace), "grace expired after restart"
            if grace <= 0 and event is SetEvent.RECOVERED_LIVE:
                return self.destroy_set(sess, why, "set_reclaimed")
            if grace <= 0:
                return self.destroy_set(sess, reason)  # grace 0: its stream was its life
            self._schedule_reclaim(sess, grace, why)
        return None

    def _detach(self, sess: Session, event: SetEvent, reason: str) -> None:
        """No stream holds the set any more; it lives on (until its holder exits, a
        re-attach, or its grace)."""
        if not sess.attached:
            return  # recovered sets are detached already (recover_holders said so)
        sess.attached = False
        sess.detached_unix = self._engine.clock()
        self._note(sess, "set_detached", reason, sess.detached_unix)
        log.info(
            "session detached",
            extra={
                "session": sess.session_id,
                "set": sess.session_id,
                "event": event.value,
                "reason": reason,
                "verified": sess.holder is not None,
                "grace": sess.grace_seconds if sess.holder is None else None,
            },
        )

    def _note(self, sess: Session, kind: str, reason: str, at: float | None = None) -> None:
        """set_detached / set_reattached into the event log (Watch), and to observers;
        the store keeps the detach time `at` (sets.detached_unix) for a restart."""
        self._engine.journal.submit(NoteSetState(sess.session_id, kind, reason, at), no_undo, None)
        self._engine.observers.set_state_changed(sess.session_id, kind)

    def release(self, sess: Session) -> asyncio.Future[int]:
        """Its owner ends the set now, whatever its grace (ReleaseRequest); resolves to
        how many PASIDs it freed, once durable. Taken while the broker drains too (a
        drain refuses new work, not its client's end of the set: apply honours it)."""
        if self._sessions.get(sess.session_id) is not sess:
            raise NotFound(f"session {sess.session_id} has ended")
        held = len(sess.set)
        fut = self.apply(sess, SetEvent.RELEASE, "released by its client")
        loop = asyncio.get_running_loop()
        out: asyncio.Future[int] = loop.create_future()
        if fut is None:
            out.set_result(0)
            return out

        def done(f: asyncio.Future[None]) -> None:
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif (exc := f.exception()) is not None:
                out.set_exception(exc)
            else:
                out.set_result(held)

        fut.add_done_callback(done)
        return out

    def reclaim(self, sess: Session, reason: str) -> asyncio.Future[None]:
        """The broker takes a set now, whatever its grace: its stream, if any, ends."""
        was_attached = sess.attached
        sess.attached = False
        self._cancel_timer(sess)
        if was_attached and sess.on_revoke is not None:
            sess.on_revoke(f"set {sess.session_id} reclaimed: {reason}")
        return self.destroy_set(sess, reason, "set_reclaimed")

    async def revoke(self, set_id: int, reason: str) -> int:
        """Admin: destroy a set now; returns how many PASIDs it held."""
        sess = self._sessions.get(set_id)
        if sess is None:
            raise NotFound(f"no set {set_id}")
        held = len(sess.set)
        why = f"revoked: {reason or 'by admin'}"
        h = sess.holder
        self._revoked[set_id] = (
            sess.token_hash,
            (h.pid, h.start_time) if h is not None else None,
            f"set {set_id} reclaimed: {why}",  # the words of the stream's own ABORTED
        )
        while len(self._revoked) > REVOKED_KEPT:
            self._revoked.popitem(last=False)
        fut = self.apply(sess, SetEvent.REVOKE, why)
        if fut is not None:
            await fut
        return held

    def _cancel_timer(self, sess: Session) -> None:
        timer = self._timers.pop(sess.session_id, None)
        if timer is not None:
            timer.cancel()

    def _schedule_reclaim(self, sess: Session, delay: float, reason: str) -> None:
        loop = asyncio.get_running_loop()
        self._cancel_timer(sess)
        self._timers[sess.session_id] = loop.call_later(delay, self._grace_over, sess, reason)

    def _grace_over(self, sess: Session, reason: str) -> None:
        self._timers.pop(sess.session_id, None)
        if not sess.attached:
            self.apply(sess, SetEvent.GRACE_EXPIRED, reason)

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
            self._release_failed(sess, reason, kind)
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
        # A PASID the kernel may still use (its DETACH or its free failed) stays out of
        # the pool and held in the backend (stuck.py).
        stuck = e.drop_devices(set_id, sess.holder)
        kept = e.backend_calls.release_gone(
            [p for p in freed if p not in stuck] if stuck else freed
        )
        if kept:
            e.stuck.free_failed(set_id, kept)

        def undo() -> None:
            # The retry first, then memory back to what the store holds: if a step of
            # the restore fails too (MemoryError), the retry still comes, and scans.
            self._release_failed(sess, reason, kind)
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
                e.stuck.claimant_gone(set_id)  # a witness's contest ends with its set

        fut.add_done_callback(durable)
        return fut

    def _release_failed(self, sess: Session, reason: str, kind: str) -> None:
        """A destroy did not land: the set is live again (detached) and its destroy is
        retried (the store may recover; memory may be had again). The lifecycle decided
        already: the retry does not ask it again."""
        self._sessions[sess.session_id] = sess
        self._by_token[sess.token_hash] = sess
        sess.attached = False
        self._cancel_timer(sess)
        self._timers[sess.session_id] = asyncio.get_running_loop().call_later(
            RELEASE_RETRY_SECONDS, self._retry_destroy, sess, reason, kind
        )

    def _retry_destroy(self, sess: Session, reason: str, kind: str) -> None:
        self._timers.pop(sess.session_id, None)
        if self._sessions.get(sess.session_id) is sess and not self._engine.stopping:
            sess.attached = False
            self.destroy_set(sess, reason, kind)

    def _forget(self, sess: Session) -> None:
        self._sessions.pop(sess.session_id, None)
        self._by_token.pop(sess.token_hash, None)
        self._engine.witness_seen(sess.session_id)  # a set gone is awaited no more
