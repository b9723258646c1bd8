"""Where the daemon listens: Unix sockets that never accept a connection before their
final mode, and TCP addresses checked and bound with one-line refusals."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import grpc

from broker.service.instance import StartupError, gid_of

log = logging.getLogger("pasid_broker")


class UnixListener:
    """A Unix socket that no one can reach before it has its final mode and group, and
    that the broker removes at the end only if it is still the one it bound.

    grpc binds under the process umask and offers no mode, so the socket is bound inside
    a directory only the broker can enter (mkdtemp: 0700) beside its final path, given
    its mode and group there, and renamed into place once the server listens: there is no
    instant at which the final path accepts a connection with a wider mode. grpc unlinks
    the path it bound when it stops, whatever file is there by then; the private path is
    empty by then, and the final one is unlinked here only if its inode is ours.

    grpc binds the private directory through /proc/self/fd/N/s (N: an O_PATH descriptor
    of it, held until close()), as systemd does for long paths: the bound name is then
    shorter than the final path, so a path that passes the configured length check
    (MAX_SOCKET_PATH) also binds; the staging directory's own name adds nothing.
    """

    def __init__(self, path: Path, mode: int, group: str = "") -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self._private: Path | None = None
        self._private_fd: int | None = None
        self._ident: tuple[int, int] | None = None

    def bind(self, server: grpc.aio.Server) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._private = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._private_fd = os.open(self._private, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        via_fd = Path(f"/proc/self/fd/{self._private_fd}")
        # Where /proc is not mounted, the full path (it is then up to 12 bytes longer).
        staged = via_fd / "s" if via_fd.is_dir() else self._private / "s"
        try:
            bind_port(server, f"unix:{staged}")
        except StartupError as exc:  # named by its final path, not the staging one
            raise StartupError(str(exc).replace(str(staged), str(self.path))) from None
        set_mode_and_group(self._private / "s", self.mode, self.group)

    def publish(self) -> None:
        """Move the listening socket to its final path (replacing a stale one)."""
        assert self._private is not None
        os.rename(self._private / "s", self.path)
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        self._cleanup_private()

    def _cleanup_private(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def close(self) -> None:
        """After grpc has stopped: it unlinks the staged name through the descriptor."""
        self._cleanup_private()
        if self._private_fd is not None:
            os.close(self._private_fd)
            self._private_fd = None
        if self._ident is None:
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) != self._ident:
            log.warning(
                "not removing %s: it is no longer this broker's socket",
                self.path,
                extra={"socket": str(self.path)},
            )
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def set_mode_and_group(path: Path, mode: int, group: str) -> None:
    """chmod, and chgrp to --socket-group: refused in one line that names the cause."""
    try:
        os.chmod(path, mode)
        if group:
            os.chown(path, -1, gid_of(group))
    except OSError as exc:
        raise StartupError(
            f"cannot give socket {path} mode 0{mode:o} and group {group or '-'}: "
            f"{exc.strerror}{_chown_hint(exc, group)}"
        ) from None


def _chown_hint(exc: OSError, group: str) -> str:
    """Why chown(2) said EPERM: not a member of the group, or (a member, which the kernel
    would allow) a system-call filter that denies chown with EPERM, as systemd's
    SystemCallFilter=~@privileged does unless @chown is allowed again."""
    if exc.errno != errno.EPERM or not group:
        return ""
    gid = gid_of(group)
    if gid != os.getegid() and gid not in os.getgroups():
        return (
            f" (uid {os.geteuid()} is not a member of group {group}: add it, e.g."
            " SupplementaryGroups= in the unit, --group-add in a container)"
        )
    return (
        f" (uid {os.geteuid()} is a member of group {group}, so a system-call filter denied"
        " chown: allow @chown in SystemCallFilter=, or chown/fchown in the seccomp profile)"
    )


def probe_tcp(address: str, refusal: str = "", hint: str = "") -> None:
    """Resolve and trial-bind HOST:PORT ourselves: grpc's own failure is a C-core log line
    plus an exception, where an operator needs one line naming the cause. `refusal`
    starts that line (default: cannot listen on ADDRESS); `hint` ends it."""
    refusal = refusal or f"cannot listen on {address}"
    host_text, _, port = address.rpartition(":")
    host = host_text.strip("[]") or None
    try:
        infos = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"{refusal}: host {host}: {exc.strerror}{hint}") from None
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as exc:
        raise StartupError(f"{refusal}: {exc.strerror}{hint}") from None


def bind_port(
    server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None = None
) -> int:
    """add_insecure_port / add_secure_port, refusing in one line (grpc raises
    RuntimeError or returns 0)."""
    try:
        port = (
            server.add_insecure_port(address)
            if creds is None
            else server.add_secure_port(address, creds)
        )
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {address} (address in use, or host unknown)")
    if not address.startswith("unix:") and address.rsplit(":", 1)[1] not in ("0", str(port)):
        raise StartupError(f"asked to listen on {address}, grpc bound port {port}")
    return int(port)
