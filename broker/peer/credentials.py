"""What the kernel says about a process at the other end of a Unix socket.

Every number here comes from the kernel: SO_PEERCRED (translated into the broker's pid
namespace), a pidfd (SO_PEERPIDFD, or pidfd_open closed against reuse), and /proc read
only while a held pidfd proves that the pid still names the same process. Nothing here
opens, signals or reads /proc for a pid a client wrote down.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass

# include/uapi/asm-generic/socket.h: SO_PEERPIDFD 77 (Linux 6.5). Python 3.11 lacks it.
SO_PEERPIDFD = 77
_TICKS = os.sysconf("SC_CLK_TCK")


class CredentialError(Exception):
    """The peer cannot be identified; `code` is the status the handshake answers with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PeerCred:
    """SO_PEERCRED: the connecting process, as of connect(2), in the broker's pid ns."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class ProcessFacts:
    """A held process as /proc showed it while its pidfd proved the pid was its own."""

    pid: int  # in the broker's pid namespace
    ns_pid: int  # in the process's innermost pid namespace (NSpid: last field)
    uid: int  # effective uid
    gid: int  # effective gid
    real_uid: int
    saved_uid: int
    start_time: int  # /proc/<pid>/stat field 22, clock ticks after boot
    fs_uid: int = -1  # /proc/<pid>/status Uid: field 4
    tgid: int = 0  # the thread group (process) this task belongs to; == pid for a process

    @property
    def uids(self) -> frozenset[int]:
        """Every uid the process holds: real, effective, saved, filesystem."""
        every = (self.real_uid, self.uid, self.saved_uid, self.fs_uid)
        return frozenset(u for u in every if u >= 0)

    @property
    def is_thread(self) -> bool:
        """A pidfd of a thread that is not its process's leader (pidfd_open PIDFD_THREAD)."""
        return self.tgid not in (0, self.pid)


def peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def boot_ticks() -> int:
    """Now, in the clock ticks of /proc/<pid>/stat's start time (CLOCK_BOOTTIME)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _TICKS)


def start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat. Only meaningful while a pidfd proves pid is alive."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])  # field 22 counted from field 3


def pidfd_fdinfo(pidfd: int) -> dict[str, str]:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        return dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in f) if k)


def pidfd_pid(pidfd: int) -> int:
    """The pidfd's pid in the broker's namespace: -1 once it exited, 0 if not visible."""
    return int(pidfd_fdinfo(pidfd).get("Pid", "-1"))


def pidfd_alive(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)


def is_pidfd(fd: int) -> bool:
    try:
        return "Pid" in pidfd_fdinfo(fd)
    except OSError:
        return False


# include/uapi/linux/pidfd.h: PIDFD_THREAD is O_EXCL (Linux 6.9), kept in the file's flags.
PIDFD_THREAD = os.O_EXCL


def is_thread_pidfd(fd: int) -> bool:
    """A pidfd opened with PIDFD_THREAD: it reports its thread's exit, not its process's,
    even when the thread is its process's leader."""
    try:
        return bool(int(pidfd_fdinfo(fd).get("flags", "0"), 8) & PIDFD_THREAD)
    except (OSError, ValueError):
        return False


def process_facts(pidfd: int) -> ProcessFacts:
    """Read the held process's pid, NSpid, uids and start time; raise if it exited.

    The pid is read from the pidfd itself, /proc/<pid> is read, and the pidfd is asked
    again: a process alive at the second look was alive throughout, so /proc/<pid> was
    that process and no reused pid slipped in.
    """
    info = pidfd_fdinfo(pidfd)
    pid = int(info.get("Pid", "-1"))
    if pid == 0:
        raise CredentialError(
            "PERMISSION_DENIED", "the process is not visible in the broker's pid namespace"
        )
    if pid < 0:
        raise CredentialError("FAILED_PRECONDITION", "the process has already exited")
    nspid = [int(x) for x in info.get("NSpid", str(pid)).split()]
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        started = start_time(pid)
    except (OSError, ValueError):
        raise CredentialError("FAILED_PRECONDITION", "the process has already exited") from None
    if pidfd_pid(pidfd) != pid:
        raise CredentialError("FAILED_PRECONDITION", "the process has already exited")
    uids = [int(x) for x in status["Uid"].split()]
    gids = [int(x) for x in status["Gid"].split()]
    return ProcessFacts(
        pid=pid,
        ns_pid=nspid[-1],
        uid=uids[1],
        gid=gids[1],
        real_uid=uids[0],
        saved_uid=uids[2],
        start_time=started,
        fs_uid=uids[3] if len(uids) > 3 else -1,
        tgid=int(status.get("Tgid", pid)),
    )


def _connected(sock: socket.socket) -> bool:
    """The peer still holds its end (no POLLHUP)."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP)
    return not p.poll(0)


def peer_pidfd(sock: socket.socket, cred: PeerCred, accepted_ticks: int) -> int:
    """A pidfd for the peer with no pid-reuse window. The caller owns (closes) it.

    SO_PEERPIDFD (Linux 6.5+) is taken by the kernel at connect(2). Older kernels:
    see peer_pidfd_fallback.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError:
        return peer_pidfd_fallback(sock, cred, accepted_ticks)
    fd: int = struct.unpack("i", raw)[0]
    return fd


def peer_pidfd_fallback(sock: socket.socket, cred: PeerCred, accepted_ticks: int) -> int:
    """pidfd_open(SO_PEERCRED pid), kept only if it can only be the peer.

    The process it names must have started before the broker accepted the connection
    (a reuse of the pid would start later), still be alive after the pidfd was opened
    (so /proc described it), and the peer must still hold the connection.
    """
    if cred.pid <= 0:
        raise CredentialError(
            "PERMISSION_DENIED", "the peer is not visible in the broker's pid namespace"
        )
    try:
        fd = os.pidfd_open(cred.pid)
    except ProcessLookupError:
        raise CredentialError(
            "FAILED_PRECONDITION", "the peer exited during the handshake"
        ) from None
    try:
        started = start_time(cred.pid)
        if not pidfd_alive(fd) or started > accepted_ticks or not _connected(sock):
            raise CredentialError("FAILED_PRECONDITION", "the peer exited during the handshake")
    except OSError:
        os.close(fd)
        raise CredentialError(
            "FAILED_PRECONDITION", "the peer exited during the handshake"
        ) from None
    except CredentialError:
        os.close(fd)
        raise
    return fd


def may_delegate(uid: int, target: ProcessFacts) -> bool:
    """Whether a caller of (SO_PEERCRED) `uid` may name `target` as a set's holder.

    Root may name any process. Anyone else only a process whose every uid (real,
    effective, saved, filesystem) is its own: kill(2)'s rule (real or saved uid) let a
    user delegate the setuid-root program it had just started, and so act as uid 0
    (issue 20). The identity a delegated ticket carries is the caller's in any case.
    """
    return uid == 0 or target.uids == {uid}
