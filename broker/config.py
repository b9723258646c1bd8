"""Configuration: every setting is a flag, and every flag has a PASID_BROKER_* variable.

Precedence: flag, then environment, then the default shown in --help.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from broker import backends
from broker.backends import FALLBACKS
from broker.core import DEFAULT_SET_QUOTA, Quarantine, Quotas
from broker.service.limits import Limits

ENV_PREFIX = "PASID_BROKER_"
DEFAULT_SOCKET = "/run/pasid-broker/broker.sock"
DEFAULT_DB = "/var/lib/pasid-broker/broker.db"


@dataclass(frozen=True)
class Config:
    backend: str = "simulator"
    db: str = DEFAULT_DB
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    admin_socket: str = ""
    peer_socket: str = ""
    ticket_seconds: float = 30.0
    anonymous: str = "allow"
    event_retention: int = 100_000
    listen: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure: bool = False
    admin_groups: tuple[str, ...] = ()
    admin_subjects: tuple[str, ...] = ()
    pasid_bits: int = 20
    reserved: tuple[tuple[int, int], ...] = ()
    quotas: Quotas = field(default_factory=Quotas)
    # --quota-per-identity N%: that share of the capacity (quotas.per_client is then 0).
    identity_share: float = 0.0
    quarantine: Quarantine = field(default_factory=Quarantine)
    kernel_quota: int = 0
    max_grace: int = 300
    restart_grace: int = 10
    drain_seconds: float = 5.0
    log_format: str = "text"
    log_level: str = "INFO"
    keepalive_seconds: float = 10.0
    vfio_groups: tuple[str, ...] = ()
    vfio_pasid_bits: int = 0
    vfio_fallback: str = "none"
    metrics_address: str = "127.0.0.1:9464"
    limits: Limits = field(default_factory=Limits)


def parse_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """ "1-63,4096" -> ((1, 63), (4096, 4096))."""
    out: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        a, b = int(lo, 0), int(hi or lo, 0)
        if a > b:
            raise argparse.ArgumentTypeError(f"reserved range {part}: {a} > {b}")
        out.append((a, b))
    return tuple(out)


def admin_socket_path(value: str, socket: str) -> str:
    """'' -> admin.sock beside the clients' socket; 'off' -> '' (no admin socket)."""
    if value == "off":
        return ""
    return value or os.path.join(os.path.dirname(socket) or ".", "admin.sock")


def peer_socket_path(value: str, socket: str) -> str:
    """'' -> peer.sock beside the clients' socket (where the client library looks)."""
    return value or os.path.join(os.path.dirname(socket) or ".", "peer.sock")


def parse_groups(text: str) -> tuple[str, ...]:
    """ "5,7" -> ("5", "7"): IOMMU group numbers as /dev/vfio names them."""
    groups = tuple(filter(None, (g.strip() for g in text.split(","))))
    for g in groups:
        if not g.isdigit():
            raise argparse.ArgumentTypeError(f"IOMMU group {g!r} is not a number")
    return groups


DEFAULT_IDENTITY_QUOTA = "25%"


def parse_identity_quota(text: str) -> tuple[int, float]:
    """ "3000" -> (3000, 0.0); "25%" -> (0, 0.25): a share of the capacity, known at start."""
    t = text.strip()
    if t.endswith("%"):
        pct = float(t[:-1])
        if not 0 < pct <= 100:
            raise argparse.ArgumentTypeError(f"{text}: a share must be in (0, 100]%")
        return 0, pct / 100
    n = int(t)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} < 0")
    return n, 0.0


def parse_names(text: str) -> tuple[str, ...]:
    """ "wheel, 27" -> ("wheel", "27"): group names or numbers."""
    return tuple(filter(None, (g.strip() for g in text.split(","))))


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: `kind` (int or float) of the text, refusing negative values."""

    def parse(text: str) -> float:
        v = kind(text)
        if v < 0:
            raise argparse.ArgumentTypeError(f"{text} < 0")
        return v

    return parse


def _pasid_bits(text: str) -> int:
    v = int(text)
    if not 1 <= v <= 64:
        raise argparse.ArgumentTypeError(f"{text} outside 1..64 (PCIe PASIDs are 20 bits)")
    return v


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="pasid-broker",
        description=(
            "Arbitrate this host's system-wide PCIe PASID namespace over gRPC. Each client "
            "session owns one ioasid_set; PASIDs it did not free are freed when the session "
            "ends (set-destroy-on-exit). Every allocation is durable in SQLite before it is "
            "acknowledged. Each flag can also be set by the environment variable shown."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a(
        "--backend",
        choices=backends.names(),
        default=_env("BACKEND", d.backend),
        help="where PASID requests go: 'simulator' models the patched kernel's allocator; "
        "'iommufd' attaches granted PASIDs to devices that clients delegate (today's "
        "kernels, 6.15+); 'vfio' issues VFIO_IOMMU_PASID_REQUEST on a VFIO container (a "
        "kernel with the seed's patch); docs/vfio.md [PASID_BROKER_BACKEND]",
    )
    a(
        "--db",
        default=_env("DB", d.db),
        help="SQLite database file; a lock file PATH.lock keeps a second broker off it "
        "[PASID_BROKER_DB]",
    )
    a(
        "--socket",
        default=_env("SOCKET", d.socket),
        help="Unix socket to listen on; its permissions are the access control "
        "[PASID_BROKER_SOCKET]",
    )
    a(
        "--socket-mode",
        type=lambda s: int(s, 8),
        default=_env("SOCKET_MODE", oct(d.socket_mode)),
        help="permissions of the socket file, octal [PASID_BROKER_SOCKET_MODE]",
    )
    a(
        "--admin-socket",
        default=_env("ADMIN_SOCKET", ""),
        help="Unix socket for PasidAdmin (list every set, revoke, quotas), mode 0600; "
        "default: admin.sock beside --socket; 'off' disables [PASID_BROKER_ADMIN_SOCKET]",
    )
    a(
        "--peer-socket",
        default=_env("PEER_SOCKET", ""),
        help="Unix SOCK_SEQPACKET socket for the peer handshake: the kernel tells the broker "
        "each local client's pid, uid and gid and a one-time ticket names them in "
        "OpenSession (docs/peer-identity.md); same mode as --socket; default: peer.sock "
        "beside --socket [PASID_BROKER_PEER_SOCKET]",
    )
    a(
        "--ticket-seconds",
        type=_non_negative(float),
        default=_env("TICKET_SECONDS", str(d.ticket_seconds)),
        help="how long a handshake's one-time ticket stays valid; tickets live in memory "
        "only [PASID_BROKER_TICKET_SECONDS]",
    )
    a(
        "--anonymous",
        choices=("allow", "refuse"),
        default=_env("ANONYMOUS", d.anonymous),
        help="sessions opened on the Unix socket without a handshake ticket (grpcurl, stock "
        "gRPC clients): 'allow' binds their set to the stream and grace only, as for TCP "
        "clients; 'refuse' answers UNAUTHENTICATED. TCP sessions are always bound to "
        "stream and grace [PASID_BROKER_ANONYMOUS]",
    )
    a(
        "--event-retention",
        type=int,
        default=int(_env("EVENT_RETENTION", str(d.event_retention))),
        help="events kept in the log for Watch replay; a Watch from an older revision gets "
        "OUT_OF_RANGE [PASID_BROKER_EVENT_RETENTION]",
    )
    a(
        "--listen",
        default=_env("LISTEN", d.listen),
        help="also listen on TCP HOST:PORT, with mutual TLS (--tls-*); plain TCP only on a "
        "loopback address with --insecure [PASID_BROKER_LISTEN]",
    )
    a(
        "--tls-cert",
        default=_env("TLS_CERT", d.tls_cert),
        help="PEM certificate chain the TCP listener presents; re-read when it changes "
        "(replace it by rename) [PASID_BROKER_TLS_CERT]",
    )
    a(
        "--tls-key",
        default=_env("TLS_KEY", d.tls_key),
        help="PEM private key of --tls-cert [PASID_BROKER_TLS_KEY]",
    )
    a(
        "--tls-client-ca",
        default=_env("TLS_CLIENT_CA", d.tls_client_ca),
        help="PEM CA bundle that TCP clients' certificates must chain to; a TCP caller's "
        "identity is its certificate subject [PASID_BROKER_TLS_CLIENT_CA]",
    )
    a(
        "--insecure",
        action="store_true",
        default=_env("INSECURE", "") in ("1", "true", "yes"),
        help="allow --listen without TLS, on a loopback address only; every TCP caller is "
        "then 'anonymous' (warned at every start) [PASID_BROKER_INSECURE=1]",
    )
    a(
        "--admin-group",
        type=parse_names,
        default=parse_names(_env("ADMIN_GROUP", "")),
        help="group name(s) or gid(s) whose members may make admin calls (PasidAdmin, "
        "List all_sets, the full Watch) besides uid 0 and the broker's own uid, e.g. "
        "'pasid-admin' [PASID_BROKER_ADMIN_GROUP]",
    )
    a(
        "--admin-subject",
        action="append",
        default=[v for v in _env("ADMIN_SUBJECT", "").split("\n") if v],
        help="TCP: a client certificate subject (as RFC 2253, e.g. 'CN=ops,O=example') "
        "allowed admin calls; repeat for more; none = no admin over TCP "
        "[PASID_BROKER_ADMIN_SUBJECT, several separated by newlines]",
    )
    a(
        "--pasid-bits",
        type=_pasid_bits,
        default=int(_env("PASID_BITS", str(d.pasid_bits))),
        help="simulator: PASID width to model (PCIe allows 20) [PASID_BROKER_PASID_BITS]",
    )
    a(
        "--reserved",
        type=parse_ranges,
        default=parse_ranges(_env("RESERVED", "")),
        help="PASIDs never handed out besides 0, e.g. '1-63,4096' (a range the host kernel "
        "keeps for its own SVA) [PASID_BROKER_RESERVED]",
    )
    a(
        "--quota-per-set",
        type=int,
        default=int(_env("QUOTA_PER_SET", str(DEFAULT_SET_QUOTA))),
        help="most PASIDs one set may hold, 0 = no limit; the default is the series' "
        "VFIO_DEFAULT_PASID_QUOTA [PASID_BROKER_QUOTA_PER_SET]",
    )
    a(
        "--quota-per-identity",
        "--quota-per-client",
        dest="quota_per_identity",
        type=parse_identity_quota,
        default=parse_identity_quota(
            _env("QUOTA_PER_IDENTITY", _env("QUOTA_PER_CLIENT", DEFAULT_IDENTITY_QUOTA))
        ),
        help="most PASIDs one verified identity may hold across all its sets: a uid on "
        "the Unix socket, a certificate subject over TCP, or the one shared 'anonymous'; "
        "N, or N%% of the capacity; 0 = no limit. Renaming a client or opening more "
        "sessions does not escape it. SetQuotas changes it durably "
        "[PASID_BROKER_QUOTA_PER_IDENTITY; the old name --quota-per-client and "
        "PASID_BROKER_QUOTA_PER_CLIENT still work]",
    )
    a(
        "--quota-global",
        type=int,
        default=int(_env("QUOTA_GLOBAL", "0")),
        help="most PASIDs held in all, 0 = the whole capacity; leaves headroom for users "
        "outside the broker [PASID_BROKER_QUOTA_GLOBAL]",
    )
    a(
        "--quarantine-seconds",
        type=_non_negative(float),
        default=_env("QUARANTINE_SECONDS", str(d.quarantine.seconds)),
        help="keep a freed PASID out of the pool for this long, in case a device still has "
        "DMA in flight tagged with it; 0 = reuse at once, as the kernel does (see "
        "docs/quarantine.md); stored, so a restart keeps it "
        "[PASID_BROKER_QUARANTINE_SECONDS]",
    )
    a(
        "--quarantine-allocs",
        type=_non_negative(int),
        default=_env("QUARANTINE_ALLOCS", str(d.quarantine.allocs)),
        help="and until this many PASIDs have been handed out since; with both set, both "
        "must hold; 0 = no such condition [PASID_BROKER_QUARANTINE_ALLOCS]",
    )
    a(
        "--kernel-quota",
        type=int,
        default=int(_env("KERNEL_QUOTA", "0")),
        help="simulator: model vfio_pasid's pasid_quota module parameter, "
        "0 = no limit "
        "[PASID_BROKER_KERNEL_QUOTA]",
    )
    a(
        "--max-grace",
        type=int,
        default=int(_env("MAX_GRACE", str(d.max_grace))),
        help="cap, in seconds, on the grace a session may ask for [PASID_BROKER_MAX_GRACE]",
    )
    a(
        "--restart-grace",
        type=int,
        default=int(_env("RESTART_GRACE", str(d.restart_grace))),
        help="seconds after a restart during which clients may resume their sets before "
        "they are reclaimed (a broker crash is not a client's exit) [PASID_BROKER_RESTART_GRACE]",
    )
    a(
        "--drain-seconds",
        type=float,
        default=float(_env("DRAIN_SECONDS", str(d.drain_seconds))),
        help="on SIGTERM, how long in-flight calls may finish [PASID_BROKER_DRAIN_SECONDS]",
    )
    a(
        "--keepalive-seconds",
        type=float,
        default=float(_env("KEEPALIVE_SECONDS", str(d.keepalive_seconds))),
        help="TCP (--listen) only: HTTP/2 ping interval; a silent remote peer is dropped (and "
        "its stream ends) after about 1.5x this. The Unix socket sends no keepalive pings: "
        "a stopped local client keeps its set (docs/peer-identity.md, the liveness rule) "
        "[PASID_BROKER_KEEPALIVE_SECONDS]",
    )
    a(
        "--vfio-group",
        type=parse_groups,
        default=parse_groups(_env("VFIO_GROUP", "")),
        help="vfio only: IOMMU group number(s) to attach to the container, e.g. '5' or '5,7' "
        "(/dev/vfio/N; each group's devices bound to vfio-pci); empty = every group in "
        "/dev/vfio [PASID_BROKER_VFIO_GROUP]",
    )
    a(
        "--vfio-pasid-bits",
        type=int,
        default=int(_env("VFIO_PASID_BITS", "0")),
        help="vfio only: PASID width when the kernel reports no nesting capability, instead "
        "of the VT-d ecap's PSS+1 from sysfs; 0 = from the kernel [PASID_BROKER_VFIO_PASID_BITS]",
    )
    a(
        "--vfio-fallback",
        choices=FALLBACKS,
        default=_env("VFIO_FALLBACK", d.vfio_fallback),
        help="vfio only: what to do when the kernel cannot serve PASID requests: 'none' "
        "refuses to start (exit 2); 'simulator' logs a warning and serves from the simulator, "
        "so PASIDs are arbitrated but NOT allocated in the kernel [PASID_BROKER_VFIO_FALLBACK]",
    )
    a(
        "--log-format",
        choices=("text", "json"),
        default=_env("LOG_FORMAT", d.log_format),
        help="text for people, json for one object per line [PASID_BROKER_LOG_FORMAT]",
    )
    a(
        "--log-level",
        default=_env("LOG_LEVEL", d.log_level),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="[PASID_BROKER_LOG_LEVEL]",
    )
    a(
        "--metrics-address",
        default=_env("METRICS_ADDRESS", d.metrics_address),
        help="serve Prometheus metrics at http://HOST:PORT/metrics; loopback by default, as "
        "they name clients; port 0 picks a free one (logged), 'off' disables "
        "[PASID_BROKER_METRICS_ADDRESS]",
    )
    _limit_flags(p)
    return p


# The limits on what one client may make the broker hold (broker/service/limits.py; the
# table with the reasons is docs/limits.md): (flag, Limits field, type, help).
_LIMITS: tuple[tuple[str, str, Callable[[str], float], str], ...] = (
    (
        "--max-sessions-per-identity",
        "max_sessions_per_identity",
        int,
        "live sessions (attached or in their grace) one identity may hold; each holds a "
        "set, a pidfd and a connection; 0 = no limit",
    ),
    (
        "--session-opens-per-second",
        "session_opens_per_second",
        float,
        "session opens (new or resumed) per second one identity may make (a token "
        "bucket); 0 = no limit",
    ),
    (
        "--session-open-burst",
        "session_open_burst",
        int,
        "opens one identity may make at once before --session-opens-per-second applies",
    ),
    (
        "--max-inflight-per-stream",
        "max_inflight_per_stream",
        int,
        "requests read from one Session stream and not yet answered; beyond it the "
        "broker stops reading that stream (back-pressure); 0 = no limit",
    ),
    (
        "--max-client-name-bytes",
        "max_client_name_bytes",
        int,
        "longest OpenSession.client, in UTF-8 bytes (longer: INVALID_ARGUMENT)",
    ),
    (
        "--max-watchers",
        "max_watchers",
        int,
        "Watch streams open at once, in all; 0 = no limit",
    ),
    (
        "--max-watchers-per-identity",
        "max_watchers_per_identity",
        int,
        "Watch streams one identity may have open; 0 = no limit",
    ),
    (
        "--max-pasids-per-request",
        "max_pasids_per_request",
        int,
        "most PASIDs one Alloc may ask for: bounds the work one request makes the broker "
        "do while others wait; 0 = no limit",
    ),
    (
        "--watch-buffer",
        "watch_buffer",
        int,
        "committed events kept in memory for live watchers; a watcher further behind is "
        "cut off with RESOURCE_EXHAUSTED naming the revision to Watch again from",
    ),
    (
        "--max-request-bytes",
        "max_request_bytes",
        int,
        "largest request message accepted (bytes); larger: RESOURCE_EXHAUSTED from gRPC",
    ),
)


def _limit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "limits",
        "what one client may make the broker hold; per identity means per kernel-verified "
        "uid (anonymous callers share one identity); see docs/limits.md",
    )
    d = Limits()
    for flag, name, kind, text in _LIMITS:
        env = flag[2:].replace("-", "_").upper()
        g.add_argument(
            flag,
            type=_non_negative(kind),
            default=kind(_env(env, str(getattr(d, name)))),
            help=f"{text} [{ENV_PREFIX}{env}]",
        )


def load(argv: list[str] | None = None) -> Config:
    ns = build_parser().parse_args(argv)
    return Config(
        backend=ns.backend,
        db=ns.db,
        socket=ns.socket,
        socket_mode=ns.socket_mode,
        admin_socket=admin_socket_path(ns.admin_socket, ns.socket),
        peer_socket=peer_socket_path(ns.peer_socket, ns.socket),
        ticket_seconds=float(ns.ticket_seconds),
        anonymous=ns.anonymous,
        event_retention=ns.event_retention,
        listen=ns.listen,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_client_ca=ns.tls_client_ca,
        insecure=ns.insecure,
        admin_groups=ns.admin_group,
        admin_subjects=tuple(ns.admin_subject),
        pasid_bits=ns.pasid_bits,
        reserved=ns.reserved,
        quotas=Quotas(ns.quota_per_set, ns.quota_per_identity[0], ns.quota_global),
        identity_share=ns.quota_per_identity[1],
        quarantine=Quarantine(float(ns.quarantine_seconds), int(ns.quarantine_allocs)),
        kernel_quota=ns.kernel_quota,
        max_grace=ns.max_grace,
        restart_grace=ns.restart_grace,
        drain_seconds=ns.drain_seconds,
        log_format=ns.log_format,
        log_level=ns.log_level,
        keepalive_seconds=ns.keepalive_seconds,
        vfio_groups=ns.vfio_group,
        vfio_pasid_bits=ns.vfio_pasid_bits,
        vfio_fallback=ns.vfio_fallback,
        metrics_address=ns.metrics_address,
        limits=Limits(**{name: getattr(ns, name) for _, name, _, _ in _LIMITS}),
    )
