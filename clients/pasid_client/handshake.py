"""The peer handshake: prove who we are to the broker, get a one-time ticket.

The broker learns our pid, uid and gid from the kernel on its peer socket (beside the
gRPC socket) and hands back a ticket that OpenSession presents. AsyncClient and Client
do this by themselves; call obtain_ticket directly only to delegate (a sidecar handing
over a VMM's pidfd) or to pass extra fds (issue 14: "iommufd", "device").
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from pasid.v1 import broker_pb2 as pb

from pasid_client import access
from pasid_client.errors import PasidClientError, Unavailable, make_error, socket_refused

PEER_SOCKET = "peer.sock"
MAX_REPLY = 4096


@dataclass(frozen=True)
class Ticket:
    """A ticket and what the kernel said about its holder."""

    ticket: str
    expires_in: float
    pid: int  # the holder, in the broker's pid namespace
    uid: int
    gid: int
    ns_pid: int  # the holder's pid in its own namespace
    delegated: bool


def unix_path(target: str) -> str | None:
    """The socket file of a "unix:" target; None for TCP."""
    if not target.startswith("unix:"):
        return None
    path = target[len("unix:") :]
    return path[2:] if path.startswith("//") else path


def peer_socket_path(target: str, peer_socket: str | None = None) -> str | None:
    """Where the handshake for a gRPC target is: `peer_socket`, else
    $PASID_BROKER_PEER_SOCKET, else peer.sock beside a "unix:" target; None for TCP."""
    path = unix_path(target)
    if path is None:
        return None
    return (
        peer_socket
        or os.environ.get("PASID_BROKER_PEER_SOCKET")
        or os.path.join(os.path.dirname(path) or ".", PEER_SOCKET)
    )


def peer_socket_for(target: str, peer_socket: str | None = None) -> str | None:
    """peer_socket_path if that socket exists; None for TCP or when it does not (a broker
    without the handshake: the session is anonymous)."""
    peer = peer_socket_path(target, peer_socket)
    return peer if peer is not None and socket_exists(peer) else None


def socket_exists(path: str) -> bool:
    """Whether the socket file `path` is there. Raises PermissionDenied (SOCKET_ACCESS)
    where a directory above it is closed to us: that is not a broker still starting."""
    try:
        return access.exists(path)
    except PermissionError:
        raise socket_refused(path) from None


def ticket_for(
    target: str,
    *,
    peer_socket: str | None = None,
    delegate_pid: int | None = None,
    delegate_pidfd: int | None = None,
    timeout: float = 5.0,
) -> Ticket | None:
    """The handshake the client library does before each open: a ticket, or None where
    the target has no peer socket (TCP, an older broker). `delegate_pid` is opened with
    pidfd_open here, in our own pid namespace, and closed after the handshake.
    Raises as obtain_ticket; FailedPrecondition for delegation without a peer socket,
    NotFound for a delegate_pid that does not exist, InvalidArgument for a thread's id."""
    path = peer_socket_for(target, peer_socket)
    delegating = delegate_pid is not None or delegate_pidfd is not None
    if path is None:
        if delegating:
            raise make_error(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"delegation needs the broker's peer socket; none found for {target}",
                "HANDSHAKE",
            )
        return None
    own = open_delegate(delegate_pid) if delegate_pid is not None else -1
    try:
        return obtain_ticket(
            path, delegate_pidfd=own if own >= 0 else delegate_pidfd, timeout=timeout
        )
    finally:
        if own >= 0:
            os.close(own)


TICKET_METADATA = "pasid-ticket"


def open_delegate(pid: int) -> int:
    """A pidfd of the process `pid` (in our own pid namespace) to delegate a set to; the
    caller closes it. Raises NotFound for no such process, InvalidArgument for a thread's
    id (pidfd_open's EINVAL)."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise make_error(
            grpc.StatusCode.NOT_FOUND, f"no process {pid} to delegate", "HANDSHAKE"
        ) from None
    except OSError as exc:
        raise make_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{pid} is not a process to delegate ({exc.strerror}): a thread id?"
            " A set follows a process: delegate the process (Tgid: in"
            f" /proc/{pid}/status)",
            "HANDSHAKE",
        ) from None


def holder_ticket(
    target: str,
    *,
    peer_socket: str | None = None,
    delegate_pid: int | None = None,
    delegate_pidfd: int | None = None,
    timeout: float = 5.0,
) -> Ticket:
    """ticket_for, where a ticket is required (listing a holder's sets): the broker names
    the holder only from a handshake. Raises as ticket_for; FailedPrecondition where the
    target has no peer socket."""
    t = ticket_for(
        target,
        peer_socket=peer_socket,
        delegate_pid=delegate_pid,
        delegate_pidfd=delegate_pidfd,
        timeout=timeout,
    )
    if t is None:
        raise make_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"listing a holder's sets needs the broker's peer socket; none for {target}",
            "HANDSHAKE",
        )
    return t


def identity_metadata(
    target: str, *, peer_socket: str | None = None, timeout: float = 5.0
) -> tuple[tuple[str, str], ...]:
    """Call metadata that proves who we are for one call without a session (admin calls,
    List all_sets, Watch): a fresh ticket in `pasid-ticket`, or nothing where the target
    has no peer socket (TCP: the certificate is the identity). Raises as obtain_ticket."""
    t = ticket_for(target, peer_socket=peer_socket, timeout=timeout)
    return ((TICKET_METADATA, t.ticket),) if t is not None else ()


def obtain_ticket(
    path: str,
    *,
    delegate_pidfd: int | None = None,
    fds: Sequence[tuple[str, int]] = (),
    meta: Mapping[str, Any] | None = None,
    timeout: float = 5.0,
) -> Ticket:
    """One handshake on the peer socket at `path`.

    `delegate_pidfd`: a pidfd (os.pidfd_open) of the process that will hold the set, e.g.
    the VMM a sidecar allocates for; allowed if it holds no uid but ours (root: any; it
    counts as ours). `fds`: extra (role, fd) pairs sent with SCM_RIGHTS; `meta`: extra
    fields of the message (e.g. "devices"). Our fds stay ours (the kernel gives the broker copies).
    Raises PermissionDenied (delegation not allowed, pid mismatch), InvalidArgument,
    ResourceExhausted, Unavailable (no broker on `path`); PermissionDenied with reason
    SOCKET_ACCESS where this user may not connect to `path` (not in its group).
    """
    roles = [r for r, _ in fds]
    send = [fd for _, fd in fds]
    if delegate_pidfd is not None:
        roles.insert(0, "pidfd")
        send.insert(0, delegate_pidfd)
    msg: dict[str, Any] = {**(meta or {}), "v": 1, "pid": os.getpid(), "fds": roles}
    data = json.dumps(msg).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        try:
            _connect(s, path, timeout)
        except OSError as exc:
            if access.refused(exc):  # our own connect's errno: not a broker starting
                raise socket_refused(path) from None
            raise Unavailable(
                grpc.StatusCode.UNAVAILABLE, f"peer handshake on {path} failed: {exc}"
            ) from None
        try:
            s.settimeout(timeout)
            if send:
                socket.send_fds(s, [data], send)
            else:
                s.send(data)
            reply = s.recv(MAX_REPLY)
        except OSError as exc:
            raise Unavailable(
                grpc.StatusCode.UNAVAILABLE, f"peer handshake on {path} failed: {exc}"
            ) from None
    if not reply:
        raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"peer socket {path} closed unanswered")
    ans = json.loads(reply)
    if not ans.get("ok"):
        raise _refused(ans)
    return Ticket(
        ticket=ans["ticket"],
        expires_in=float(ans["expires_in"]),
        pid=int(ans["pid"]),
        uid=int(ans["uid"]),
        gid=int(ans["gid"]),
        ns_pid=int(ans["ns_pid"]),
        delegated=bool(ans["delegated"]),
    )


def _connect(s: socket.socket, path: str, timeout: float) -> None:
    """connect(2) that waits up to `timeout` for room in the broker's listen backlog.

    A non-blocking connect (what settimeout makes of it) fails with EAGAIN at once when
    the backlog is full, as another uid's connect flood can make it for a moment; a
    blocking one waits in the kernel, bounded by SO_SNDTIMEO.
    """
    sec = max(int(timeout), 0)
    usec = max(int((timeout - sec) * 1_000_000), 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, usec))
    s.setblocking(True)
    s.connect(path)


def open_request(
    client: str, pid: int | None, grace_seconds: int, resume_token: str, ticket: Ticket | None
) -> pb.OpenSession:
    """OpenSession with the ticket, if any. The pid is only a claim the broker checks: our
    own for our own ticket, none when the holder is a delegated process."""
    if pid is None:
        pid = 0 if ticket is not None and ticket.delegated else os.getpid()
    return pb.OpenSession(
        client=client,
        pid=pid,
        grace_seconds=grace_seconds,
        resume_token=resume_token,
        ticket=ticket.ticket if ticket is not None else "",
    )


def _refused(ans: Mapping[str, Any]) -> PasidClientError:
    code = getattr(grpc.StatusCode, str(ans.get("code", "UNKNOWN")), grpc.StatusCode.UNKNOWN)
    return make_error(code, str(ans.get("error", "handshake refused")), "HANDSHAKE")
