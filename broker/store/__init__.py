"""The durable store: records in, snapshot out. The only package that speaks SQL."""

from broker.store.records import (
    AddPasids,
    CreateSet,
    DestroySet,
    Event,
    LogConflict,
    MarkDetached,
    NoteSetState,
    Record,
    ReleaseWithheld,
    RemovePasids,
    SaveQuotas,
    SaveSetQuota,
    SetRow,
    SetWitnessEpoch,
    Snapshot,
    WithheldRow,
    Withhold,
)
from broker.store.sqlite import SqliteStore

__all__ = [
    "AddPasids",
    "CreateSet",
    "DestroySet",
    "Event",
    "LogConflict",
    "MarkDetached",
    "NoteSetState",
    "Record",
    "ReleaseWithheld",
    "RemovePasids",
    "SaveQuotas",
    "SaveSetQuota",
    "SetRow",
    "SetWitnessEpoch",
    "Snapshot",
    "SqliteStore",
    "WithheldRow",
    "Withhold",
]
