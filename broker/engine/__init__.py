"""The engine: the broker's state and rules, with no knowledge of gRPC or metrics.

One job per module:

- broker.py        Broker: composes the parts; alloc, free, PASID_REQUEST, quotas, info
- lifecycle.py     SetEvent, Action, LIFECYCLE: what each event does to a set, one table
- sessions.py      Session, Sessions: open, resume/re-attach; Sessions.apply, the one
                   function that applies the lifecycle table; Sessions.destroy_set, the
                   one function through which every set dies
- witness.py       Witnesses: clients are witnesses; a resume's stated PASIDs reconciled
                   with the store, witness epochs, refrees held back after a loss
- holders.py       Holder, Holders: the holder process's identity (a ticket's) and its
                   liveness (its pidfd watched; reopened after a restart)
- journal.py       Journal: group commit with exact undo; `then`, `done_future`
- events.py        EventFanout: one shared log of committed events, a cursor per watcher;
                   Watch (replay, then live)
- recovery.py      recover(): backend, allocator and sessions from the store at start
- backend_calls.py BackendCalls: the backend made to agree with the allocator
- observers.py     Observer, Observers: the hooks metrics (or anyone) subscribe to
"""

from broker.engine.broker import Broker, Info
from broker.engine.events import WATCH_BUFFER, EventFanout
from broker.engine.journal import Journal, done_future, then
from broker.engine.lifecycle import LIFECYCLE, Action, SetEvent
from broker.engine.observers import Observer, Observers
from broker.engine.recovery import RecoveryError
from broker.engine.sessions import Session, Sessions, hash_token
from broker.engine.witness import SetNotice

__all__ = [
    "LIFECYCLE",
    "WATCH_BUFFER",
    "Action",
    "Broker",
    "EventFanout",
    "Info",
    "Journal",
    "Observer",
    "Observers",
    "RecoveryError",
    "Session",
    "Sessions",
    "SetEvent",
    "SetNotice",
    "done_future",
    "hash_token",
    "then",
]
