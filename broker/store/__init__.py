"""The durable store: records in, snapshot out. The only package that speaks SQL."""

from broker.store.records import (
    AddPasids,
    CreateSet,
    DestroySet,
    Event,
    LogConflict,
    NoteSetState,
    Record,
    RemovePasids,
    SaveQuotas,
    SaveSetQuota,
    SetRow,
    Snapshot,
)
from broker.store.sqlite import SqliteStore

__all__ = [
    "AddPasids",
    "CreateSet",
    "DestroySet",
    "Event",
    "LogConflict",
    "NoteSetState",
    "Record",
    "RemovePasids",
    "SaveQuotas",
    "SaveSetQuota",
    "SetRow",
    "Snapshot",
    "SqliteStore",
]
