"""The settings, declared: each is ONE field of `Config` made with `setting(...)` naming its
default, its parser (broker/config/values.py), its unit and its help. How the outside
world spells each one (flag, variable, file key) derives from the field's name
(broker/config/load.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from broker import backends
from broker.backends import FALLBACKS
from broker.config.values import (
    MAX_SOCKET_PATH,
    Parse,
    boolean,
    choice,
    default_or_socket_path,
    groups,
    host_port,
    identity_quota,
    integer,
    lines,
    names,
    number,
    optional_path,
    optional_socket_path,
    path,
    ranges,
    seconds,
    show_comma,
    show_identity_quota,
    show_octal,
    show_ranges,
    socket_file_mode,
    socket_path,
    unix_group,
    whole_seconds,
)
from broker.core import DEFAULT_SET_QUOTA, Quarantine, Quotas
from broker.service.limits import Limits

DEFAULT_SOCKET = "/run/pasid-broker/broker.sock"
DEFAULT_DB = "/var/lib/pasid-broker/broker.db"


def setting(
    default: Any,
    parse: Parse,
    help: str,
    *,
    unit: str = "",
    metavar: str | None = None,
    show: Callable[[Any], str] | None = None,
    alias: str = "",
    kind: str = "value",
) -> Any:
    """A Config field that is also a flag, a variable and a file key (see the module doc).

    `alias`: an older name (flag, variable and key) still accepted. `kind`: "value" (the
    flag takes one), "switch" (the flag alone means true) or "repeat" (the flag may be
    given several times; the variable takes one value per line)."""
    meta = {
        "parse": parse,
        "help": help,
        "unit": unit,
        "metavar": metavar,
        "show": show,
        "alias": alias,
        "kind": kind,
    }
    return field(default=default, metadata=meta)


def limit(default: Any, help: str, parse: Parse | None = None) -> Any:
    """A setting of broker/service/limits.py's Limits (docs/limits.md): a count from 0
    (0 = no limit where the help says so) unless `parse` says otherwise."""
    return setting(default, parse or integer(0, 1 << 31), help, unit="limit, docs/limits.md")


@dataclass(frozen=True)
class Config:
    """The daemon's settings. Add one with one `setting(...)` field; see the module doc."""

    backend: str = setting(
        "simulator",
        choice(of=backends.names),
        "where PASID requests go: 'simulator' models the patched kernel's allocator; "
        "'iommufd' attaches granted PASIDs to devices that clients delegate (today's kernels, "
        "6.15+); 'vfio' issues VFIO_IOMMU_PASID_REQUEST on a VFIO container (a kernel with "
        "the seed's patch); docs/vfio.md",
        metavar="BACKEND",
    )
    db: str = setting(
        DEFAULT_DB,
        path,
        "SQLite database file; a lock file PATH.lock keeps a second broker off it",
        metavar="PATH",
    )
    socket: str = setting(
        DEFAULT_SOCKET,
        socket_path,
        "Unix socket to listen on; its permissions are the access control; a lock file "
        "PATH.lock beside it keeps a second broker off it",
        unit=f"path, <= {MAX_SOCKET_PATH} bytes",
        metavar="PATH",
    )
    socket_mode: int = setting(
        0o660, socket_file_mode, "permissions of the socket file", unit="octal", show=show_octal
    )
    socket_group: str = setting(
        "",
        unix_group,
        "group given the socket file (name or gid), so that its members may connect with "
        "--socket-mode 0660; '' = the broker's own group",
        metavar="GROUP",
    )
    admin_socket: str = setting(
        "",
        optional_socket_path,
        "Unix socket for PasidAdmin (list every set, revoke, quotas), mode 0600; '' = "
        "admin.sock beside --socket; 'off' disables",
        metavar="PATH",
    )
    peer_socket: str = setting(
        "",
        default_or_socket_path,
        "Unix SOCK_SEQPACKET socket for the peer handshake: the kernel tells the broker each "
        "local client's pid, uid and gid and a one-time ticket names them in OpenSession "
        "(docs/peer-identity.md); same mode and group as --socket; '' = peer.sock beside "
        "--socket",
        metavar="PATH",
    )
    ticket_seconds: float = setting(
        30.0,
        seconds(0, 3600, above=True),
        "how long a handshake's one-time ticket stays valid; tickets live in memory only",
        unit="seconds, > 0, <= 3600",
    )
    anonymous: str = setting(
        "allow",
        choice("allow", "refuse"),
        "sessions opened on the Unix socket without a handshake ticket (grpcurl, stock gRPC "
        "clients): 'allow' binds their set to the stream and grace only, as for TCP clients; "
        "'refuse' answers UNAUTHENTICATED. TCP sessions are always bound to stream and grace",
        metavar="{allow,refuse}",
    )
    durability: str = setting(
        "fsync",
        choice("fsync", "page-cache"),
        "what an acknowledgement means. 'fsync' (default): every commit is fsynced to the "
        "device before its reply (SQLite synchronous=FULL; group commit keeps the rate). "
        "'page-cache': a reply once the commit is in the OS page cache (synchronous=NORMAL), "
        "fsynced only at checkpoints. RISK: with page-cache, a device write error, a "
        "filesystem turning read-only, or an OS crash loses the last acknowledged "
        "allocations while the clients holding them live on, so a PASID can be handed out "
        "twice after the restart (docs/durability.md)",
        metavar="{fsync,page-cache}",
    )
    slow_commit_seconds: float = setting(
        1.0,
        seconds(0, 3600),
        "readiness: health turns NOT_SERVING while a commit has taken longer than this (a "
        "slow or stuck disk), SERVING again when commits are quick; the 'liveness' health "
        "service keeps answering SERVING. 0 = never",
        unit="seconds, 0..3600",
    )
    store_error_exit_seconds: float = setting(
        30.0,
        seconds(0, 86400),
        "while commits fail, readiness is NOT_SERVING (SERVING again once one lands); if "
        "they keep failing with an I/O error (a device refusing writes, a filesystem turned "
        "read-only: SQLITE_IOERR_*, SQLITE_READONLY_*) for this long, the broker exits 3 "
        "for a restart, as after a failed fsync; a full disk (SQLITE_FULL) never ends it. "
        "0 = never exit (docs/durability.md)",
        unit="seconds, 0..86400",
    )
    event_retention: int = setting(
        100_000,
        integer(1, 1 << 40),
        "events kept in the log for Watch replay; a Watch from an older revision gets OUT_OF_RANGE",
        unit="events, >= 1",
    )
    listen: str = setting(
        "",
        host_port(allow_zero=True, allow_off=True),
        "also listen on TCP HOST:PORT, with mutual TLS (--tls-*); plain TCP only on a "
        "loopback address with --insecure; port 0 picks a free one (logged); '' = no TCP",
        unit="port 0..65535",
        metavar="HOST:PORT",
    )
    tls_cert: str = setting(
        "",
        optional_path,
        "PEM certificate chain the TCP listener presents; re-read when it changes (replace it "
        "by rename)",
        metavar="PATH",
    )
    tls_key: str = setting("", optional_path, "PEM private key of --tls-cert", metavar="PATH")
    tls_client_ca: str = setting(
        "",
        optional_path,
        "PEM CA bundle that TCP clients' certificates must chain to; a TCP caller's identity "
        "is its certificate subject",
        metavar="PATH",
    )
    insecure: bool = setting(
        False,
        boolean,
        "allow --listen without TLS, on a loopback address only; every TCP caller is then "
        "'anonymous' (warned at every start)",
        kind="switch",
    )
    tls_max_connection_age: float = setting(
        3600.0,
        seconds(0, 30 * 86_400, above=True),
        "TCP (--listen): a connection older than this (+-10% jitter) is told to go away "
        "(GOAWAY): its next call needs a new TLS handshake, so a revoked certificate or a "
        "CA rotated out loses access within about 1.1x this plus "
        "--tls-max-connection-age-grace; streams still open then end UNAVAILABLE (a "
        "session resumes on a new connection with its token, within its grace)",
        unit="seconds, > 0",
    )
    tls_max_connection_age_grace: float = setting(
        60.0,
        seconds(0, 30 * 86_400),
        "TCP (--listen): how long calls open on a connection past --tls-max-connection-age "
        "may go on before the connection is closed",
        unit="seconds, >= 0",
    )
    admin_group: tuple[str, ...] = setting(
        (),
        names,
        "group name(s) or gid(s) whose members may make admin calls (PasidAdmin, List "
        "all_sets, the full Watch) besides uid 0 and the broker's own uid, e.g. 'pasid-admin'",
        metavar="GROUP[,GROUP]",
        show=lambda v: ",".join(v),
    )
    admin_subject: tuple[str, ...] = setting(
        (),
        lines,
        "TCP: a client certificate subject (as RFC 2253, e.g. 'CN=ops,O=example') allowed "
        "admin calls; repeat for more (the variable: one per line); none = no admin over TCP",
        metavar="SUBJECT",
        show=lambda v: "; ".join(v),
        kind="repeat",
    )
    pasid_bits: int = setting(
        20,
        integer(1, 64),
        "simulator: PASID width to model (PCIe allows 20)",
        unit="bits, 1..64",
    )
    reserved: tuple[tuple[int, int], ...] = setting(
        (),
        ranges,
        "PASIDs never handed out besides 0, e.g. '1-63,4096' (a range the host kernel keeps "
        "for its own SVA)",
        metavar="RANGES",
        show=show_ranges,
    )
    quota_per_set: int = setting(
        DEFAULT_SET_QUOTA,
        integer(0, 1 << 32),
        "most PASIDs one set may hold, 0 = no limit; the default is the series' "
        "VFIO_DEFAULT_PASID_QUOTA",
        unit="PASIDs, >= 0",
    )
    quota_per_identity: tuple[int, float] = setting(
        (0, 0.25),
        identity_quota,
        "most PASIDs one verified identity may hold across all its sets: a uid on the Unix "
        "socket, a certificate subject over TCP, or the one shared 'anonymous'; N, or N% of "
        "the capacity; 0 = no limit. Renaming a client or opening more sessions does not "
        "escape it. SetQuotas changes it durably",
        unit="PASIDs or % of the capacity",
        metavar="N|N%",
        show=show_identity_quota,
        alias="quota_per_client",
    )
    quota_anonymous: tuple[int, float] = setting(
        (0, 0.10),
        identity_quota,
        "most PASIDs all callers without a verified identity may hold together (no peer "
        "ticket on the Unix socket, plain TCP): N, or N% of the capacity; 0 = only "
        "--quota-per-identity. One uid can take this share besides its own quota "
        "(docs/limits.md, worst cases), so it is smaller",
        unit="PASIDs or % of the capacity",
        metavar="N|N%",
        show=show_identity_quota,
    )
    quota_global: int = setting(
        0,
        integer(0, 1 << 32),
        "most PASIDs held in all, 0 = the whole capacity; leaves headroom for users outside "
        "the broker",
        unit="PASIDs, >= 0",
    )
    quarantine_seconds: float = setting(
        0.0,
        seconds(0, 86_400),
        "keep a freed PASID out of the pool for this long, in case a device still has DMA in "
        "flight tagged with it; 0 = reuse at once, as the kernel does (docs/quarantine.md); "
        "stored, so a restart keeps it",
        unit="seconds, 0..86400",
    )
    quarantine_allocs: int = setting(
        0,
        integer(0, 1 << 32),
        "and until this many PASIDs have been handed out since; with both set, both must "
        "hold; 0 = no such condition",
        unit="PASIDs, >= 0",
    )
    kernel_quota: int = setting(
        0,
        integer(0, 1 << 32),
        "simulator: model vfio_pasid's pasid_quota module parameter, 0 = no limit",
        unit="PASIDs, >= 0",
    )
    max_grace: int = setting(
        300,
        whole_seconds(0, 30 * 86_400),
        "cap on the grace an anonymous or TCP session may ask for (a kernel-verified "
        "holder's set has none: it is kept while its holder process lives)",
        unit="seconds, 0..2592000",
    )
    restart_grace: int = setting(
        10,
        whole_seconds(0, 30 * 86_400),
        "after a restart, how long anonymous and TCP clients may resume their sets before "
        "they are reclaimed (a live verified holder's set is kept for as long as it runs) "
        "(a broker crash is not a client's exit)",
        unit="seconds, 0..2592000",
    )
    drain_seconds: float = setting(
        5.0,
        seconds(0, 3600),
        "on SIGTERM, how long in-flight calls may finish",
        unit="seconds, 0..3600",
    )
    connection_idle_seconds: float = setting(
        120.0,
        seconds(0, 30 * 86_400),
        "clients' Unix socket: a connection with no call open for this long is closed "
        "(GOAWAY; a client reconnects for its next call, a Session stream is a call and "
        "keeps its connection); 0 = never. Bounds the descriptors idle connections hold",
        unit="seconds, 0..2592000",
    )
    fd_reserve: int = setting(
        1024,
        integer(0, 1 << 20),
        "descriptors kept from the clients' socket's connections, for the admin socket, "
        "the peer handshake, the database and metrics: that socket holds at most "
        "(RLIMIT_NOFILE - this) / 2 connections at once, the rest wait in its backlog "
        "(docs/limits.md)",
        unit="descriptors",
    )
    keepalive_seconds: float = setting(
        10.0,
        seconds(0, 3600, above=True),
        "TCP (--listen) only: HTTP/2 ping interval; a silent remote peer is dropped (and its "
        "stream ends) after about 1.5x this. The Unix socket sends no keepalive pings: a "
        "stopped local client keeps its set (docs/peer-identity.md, the liveness rule)",
        unit="seconds, > 0, <= 3600",
    )
    vfio_group: tuple[str, ...] = setting(
        (),
        groups,
        "vfio only: IOMMU group number(s) to attach to the container, e.g. '5' or '5,7' "
        "(/dev/vfio/N; each group's devices bound to vfio-pci); empty = every group in "
        "/dev/vfio",
        metavar="N[,N]",
        show=show_comma,
    )
    vfio_pasid_bits: int = setting(
        0,
        integer(0, 64),
        "vfio only: PASID width when the kernel reports no nesting capability, instead of the "
        "VT-d ecap's PSS+1 from sysfs; 0 = from the kernel",
        unit="bits, 0..64",
    )
    vfio_fallback: str = setting(
        "none",
        choice(*FALLBACKS),
        "vfio only: what to do when the kernel cannot serve PASID requests: 'none' refuses to "
        "start (exit 2); 'simulator' logs a warning and serves from the simulator, so PASIDs "
        "are arbitrated but NOT allocated in the kernel",
        metavar="{" + ",".join(FALLBACKS) + "}",
    )
    log_format: str = setting(
        "text",
        choice("text", "json"),
        "text for people, json for one object per line",
        metavar="{text,json}",
    )
    log_level: str = setting(
        "INFO",
        choice("DEBUG", "INFO", "WARNING", "ERROR"),
        "least severe level logged",
        metavar="{DEBUG,INFO,WARNING,ERROR}",
    )
    metrics_address: str = setting(
        "127.0.0.1:9464",
        host_port(allow_zero=True, allow_off=True),
        "serve Prometheus metrics at http://HOST:PORT/metrics; loopback by default, as they "
        "name clients; port 0 picks a free one (logged); 'off' disables",
        unit="port 0..65535",
        metavar="HOST:PORT|off",
    )
    metrics_tls_cert: str = setting(
        "",
        optional_path,
        "PEM certificate chain for the metrics listener: serve /metrics over HTTPS ('' = "
        "plain HTTP); read at start",
        metavar="PATH",
    )
    metrics_tls_key: str = setting(
        "", optional_path, "PEM private key of --metrics-tls-cert", metavar="PATH"
    )
    metrics_tls_client_ca: str = setting(
        "",
        optional_path,
        "PEM CA bundle that scrapers' client certificates must chain to (needs "
        "--metrics-tls-cert); a scraper without one is refused at the handshake",
        metavar="PATH",
    )
    metrics_tenants: str = setting(
        "auto",
        choice("auto", "on", "off"),
        "serve the metrics that name tenants (pasid_broker_top_client_pasids, "
        "pasid_broker_top_holder_pasids: client names, pids, uids): 'auto' = only when "
        "scrapers need a client certificate (--metrics-tls-client-ca), as admins do over "
        "TCP; 'on' = to whoever reaches --metrics-address",
        metavar="{auto,on,off}",
    )
    health_address: str = setting(
        "off",
        host_port(allow_zero=True, allow_off=True),
        "also serve grpc.health.v1 alone on TCP HOST:PORT, for probes that cannot reach a "
        "Unix socket (Kubernetes grpc probes); nothing else is served there; 'off' disables",
        unit="port 0..65535",
        metavar="HOST:PORT|off",
    )

    max_sessions_per_identity: int = limit(
        Limits.max_sessions_per_identity,
        "live sessions (attached or in their grace) one identity may hold; each holds a set, "
        "a pidfd and a connection; 0 = no limit",
    )
    session_opens_per_second: float = limit(
        Limits.session_opens_per_second,
        "session opens (new or resumed) per second one identity may make (a token bucket); 0 "
        "= no limit",
        number(0, 1e9),
    )
    session_open_burst: int = limit(
        Limits.session_open_burst,
        "opens one identity may make at once before --session-opens-per-second applies",
    )
    max_inflight_per_stream: int = limit(
        Limits.max_inflight_per_stream,
        "requests read from one Session stream and not yet answered; beyond it the broker "
        "stops reading that stream (back-pressure); 0 = no limit",
    )
    max_client_name_bytes: int = limit(
        Limits.max_client_name_bytes,
        "longest OpenSession.client, in UTF-8 bytes (longer: INVALID_ARGUMENT)",
    )
    max_watchers: int = limit(
        Limits.max_watchers,
        "Watch streams open at once, in all; 0 = no limit",
    )
    max_watchers_per_identity: int = limit(
        Limits.max_watchers_per_identity,
        "Watch streams one identity may have open; 0 = no limit",
    )
    max_watchers_anonymous: int = limit(
        Limits.max_watchers_anonymous,
        "Watch streams all anonymous callers (no peer ticket, plain TCP) may have open "
        "together; one uid may hold these besides its own; 0 = no limit",
    )
    max_pasids_per_request: int = limit(
        Limits.max_pasids_per_request,
        "most PASIDs one Alloc may ask for: bounds the work one request makes the broker do "
        "while others wait; 0 = no limit",
    )
    watch_buffer: int = limit(
        Limits.watch_buffer,
        "committed events kept in memory for live watchers; a watcher further behind is cut "
        "off with RESOURCE_EXHAUSTED naming the revision to Watch again from",
    )
    max_request_bytes: int = limit(
        Limits.max_request_bytes,
        "largest request message accepted (bytes); larger: RESOURCE_EXHAUSTED from gRPC",
    )

    @property
    def limits(self) -> Limits:
        """What one client may make the broker hold (broker/service/limits.py)."""
        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits)})

    @property
    def metrics_tenant_series(self) -> bool:
        """Whether /metrics names tenants (--metrics-tenants; 'auto': only to scrapers
        with a client certificate)."""
        if self.metrics_tenants == "auto":
            return bool(self.metrics_tls_cert and self.metrics_tls_client_ca)
        return self.metrics_tenants == "on"

    @property
    def quotas(self) -> Quotas:
        return Quotas(self.quota_per_set, self.quota_per_identity[0], self.quota_global)

    @property
    def identity_share(self) -> float:
        """--quota-per-identity N%: that share of the capacity (quotas.per_client is 0)."""
        return self.quota_per_identity[1]

    @property
    def quarantine(self) -> Quarantine:
        return Quarantine(self.quarantine_seconds, self.quarantine_allocs)

    @property
    def vfio_groups(self) -> tuple[str, ...]:
        return self.vfio_group

    @property
    def admin_groups(self) -> tuple[str, ...]:
        return self.admin_group

    @property
    def admin_subjects(self) -> tuple[str, ...]:
        return self.admin_subject

    @property
    def admin_socket_path(self) -> str:
        """The admin socket to bind: admin.sock beside --socket by default, '' if 'off'."""
        return admin_socket_path(self.admin_socket, self.socket)

    @property
    def peer_socket_path(self) -> str:
        """The handshake socket: peer.sock beside --socket by default."""
        return peer_socket_path(self.peer_socket, self.socket)

    def unix_sockets(self) -> list[str]:
        """Every Unix socket this broker binds (each gets a lock file beside it,
        broker/service/instance.py)."""
        return [p for p in (self.socket, self.admin_socket_path, self.peer_socket_path) if p]


def admin_socket_path(value: str, socket: str) -> str:
    """'' -> admin.sock beside the clients' socket; 'off' -> '' (no admin socket)."""
    if value == "off":
        return ""
    return value or os.path.join(os.path.dirname(socket) or ".", "admin.sock")


def peer_socket_path(value: str, socket: str) -> str:
    """'' -> peer.sock beside the clients' socket (where the client library looks)."""
    return value or os.path.join(os.path.dirname(socket) or ".", "peer.sock")
