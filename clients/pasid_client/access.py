"""Why this process may not connect to a broker's Unix socket, in one line.

connect(2) on a Unix socket needs write permission on the socket file and search
permission on each directory above it (unix(7)); the broker's socket is mode 0660, group
`pasid` (docs/install.md). A refusal is final for this process: retrying cannot help until
its user is given the group and logs in again, so the library says so at once instead of
waiting out its reconnect deadline as for a broker that is starting (ENOENT, ECONNREFUSED).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
import socket
import stat

# What the kernel answers a connect that the socket's mode (EACCES) or a security module
# (EACCES or EPERM) refuses.
REFUSED_ERRNOS = (errno.EACCES, errno.EPERM)

# gRPC core's text for a failed Unix connect (1.85, posix event engine):
# "unix:/p: connect failed: addr: unix:/p error: Permission denied"; older releases
# name the target otherwise, so any "unix:/p" with the errno's text is a candidate.
_GRPC_CONNECT = re.compile(r"addr: unix:(?P<path>.+?) error: ")
_GRPC_TARGET = re.compile(r"unix:(?P<path>/[^\s:;,]+)")


def refused(exc: OSError) -> bool:
    """Whether `exc` (from connect or stat) is a permission refusal, not an absence."""
    return exc.errno in REFUSED_ERRNOS


def grpc_refused_path(details: str) -> str | None:
    """The Unix socket path that gRPC's UNAVAILABLE `details` say was refused by
    permission, confirmed by a connect of our own; None for any other failure (no socket
    yet, a broker not listening), which is worth waiting for."""
    if not any(os.strerror(e) in details for e in REFUSED_ERRNOS):
        return None
    m = _GRPC_CONNECT.search(details) or _GRPC_TARGET.search(details)
    if m is None:
        return None
    path = m.group("path")
    # gRPC's text is not an API: only our own connect's errno decides.
    return path if probe_refused(path) else None


def probe_refused(path: str) -> bool:
    """Whether connect(2) to `path` is refused by permission. Non-blocking: a full listen
    backlog (EAGAIN) or a dead socket (ECONNREFUSED) is not a refusal."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.setblocking(False)
        try:
            s.connect(path)
        except OSError as exc:
            return refused(exc)
    return False


def exists(path: str) -> bool:
    """os.path.exists that does not take an unreadable directory for a missing socket:
    raises PermissionError where a directory above `path` may not be searched."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    return True


def why_refused(path: str) -> str:
    """One line naming the socket and the cause of a refused connect, e.g. "permission
    denied connecting to /run/pasid-broker/broker.sock: this user (uid 1000) is not in
    its group 'pasid' (mode 0660): add it (usermod -aG pasid USER), then log in again"."""
    head = f"permission denied connecting to {path}"
    try:
        st = os.stat(path)
    except OSError:
        return f"{head}: {_closed_directory(path)}"
    mode = stat.S_IMODE(st.st_mode)
    uid, groups = os.geteuid(), {os.getegid(), *os.getgroups()}
    name = _group_name(st.st_gid)
    group = f"'{name}'" if name else f"gid {st.st_gid}"
    shown = f"mode {mode:04o}, owner {_user_name(st.st_uid)}, group {group}"
    if uid == st.st_uid:
        if not mode & stat.S_IWUSR:
            return f"{head}: its owner (this user, uid {uid}) may not write it ({shown})"
    elif st.st_gid in groups:
        if not mode & stat.S_IWGRP:
            return f"{head}: its group {group}, which this user is in, may not write it ({shown})"
    elif not mode & stat.S_IWOTH:
        if _listed_in(st.st_gid, uid):
            return (
                f"{head}: this user (uid {uid}) was added to its group {group} ({shown})"
                " after this process's login: log in again, or run it under"
                f" `sg {name}`"
            )
        return (
            f"{head}: this user (uid {uid}) is not in its group {group} (mode {mode:04o}):"
            f" add it (usermod -aG {name or st.st_gid} USER), then log in again"
        )
    return (
        f"{head}: its mode allows this user (uid {uid}; {shown}), so a security policy"
        " (SELinux, AppArmor, a seccomp filter) refused the connect"
    )


def _closed_directory(path: str) -> str:
    """Which directory above `path` this user may not search (the socket's own mode is
    then never read)."""
    d = os.path.dirname(os.path.abspath(path))
    chain = []
    while True:
        chain.append(d)
        if d == os.path.dirname(d):
            break
        d = os.path.dirname(d)
    for d in reversed(chain):
        if not os.access(d, os.X_OK, effective_ids=True):  # as connect(2) checks
            try:
                st = os.stat(d)
            except OSError:
                return f"this user (uid {os.geteuid()}) may not enter {d}"
            return (
                f"this user (uid {os.geteuid()}) may not enter its directory {d}"
                f" (mode {stat.S_IMODE(st.st_mode):04o}, owner {_user_name(st.st_uid)},"
                f" group {_group_name(st.st_gid) or st.st_gid})"
            )
    return f"this user (uid {os.geteuid()}) may not reach it"


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:  # a container's group that only the host names
        return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _listed_in(gid: int, uid: int) -> bool:
    """Whether the group database lists this user in `gid` (usermod -aG), which a process
    started before that does not have: groups are read at login."""
    try:
        name = pwd.getpwuid(uid).pw_name
        g = grp.getgrgid(gid)
    except KeyError:
        return False
    return name in g.gr_mem
