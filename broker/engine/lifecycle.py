"""A set's lifecycle, written once: what each event does to a set, as one table.

States: attached (a stream carries it), detached (no stream: it waits for its holder to
come back, or for its grace to end), destroyed (gone; THE place is
Sessions.destroy_set). Sessions.apply is the one function that reads this table; every
path that ends a stream, a holder, a grace, a revoke or a restart goes through it.

The rule (issue 19; docs/peer-identity.md): a set whose holder the kernel verified (a
peer-handshake ticket) follows that process. Only an explicit release (a ReleaseRequest,
or a half-close of its stream), its holder's exit or an admin's revoke destroys it; a
stream that ends any other way (cancelled, connection broken, client or sidecar killed,
broker restarted) detaches it, with no timer, for as long as its holder lives. An
anonymous or remote set has no process to follow: it keeps the stream-plus-grace rule
(any end of its stream but a release starts its grace, then it is reclaimed; grace 0:
at once), and resumes by token.

An open whose reply was never sent (OPEN_ABANDONED: its stream ended while the open was
committing) leaves nothing: nobody knows the set exists, so there is nothing to detach
(the atomic open). Once the reply is handed to grpc the client may know it, so a broken
stream detaches it: whether a reply in flight arrived cannot be known, and destroying a
set its client knows is the error that must not happen.

While the broker stops (SIGTERM) every event is its stop, which keeps the set for the
restart, except an explicit release that destroys the set (action_while_stopping): a
drain refuses new work, not a client's end of its set. One that reaches no draining
stream is made again by the client library after the restart (aio.AsyncSession.close).
"""

from __future__ import annotations

import enum


class SetEvent(enum.Enum):
    """What happened to a set (or to its stream, its holder, the broker)."""

    RELEASE = "release request"
    HALF_CLOSE = "half-close"  # its stream's requests ended normally: an explicit end
    OPEN_ABANDONED = "open abandoned"  # the stream ended before its open's reply was sent
    STREAM_BROKEN = "stream broken"  # cancelled, connection lost, client killed
    HOLDER_EXIT = "holder exit"  # the verified holder's pidfd polled readable
    GRACE_EXPIRED = "grace expired"
    REVOKE = "revoke"  # an admin's RevokeSet
    BROKER_STOP = "broker stop"  # SIGTERM: the broker keeps every set for its restart
    RECOVERED_LIVE = "recovered, holder live"  # restart: holder runs (or has none)
    RECOVERED_GONE = "recovered, holder gone"  # restart: holder exited while we were down


class Action(enum.Enum):
    """What the event does to the set."""

    DESTROY = "destroy"  # its owner ended it (event set_destroyed)
    RECLAIM = "reclaim"  # the broker took it (event set_reclaimed)
    DETACH = "detach"  # no stream, no timer: until its holder exits or re-attaches
    GRACE = "detach for its grace"  # detached; reclaimed when its grace ends
    KEEP = "keep"  # nothing changes


_VERIFIED: dict[SetEvent, Action] = {
    SetEvent.RELEASE: Action.DESTROY,
    SetEvent.HALF_CLOSE: Action.DESTROY,
    SetEvent.OPEN_ABANDONED: Action.DESTROY,
    SetEvent.STREAM_BROKEN: Action.DETACH,
    SetEvent.HOLDER_EXIT: Action.RECLAIM,
    SetEvent.GRACE_EXPIRED: Action.KEEP,  # never scheduled for a verified set
    SetEvent.REVOKE: Action.RECLAIM,
    SetEvent.BROKER_STOP: Action.KEEP,
    SetEvent.RECOVERED_LIVE: Action.DETACH,  # for every backend, as long as it lives
    SetEvent.RECOVERED_GONE: Action.RECLAIM,
}

_ANONYMOUS: dict[SetEvent, Action] = {
    SetEvent.RELEASE: Action.DESTROY,
    SetEvent.HALF_CLOSE: Action.GRACE,  # a stream's end, as before: its grace, then gone
    SetEvent.OPEN_ABANDONED: Action.DESTROY,
    SetEvent.STREAM_BROKEN: Action.GRACE,  # grace 0: reclaimed at once
    SetEvent.HOLDER_EXIT: Action.KEEP,  # no holder to exit
    SetEvent.GRACE_EXPIRED: Action.RECLAIM,
    SetEvent.REVOKE: Action.RECLAIM,
    SetEvent.BROKER_STOP: Action.KEEP,
    SetEvent.RECOVERED_LIVE: Action.GRACE,  # at least --restart-grace to resume
    SetEvent.RECOVERED_GONE: Action.RECLAIM,
}

# Its owner's own end of the set. A draining broker (SIGTERM) still honours it where it
# destroys the set: a drain refuses new work, and a release it dropped would leave the
# set to its holder's exit although its client was told, or will be told, it is gone.
EXPLICIT_ENDS = frozenset({SetEvent.RELEASE, SetEvent.HALF_CLOSE})

# The whole rule, one screen: (verified holder?, event) -> action.
LIFECYCLE: dict[tuple[bool, SetEvent], Action] = {
    **{(True, ev): a for ev, a in _VERIFIED.items()},
    **{(False, ev): a for ev, a in _ANONYMOUS.items()},
}


def action_for(verified: bool, event: SetEvent) -> Action:
    """What `event` does to a set with (verified) or without a kernel-verified holder."""
    return LIFECYCLE[(verified, event)]


def action_while_stopping(verified: bool, event: SetEvent) -> Action:
    """What `event` does while the broker stops: the stop keeps every set for the
    restart, except that an explicit release that destroys the set is honoured."""
    action = action_for(verified, event)
    if event in EXPLICIT_ENDS and action is Action.DESTROY:
        return action
    return action_for(verified, SetEvent.BROKER_STOP)
