"""One broker per host namespace: checks before start, instance locks, owned sockets.

A broker's identity on a host is its Unix socket(s) and its database. Both are locked
(flock on PATH.lock) BEFORE anything is bound, so a second broker refuses to start whatever
--db it is given, naming the first one's pid. The locks are keyed on the file a path
resolves to, not on the path as typed: PATH.lock is beside the realpath, and the database
file itself is flocked too (its device and inode), so a symlink, a hard link or a bind
mount of another broker's database is refused like the database itself. grpc replaces an
existing socket file silently, so the socket file itself cannot be the lock; and on the
way out a broker unlinks only the socket file it bound (same inode), never one another
process put there (broker/service/listeners.py, UnixListener).
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


def resolved(path: str | Path) -> Path:
    """The file `path` names once every symlink is followed (it need not exist yet)."""
    return Path(os.path.realpath(path))


@dataclass(frozen=True)
class SocketPath:
    """A Unix socket the broker binds: the flag that names it, and what it is given."""

    flag: str  # "--socket", "--admin-socket (default)", ...
    path: str
    mode: int
    group: str = ""


def check_paths(db: str, sockets: list[SocketPath]) -> None:
    """Refuse, saying why, two of the broker's own files that are one file once symlinks
    are followed (the locks would report it as held by this very pid). Lengths are the
    config's to check (broker/config/load.py, the defaults beside --socket included)."""
    claims: dict[Path, tuple[str, str, str]] = {}
    owned: list[tuple[str, str, tuple[str, ...]]] = [
        ("--db", db, ("", ".lock", "-wal", "-shm", "-journal"))
    ]
    owned += [(s.flag, s.path, ("", ".lock")) for s in sockets]
    for flag, path, suffixes in owned:
        for suffix in suffixes:
            file = Path(f"{resolved(path)}{suffix}")
            if file not in claims:
                claims[file] = (flag, path, suffix)
                continue
            other_flag, other_path, other_suffix = claims[file]
            if not suffix and not other_suffix:
                raise StartupError(
                    f"{flag} {path} is the same file as {other_flag} {other_path}: "
                    "each needs a path of its own"
                )
            raise StartupError(
                f"{flag} {path} and {other_flag} {other_path} would both use {file}: "
                "each needs a path of its own"
            )


def socket_dir_mode(mode: int) -> int:
    """A directory made for a socket lets through whoever the socket's mode lets connect:
    search (x) and list (r) for its group and others as the socket gives them access."""
    return 0o700 | (0o050 if mode & 0o070 else 0) | (0o005 if mode & 0o007 else 0)


def make_socket_dir(directory: Path, mode: int, group: str) -> None:
    """Create a missing socket directory (and missing parents) with the mode and group
    its socket needs: under the broker's umask 077 it would be 0700, and no one but the
    broker could reach a socket of mode 0660 inside it."""
    missing: list[Path] = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    dir_mode = socket_dir_mode(mode)
    for d in reversed(missing):
        try:
            d.mkdir(mode=dir_mode)
        except FileExistsError:
            continue
        except OSError as exc:
            raise StartupError(f"cannot create socket directory {d}: {_why(exc)}") from None
        try:
            os.chmod(d, dir_mode)  # mkdir's mode is masked by the umask
            if group and mode & 0o070:
                os.chown(d, -1, gid_of(group))
        except OSError as exc:
            raise StartupError(
                f"cannot give socket directory {d} mode {dir_mode:04o} and group "
                f"{group or '-'}: {_why(exc)}"
            ) from None


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


def preflight(db: str, sockets: list[SocketPath]) -> None:
    """Refuse early, in one line, what would otherwise fail deep in SQLite or grpc."""
    check_paths(db, sockets)
    # The file itself (read-only, immutable, not a database) is the store's to judge.
    writable_dir(Path(db).parent, "database")
    for s in sockets:
        make_socket_dir(Path(s.path).parent, s.mode, s.group)
        writable_dir(Path(s.path).parent, "socket")


def _lock(path: Path, guarded: str, extra: str = "") -> IO[str]:
    """flock `path` for the process's life; StartupError naming the holder's pid if taken.
    The file says "pid N" on its first line, then `extra` (lines for the holder's tools)."""
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
        holder = (f.read().splitlines() or ["another process"])[0]
        f.close()
        raise StartupError(
            f"{guarded} is in use by {holder} (lock {path}); one broker per host: stop it, "
            "or give this one its own --socket and --db"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n{extra}")
    f.flush()
    return f


def _lock_database(db: str) -> IO[bytes] | None:
    """flock the database file itself (created empty if new: SQLite takes an empty file
    for an empty database), so that the lock follows its device and inode: another name
    for it (a hard link, a bind mount) finds it taken. SQLite's own locks are fcntl
    locks, which flock does not touch on a local file system. A file that cannot be
    opened is left to the store, which says why it cannot use it."""
    try:
        fd = os.open(resolved(db), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    f = os.fdopen(fd, "rb")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        st = os.fstat(f.fileno())
        f.close()
        holder = flock_holder(st.st_dev, st.st_ino) or "another process"
        raise StartupError(
            f"{db} is in use by {holder}: it is the same file (device {os.major(st.st_dev)}:"
            f"{os.minor(st.st_dev)}, inode {st.st_ino}) as that broker's database under "
            "another name; one broker per database: give this one its own --db"
        ) from None
    return f


def flock_holder(dev: int, ino: int) -> str:
    """'pid N' holding a flock on (dev, ino), from /proc/locks; '' if not found there."""
    key = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key:
                    return f"pid {fields[4]}"
    except OSError:
        pass
    return ""


def running_broker(db: str) -> tuple[str, str] | None:
    """The broker holding `db` now, as its lock file says: ("pid N", its admin socket
    path or ""); None when no process holds the lock. `pasid-broker backup` asks that
    broker for the copy: it holds the database exclusively (broker/store/opening.py)."""
    path = Path(f"{resolved(db)}.lock")
    try:
        f = path.open("r")
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            lines = f.read().splitlines()
            admin = next((ln[6:] for ln in lines if ln.startswith("admin ")), "")
            return (lines[0] if lines else "another process"), admin
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


@dataclass
class InstanceLock:
    """The flocks on every socket path and on the database, held until close()."""

    files: list[IO[str] | IO[bytes]] = field(default_factory=list)

    @classmethod
    def acquire(cls, db: str, sockets: list[str], admin_socket: str = "") -> InstanceLock:
        """Each lock beside the resolved file: a symlink to another broker's database or
        socket finds that broker's lock. The database file's own flock comes last, so a
        start refused for a socket leaves no new database behind. `admin_socket` is
        written into the database's lock file (running_broker: pasid-broker backup)."""
        lock = cls()
        extra = f"admin {Path(admin_socket).absolute()}\n" if admin_socket else ""
        try:
            lock.files.append(_lock(Path(f"{resolved(db)}.lock"), _shown(db), extra))
            for s in sockets:
                lock.files.append(_lock(Path(f"{resolved(s)}.lock"), _shown(s)))
            database = _lock_database(db)
            if database is not None:
                lock.files.append(database)
        except BaseException:
            lock.close()
            raise
        return lock

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files.clear()


def _shown(path: str) -> str:
    """The path as given, and where it leads when that is elsewhere."""
    real = str(resolved(path))
    return path if real == os.path.abspath(path) else f"{path} (= {real})"


def gid_of(group: str) -> int:
    """A group name or number (a container may know the number only)."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"no group {group!r} on this host") from None
