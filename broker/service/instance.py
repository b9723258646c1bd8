"""One broker per host namespace: checks before start, instance locks, owned sockets.

A broker's identity on a host is its Unix socket(s) and its database. Both are locked
(flock on PATH.lock) BEFORE anything is bound, so a second broker refuses to start whatever
--db it is given, naming the first one's pid. grpc replaces an existing socket file
silently, so the socket file itself cannot be the lock; and on the way out a broker
unlinks only the socket file it bound (same inode), never one another process put there
(broker/service/listeners.py, UnixListener).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger("pasid_broker")


class StartupError(Exception):
    """The broker cannot start; the message says why and what to do."""


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def writable_dir(directory: Path, what: str) -> None:
    """Create `directory` if needed and check that this process can create files in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create {what} directory {directory}: {_why(exc)}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        try:
            readonly = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
        except OSError:
            readonly = False
        why = "on a read-only file system" if readonly else "not writable by this user"
        raise StartupError(f"{what} directory {directory} is {why} (uid {os.geteuid()})")


def preflight(db: str, sockets: list[str]) -> None:
    """Refuse early, in one line, what would otherwise fail deep in SQLite or grpc."""
    # The file itself (read-only, immutable, not a database) is the store's to judge.
    writable_dir(Path(db).parent, "database")
    for s in sockets:
        writable_dir(Path(s).parent, "socket")


def _lock(path: Path, guarded: str) -> IO[str]:
    """flock `path` for the process's life; StartupError naming the holder's pid if taken."""
    try:
        f = path.open("a+")
    except OSError as exc:
        raise StartupError(f"cannot open lock file {path}: {_why(exc)}") from None
    # 0600 like the database it guards (it names a pid), whatever an older version left.
    with contextlib.suppress(OSError):
        os.fchmod(f.fileno(), 0o600)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StartupError(
            f"{guarded} is in use by {holder} (lock {path}); one broker per host: stop it, "
            "or give this one its own --socket and --db"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


@dataclass
class InstanceLock:
    """The flocks on every socket path and on the database, held until close()."""

    files: list[IO[str]] = field(default_factory=list)

    @classmethod
    def acquire(cls, db: str, sockets: list[str]) -> InstanceLock:
        lock = cls()
        try:
            lock.files.append(_lock(Path(db + ".lock"), db))
            for s in sockets:
                lock.files.append(_lock(Path(s + ".lock"), s))
        except BaseException:
            lock.close()
            raise
        return lock

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files.clear()


def gid_of(group: str) -> int:
    """A group name or number (a container may know the number only)."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"no group {group!r} on this host") from None
