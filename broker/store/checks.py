"""Start-up checks: a store that lost or changed what it acknowledged is refused, never served.

SQLite's own checks (integrity_check) find a damaged file, but not a *consistent* file that
is not the one the broker wrote. A WAL cut short, or one flipped bit in it, makes SQLite stop
reading at the first frame whose checksum fails and serve the older state that frame leads
to; a deleted WAL serves whatever was checkpointed (nothing, below the checkpoint size); a
row edited by hand moves a PASID to another set. Records of the broker's own catch those
(docs/durability.md, "Start-up checks"):

- the witness, `<db>.revision` beside the database: the event log's last revision,
  rewritten in place after every commit that logged an event. The store must have reached
  it; a store behind its witness has lost acknowledged changes. The witness may lag (a crash
  between a commit and its rewrite, or a page cache lost with the host), never lead.
- the digest: the sum of pasid * weight(set_id) over the allocation rows modulo a prime,
  updated in each commit's own transaction. A row whose set_id was
  edited, or a row added or deleted by hand, no longer adds up. It is a checksum against
  accidents and hand edits, not a signature: whoever can write the file can also recompute
  it. It is kept as a row of sqlite_sequence (DIGEST_ROW), whose page every commit
  that logs an event writes anyway (the events' AUTOINCREMENT counter): a row of `meta`
  would add a page to each commit's WAL frames (+4 KiB, +6 µs per commit, measured).

- the sets' digest: the sum of a hash of each set's row as it was created (its holder's
  pid and start time, uid, namespace pid, delegating pid, owner, client, grace, token
  hash, creation time: the columns no commit changes afterwards) modulo the same prime,
  kept the same way (SETS_DIGEST_ROW). One flipped bit in a holder's start time passes
  every check of SQLite's and the allocations' digest, and recovery would then take a
  live holder for a gone one and hand its PASIDs out again.

The checks run on a read-only connection (vfs unix-none in exclusive locking mode: no -shm,
no lock, nothing written) before anything opens the file for writing; on any doubt the
files are copied aside (`<db>.corrupt-<UTC time>/`) and the broker refuses to start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from broker.core.errors import StoreError
from broker.store.records import SetRow

log = logging.getLogger("pasid_broker")

WITNESS_SUFFIX = ".revision"
# A name no table can have (a dot): SQLite's AUTOINCREMENT looks up only its tables' rows.
DIGEST_ROW = "pasid_broker.digest"
SETS_DIGEST_ROW = "pasid_broker.sets_digest"
# The sets' columns the sets' digest covers: those written once, at the set's creation.
SET_IDENTITY = (
    "set_id, client, pid, grace_seconds, token_hash, created_unix, holder_start_time,"
    " holder_uid, holder_ns_pid, delegated_by_pid, owner"
)
# Set by `pasid-broker restore` in the copy it installs; reported once by the next start.
RESTORED_KEY = "restored"
RUNBOOK = 'docs/runbook.md, section "Corruption"'

# weight(set_id) = (set_id mod M) * A mod M + 1: M is prime, so two set ids below M never
# weigh the same, and moving PASID p from set a to b changes the sum by p * (w(b) - w(a)),
# which is below 2^51 and so never 0 modulo the prime P = 2^61 - 1 the sum is kept in
# (an SQLite integer holds it).
_M = 1_048_573
_A = 40_499
P = (1 << 61) - 1


def weight(set_id: int) -> int:
    return (set_id % _M) * _A % _M + 1


def set_weight(identity: Sequence[Any]) -> int:
    """A set's share of the sets' digest, from its SET_IDENTITY values (as SetRow holds
    them, or as `SELECT SET_IDENTITY` reads them back: the same once created_unix, in a
    REAL column, is a float either way)."""
    values = list(identity)
    values[5] = float(values[5])
    h = hashlib.blake2b(repr(tuple(values)).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "big") % P


def row_identity(r: SetRow) -> tuple[Any, ...]:
    """A stored set's SET_IDENTITY values."""
    return (
        r.set_id, r.client, r.pid, r.grace_seconds, r.token_hash, r.created_unix,
        r.start_time, r.uid, r.ns_pid, r.delegated_by_pid, r.owner,
    )  # fmt: skip


def sets_digest(rows: Iterable[SetRow]) -> int:
    """The sets' digest of these rows."""
    return sum(set_weight(row_identity(r)) for r in rows) % P


def count_sets_digest(conn: sqlite3.Connection) -> int:
    """The sets' digest counted from the table (opening seals it; tests that edit a set
    by hand, as a broker's own bug would leave it, reseal with it)."""
    return sum(set_weight(r) for r in conn.execute(f"SELECT {SET_IDENTITY} FROM sets")) % P


class Digest:
    """SUM of pasid * weight(set_id) modulo P over the allocations (and their count, for
    the messages); the writer keeps it current by deltas (add/remove), opening computes
    it from what it loaded. A row added, deleted or moved changes the sum."""

    __slots__ = ("count", "sets", "total")

    def __init__(self, count: int = 0, total: int = 0, sets: int = 0) -> None:
        self.count = count
        self.total = total
        self.sets = sets  # the sets' digest (set_weight), kept beside the allocations'

    @classmethod
    def of(cls, holdings: Mapping[int, Sequence[int]]) -> Digest:
        d = cls()
        for set_id, pasids in holdings.items():
            d.count += len(pasids)
            d.total = (d.total + weight(set_id) * sum(pasids)) % P
        return d

    def __repr__(self) -> str:
        return f"{self.count} rows, sum {self.total}"


# -- the witness ---------------------------------------------------------------------------


def witness_path(path: Path) -> Path:
    return path.with_name(path.name + WITNESS_SUFFIX)


def read_witness(path: Path) -> int | None:
    """The revision the witness holds; None when there is none. Unreadable: StoreError."""
    try:
        text = witness_path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {witness_path(path)}: {exc.strerror}") from exc
    try:
        return int(text.strip())
    except ValueError:
        raise StoreError(f"{witness_path(path)} holds {text[:40]!r}, not a revision") from None


def _encode(revision: int) -> bytes:
    # Fixed width: rewritten in place, a shorter number would leave a tail behind.
    return b"%020d\n" % revision


def _replace_file(target: Path, revision: int) -> None:
    """`target` now holds `revision`: a new file, fsynced, renamed into place, so that
    a reader sees the old content or the new, never a part."""
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, _encode(revision))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)


def write_witness(path: Path, revision: int) -> None:
    """Replace the witness (at open, and by restore): a new file, renamed into place."""
    _replace_file(witness_path(path), revision)


class Witness:
    """The writer's handle on the witness: one pwrite of 21 bytes after a commit that
    logged events (no fsync: a lagging witness is allowed, a leading one is not)."""

    def __init__(self, path: Path, revision: int) -> None:
        self.revision = revision
        self._fd = os.open(witness_path(path), os.O_WRONLY | os.O_CREAT, 0o600)

    def advance(self, revision: int) -> None:
        if revision <= self.revision:
            return
        try:
            os.pwrite(self._fd, _encode(revision), 0)
        except OSError as exc:  # the commit stands; the witness only lags (allowed)
            log.error("store witness not updated: %s", exc.strerror)
            return
        self.revision = revision

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


# -- the clean-stop marker -----------------------------------------------------------------

CLEAN_STOP_SUFFIX = ".clean-stop"


def clean_stop_path(path: Path) -> Path:
    return path.with_name(path.name + CLEAN_STOP_SUFFIX)


def _sync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_clean_stop(path: Path, revision: int) -> None:
    """Say that the store was closed cleanly at `revision`, after its last commit: a new
    file, fsynced, renamed into place, the directory fsynced. Written only then, so a crash
    (kill -9, a failed fsync's exit, a power cut) can never leave one behind."""
    _replace_file(clean_stop_path(path), revision)
    _sync_dir(path)


def take_clean_stop(path: Path) -> int | None:
    """The revision the last clean stop recorded, or None (none, or unreadable), and the
    marker removed durably before anything may write the store: whatever happens from here
    on, the next start finds none unless this run also stops cleanly."""
    marker = clean_stop_path(path)
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    try:
        marker.unlink()
        _sync_dir(path)
    except OSError as exc:
        raise StoreError(f"cannot remove {marker}: {exc.strerror}") from exc
    try:
        return int(text.strip())
    except ValueError:
        log.warning("ignoring an invalid clean-stop marker", extra={"marker": str(marker)})
        return None


# -- the checks ----------------------------------------------------------------------------


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write the database, its WAL or its -shm: vfs unix-none
    takes no file lock, and exclusive locking mode keeps the WAL index in heap memory
    (a read-only connection in normal mode would create the -shm). The broker's instance
    lock keeps any other broker out meanwhile."""
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro&vfs=unix-none"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    return conn


def integrity(conn: sqlite3.Connection) -> None:
    """PRAGMA integrity_check, the full one: pages, b-trees, every index against its table,
    NOT NULL, UNIQUE (quick_check skips the index-to-table comparison)."""
    bad = [r for (r,) in conn.execute("PRAGMA integrity_check(20)")]
    if bad != ["ok"]:
        raise StoreError(
            "SQLITE_CORRUPT: integrity_check reports " + "; ".join(str(b) for b in bad)
        )


def check_witness(revision: int, witness: int | None, meta: Mapping[str, str]) -> None:
    """StoreError when the store is behind its witness: acknowledged changes are missing."""
    if witness is None or witness <= revision:
        return
    hint = (
        "; a backup restored by hand? `pasid-broker restore` resets the witness"
        if RESTORED_KEY not in meta
        else ""
    )
    raise StoreError(
        f"the store ends at revision {revision} but its witness {WITNESS_SUFFIX} says"
        f" {witness} was committed: {witness - revision} logged changes are missing (a WAL"
        f" cut short, damaged or deleted{hint})"
    )


def read_digest(conn: sqlite3.Connection) -> int | None:
    """The digest's sum as the last commit stored it; None in a store that has none yet."""
    try:
        row = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (DIGEST_ROW,)
        ).fetchone()
    except sqlite3.OperationalError:  # no AUTOINCREMENT table yet: no sqlite_sequence
        return None
    return None if row is None else int(row[0])


# The writer's update of the digest, in the commit's transaction.
SET_DIGEST = "UPDATE sqlite_sequence SET seq = ? WHERE name = ?"


def store_digest(conn: sqlite3.Connection, d: Digest) -> None:
    """(Re)write the digest's row (inside the caller's transaction)."""
    conn.execute("DELETE FROM sqlite_sequence WHERE name = ?", (DIGEST_ROW,))
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (DIGEST_ROW, d.total))


def read_sets_digest(conn: sqlite3.Connection) -> int | None:
    """The sets' digest as the last commit stored it; None in a store that has none yet."""
    try:
        row = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (SETS_DIGEST_ROW,)
        ).fetchone()
    except sqlite3.OperationalError:
        return None
    return None if row is None else int(row[0])


def store_sets_digest(conn: sqlite3.Connection, total: int) -> None:
    """(Re)write the sets' digest's row (inside the caller's transaction)."""
    conn.execute("DELETE FROM sqlite_sequence WHERE name = ?", (SETS_DIGEST_ROW,))
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (SETS_DIGEST_ROW, total))


def verify_sets(stored: int | None, rows: Sequence[SetRow]) -> int:
    """The sets' digest of the loaded rows; StoreError if a stored one differs. None (a
    store written before the sets' digest existed) is accepted: opening stores it."""
    have = sets_digest(rows)
    if stored is not None and stored != have:
        raise StoreError(
            f"the sets do not match their digest: {len(rows)} sets sum {have}, the last commit"
            f" recorded sum {stored} (a set's holder, owner, client or token changed outside"
            " the broker)"
        )
    return have


def verify(
    stored: int | None,
    meta: Mapping[str, str],
    holdings: Mapping[int, Sequence[int]],
    revision: int,
    witness: int | None,
) -> Digest:
    """The loaded state against the broker's own records; returns its digest.

    StoreError when the store is behind its witness, or when the stored digest does not
    match the rows."""
    check_witness(revision, witness, meta)
    have = Digest.of(holdings)
    if stored is not None:
        if stored != have.total:
            raise StoreError(
                f"the allocations do not match their digest: {have!r}, the last commit"
                f" recorded sum {stored} (rows edited, added or deleted outside the broker)"
            )
    elif witness is not None:
        # The digest is written before the witness is first made (opening._seal).
        raise StoreError("the digest row is missing, but the witness exists")
    return have


def report_restore(path: Path, note: str, revision: int) -> None:
    """The first start after `pasid-broker restore`: say what was rolled back, loudly."""
    try:
        info = json.loads(note)
        lost = int(info.get("witness") or 0) - revision
        source = str(info.get("source", "?"))
    except (ValueError, TypeError, AttributeError):
        lost, source = -1, "?"
    log.error(
        "store restored from a backup: %s logged changes after revision %d were rolled"
        " back; sets resumed from it may be stale (%s)",
        lost if lost >= 0 else "an unknown number of",
        revision,
        'docs/runbook.md, section "Restore"',
        extra={"store": str(path), "source": source, "rolled_back": lost},
    )


def missing_database(path: Path, witness: int | None) -> None:
    """A witness but no database: the file was deleted or moved (not a first start)."""
    if witness:
        raise StoreError(
            f"{path} does not exist, but its witness {WITNESS_SUFFIX} says revision"
            f" {witness} was committed (the database was deleted or moved)"
        )


# -- keeping the evidence ------------------------------------------------------------------

_KEPT = ("", "-wal", "-shm", WITNESS_SUFFIX)


def _fingerprint(files: Mapping[str, Path]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for suffix, p in files.items():
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            out[suffix] = [st.st_size, st.st_mtime_ns]
    return out


def keep_aside(path: Path, shm: bytes | None) -> Path:
    """Copy the database, its -wal, -shm (as it was before any check: `shm`) and witness
    into `<db>.corrupt-<UTC time>/`, unless the newest such directory already holds these
    very files (a supervisor restarting a refused broker must not fill the disk)."""
    files = {s: path.with_name(path.name + s) for s in _KEPT}
    finger = _fingerprint({s: p for s, p in files.items() if s != "-shm"})
    earlier = sorted(path.parent.glob(f"{path.name}.corrupt-*"))
    if earlier:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((earlier[-1] / "MANIFEST.json").read_text()) == finger:
                return earlier[-1]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    dest.mkdir(mode=0o700)
    for suffix, p in files.items():
        if suffix == "-shm":
            if shm is not None:
                (dest / p.name).write_bytes(shm)
            continue
        with contextlib.suppress(FileNotFoundError):
            shutil.copy2(p, dest / p.name)
    (dest / "MANIFEST.json").write_text(json.dumps(finger))
    return dest


def read_shm(path: Path) -> bytes | None:
    """The -shm as found, before a check could touch it (it is the WAL's index: 32 KiB per
    4,000 frames or so)."""
    try:
        return path.with_name(path.name + "-shm").read_bytes()
    except OSError:
        return None


def refusal(why: str, kept: Path | None) -> StoreError:
    """The one line the operator reads: what is wrong, where the evidence is, what to read."""
    where = f"; the files as found are kept in {kept}" if kept is not None else ""
    return StoreError(f"it cannot be trusted: {why}{where}; see {RUNBOOK}")
