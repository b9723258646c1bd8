"""Configuration, in one place: flags, PASID_BROKER_* variables and an optional TOML file.

Precedence, for every setting: flag > environment > file (--config) > default.

Each setting is ONE declaration: a field of `Config` made with `setting(...)`, which names
its default, how a value is read and checked (unit and range), and its help. The flag
(--quota-per-set), the variable (PASID_BROKER_QUOTA_PER_SET) and the file key
(quota_per_set, or quota-per-set) all derive from the field's name. A value that fails
its check, an unknown file key or an unknown PASID_BROKER_* variable is a refusal to
start: one line on stderr, exit 2 (`ConfigError`), naming the nearest valid spelling.
"""

from __future__ import annotations

import argparse
import difflib
import grp
import ipaddress
import json
import math
import os
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

from broker import __version__, backends
from broker.backends import FALLBACKS
from broker.core import DEFAULT_SET_QUOTA, Quarantine, Quotas
from broker.service.limits import Limits

ENV_PREFIX = "PASID_BROKER_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
DEFAULT_SOCKET = "/run/pasid-broker/broker.sock"
DEFAULT_DB = "/var/lib/pasid-broker/broker.db"
# sun_path is 108 bytes with its NUL: a longer path cannot be bound (unix(7)).
MAX_SOCKET_PATH = 107
# PASID_BROKER_* variables that other programs read; the daemon leaves them alone. A
# program that runs the daemon's main in its own process may add its own (the tests'
# launcher does); any other unknown PASID_BROKER_* variable refuses the start.
FOREIGN_ENV: dict[str, str] = {
    ENV_PREFIX + "ADDRESS": "pasidctl's broker address",
}


class ConfigError(Exception):
    """A setting the daemon refuses; the message is the one line printed before exit 2."""


Parse = Callable[[object], Any]


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


# Parsers: a raw value (text from a flag or variable; a TOML value from the file) -> the
# checked value, or ValueError saying what is wrong in words an operator acts on.


def _scalar_text(raw: object) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"expected a single value, not {type(raw).__name__}")
    return raw if isinstance(raw, str) else repr(raw)


def text(raw: object) -> str:
    return _scalar_text(raw).strip()


def path(raw: object) -> str:
    v = text(raw)
    if not v:
        raise ValueError("empty path")
    if "\0" in v:
        raise ValueError("path contains NUL")
    return v


def socket_path(raw: object) -> str:
    v = path(raw)
    n = len(os.fsencode(v))
    if n > MAX_SOCKET_PATH:
        raise ValueError(
            f"{n} bytes, over the {MAX_SOCKET_PATH} a Unix socket path may have; choose a "
            "shorter one"
        )
    return v


def optional_socket_path(raw: object) -> str:
    """'' = the default beside --socket, 'off' = none, else a socket path."""
    v = text(raw)
    return v if v in ("", "off") else socket_path(v)


def default_or_socket_path(raw: object) -> str:
    """'' = the default beside --socket, else a socket path."""
    v = text(raw)
    return v if v == "" else socket_path(v)


def boolean(raw: object) -> bool:
    """true/false, yes/no, on/off, 1/0 (a TOML boolean as it is)."""
    if isinstance(raw, bool):
        return raw
    v = text(raw).lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean (true/false, yes/no, 1/0)")


def names(raw: object) -> tuple[str, ...]:
    """ "wheel, 27" (or a TOML list) -> ("wheel", "27"): group names or numbers."""
    items = raw if isinstance(raw, list) else _scalar_text(raw).split(",")
    return tuple(s for s in (_scalar_text(g).strip() for g in items) if s)


def lines(raw: object) -> tuple[str, ...]:
    """Repeated values (a repeated flag, one per line of a variable, a TOML list)."""
    items = raw if isinstance(raw, list) else [raw]
    return tuple(s for s in (_scalar_text(i).strip() for i in items) if s)


def identity_quota(raw: object) -> tuple[int, float]:
    """ "3000" -> (3000, 0.0); "25%" -> (0, 0.25): a share of the capacity, known at start."""
    t = _scalar_text(raw).strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise ValueError("not N or N%") from None
        if not 0 < pct <= 100:
            raise ValueError("a share must be in (0, 100]%")
        return 0, pct / 100
    return integer(0, 1 << 32)(t), 0.0


def show_identity_quota(v: tuple[int, float]) -> str:
    return f"{v[1] * 100:g}%" if v[1] else str(v[0])


def optional_path(raw: object) -> str:
    v = text(raw)
    return v if v == "" else path(v)


def choice(*fixed: str, of: Callable[[], Sequence[str]] | None = None) -> Parse:
    """One of `fixed`, or of the names `of()` gives when the value is read (a registry
    that may grow after import, such as the backends')."""

    def parse(raw: object) -> str:
        v = text(raw)
        names = tuple(of()) if of is not None else fixed
        if v not in names:
            near = difflib.get_close_matches(v, names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(f"must be one of {', '.join(names)}{hint}")
        return v

    return parse


def integer(lo: int, hi: int) -> Parse:
    def parse(raw: object) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            v = raw
        else:
            s = _scalar_text(raw).strip()
            try:
                v = int(s, 0)
            except ValueError:
                raise ValueError("not an integer") from None
        if v < lo:
            raise ValueError(f"must be >= {lo}")
        if v > hi:
            raise ValueError(f"must be <= {hi}")
        return v

    return parse


def seconds(lo: float, hi: float, *, above: bool = False) -> Parse:
    """A duration in seconds within [lo, hi] (or (lo, hi] with above=True)."""

    def parse(raw: object) -> float:
        try:
            v = float(_scalar_text(raw))
        except ValueError:
            raise ValueError("not a number of seconds") from None
        if not math.isfinite(v) or v < lo or (above and v == lo) or v > hi:
            low = f"> {lo:g}" if above else f">= {lo:g}"
            raise ValueError(f"must be {low} and <= {hi:g} seconds")
        return v

    return parse


def number(lo: float, hi: float) -> Parse:
    """A finite number within [lo, hi] (a rate, for instance)."""

    def parse(raw: object) -> float:
        try:
            v = float(_scalar_text(raw))
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(v) or v < lo:
            raise ValueError(f"must be >= {lo:g}")
        if v > hi:
            raise ValueError(f"must be <= {hi:g}")
        return v

    return parse


def whole_seconds(lo: int, hi: int) -> Parse:
    check = integer(lo, hi)

    def parse(raw: object) -> int:
        try:
            return int(check(raw))
        except ValueError as exc:
            raise ValueError(f"{exc} (whole seconds)") from None

    return parse


def file_mode(raw: object) -> int:
    """Octal text ('0660', '660') or, from TOML, an integer (write it as 0o660)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        v = raw
    else:
        try:
            v = int(_scalar_text(raw).strip().removeprefix("0o"), 8)
        except ValueError:
            raise ValueError("not an octal mode such as 0660") from None
    if not 0 <= v <= 0o777:
        raise ValueError("must be within 0000..0777")
    return v


def host_port(*, allow_zero: bool, allow_off: bool) -> Parse:
    """HOST:PORT, [V6]:PORT or :PORT (all addresses); '' or 'off' when allowed."""

    def parse(raw: object) -> str:
        v = text(raw)
        if allow_off and v in ("", "off"):
            return v
        host, sep, port_text = v.rpartition(":")
        if not sep:
            raise ValueError("expected HOST:PORT")
        if not port_text.isdigit():
            raise ValueError(f"port {port_text!r} is not a number")
        port, lo = int(port_text), 0 if allow_zero else 1
        if not lo <= port <= 65535:
            raise ValueError(f"port {port} outside {lo}..65535")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError("unclosed [ in an IPv6 address")
            _ip(host[1:-1], 6)
        elif ":" in host:
            raise ValueError("write an IPv6 address in brackets, [::1]:PORT")
        elif host and not _is_ipv4(host):
            _hostname(host)
        return v

    return parse


def _ip(host: str, version: int) -> None:
    try:
        if ipaddress.ip_address(host).version != version:
            raise ValueError
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv{version} address") from None


def _is_ipv4(host: str) -> bool:
    if all(p.isdigit() for p in host.split(".")):
        _ip(host, 4)  # 999.1.1.1 is a malformed address, not a name
        return True
    return False


def _hostname(host: str) -> None:
    labels = host.rstrip(".").split(".")
    ok = len(host) <= 253 and all(
        0 < len(lab) <= 63
        and lab[0] != "-"
        and lab[-1] != "-"
        and all(c.isalnum() or c == "-" for c in lab)
        for lab in labels
    )
    if not ok:
        raise ValueError(f"{host!r} is not a host name or address")


def ranges(raw: object) -> tuple[tuple[int, int], ...]:
    """ "1-63,4096" (or, from TOML, ["1-63", 4096]) -> ((1, 63), (4096, 4096))."""
    items = raw if isinstance(raw, list) else _scalar_text(raw).split(",")
    out: list[tuple[int, int]] = []
    for item in items:
        part = _scalar_text(item).strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo, 0), int(hi or lo, 0)
        except ValueError:
            raise ValueError(f"{part!r} is not N or N-M") from None
        if a < 0 or a > b:
            raise ValueError(f"range {part}: need 0 <= min <= max")
        out.append((a, b))
    return tuple(out)


def show_ranges(v: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in v)


def groups(raw: object) -> tuple[str, ...]:
    """ "5,7" (or [5, 7]) -> ("5", "7"): IOMMU group numbers as /dev/vfio names them."""
    items = raw if isinstance(raw, list) else _scalar_text(raw).split(",")
    out = tuple(s for s in (_scalar_text(g).strip() for g in items) if s)
    for g in out:
        if not g.isdigit():
            raise ValueError(f"IOMMU group {g!r} is not a number")
    return out


def unix_group(raw: object) -> str:
    """A group name known to this host, or a numeric gid (a container may have no name)."""
    v = text(raw)
    if v and not v.isdigit():
        try:
            grp.getgrnam(v)
        except KeyError:
            raise ValueError(f"no group named {v!r} on this host (or give a numeric gid)") from None
    return v


def _octal(v: int) -> str:
    return f"0{v:o}"


def _comma(v: tuple[str, ...]) -> str:
    return ",".join(v)


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
        0o660, file_mode, "permissions of the socket file", unit="octal", show=_octal
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
        "cap on the grace a session may ask for",
        unit="seconds, 0..2592000",
    )
    restart_grace: int = setting(
        10,
        whole_seconds(0, 30 * 86_400),
        "after a restart, how long clients may resume their sets before they are reclaimed "
        "(a broker crash is not a client's exit)",
        unit="seconds, 0..2592000",
    )
    drain_seconds: float = setting(
        5.0,
        seconds(0, 3600),
        "on SIGTERM, how long in-flight calls may finish",
        unit="seconds, 0..3600",
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
        show=_comma,
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
    health_address: str = setting(
        "off",
        host_port(allow_zero=True, allow_off=True),
        "also serve grpc.health.v1 alone on TCP HOST:PORT, for probes that cannot reach a "
        "Unix socket (Kubernetes grpc probes); nothing else is served there; 'off' disables",
        unit="port 0..65535",
        metavar="HOST:PORT|off",
    )

    max_sessions_per_identity: int = setting(
        Limits.max_sessions_per_identity,
        integer(0, 1 << 31),
        "live sessions (attached or in their grace) one identity may hold; each holds a set, "
        "a pidfd and a connection; 0 = no limit",
        unit="limit, docs/limits.md",
    )
    session_opens_per_second: float = setting(
        Limits.session_opens_per_second,
        number(0, 1e9),
        "session opens (new or resumed) per second one identity may make (a token bucket); 0 "
        "= no limit",
        unit="limit, docs/limits.md",
    )
    session_open_burst: int = setting(
        Limits.session_open_burst,
        integer(0, 1 << 31),
        "opens one identity may make at once before --session-opens-per-second applies",
        unit="limit, docs/limits.md",
    )
    max_inflight_per_stream: int = setting(
        Limits.max_inflight_per_stream,
        integer(0, 1 << 31),
        "requests read from one Session stream and not yet answered; beyond it the broker "
        "stops reading that stream (back-pressure); 0 = no limit",
        unit="limit, docs/limits.md",
    )
    max_client_name_bytes: int = setting(
        Limits.max_client_name_bytes,
        integer(0, 1 << 31),
        "longest OpenSession.client, in UTF-8 bytes (longer: INVALID_ARGUMENT)",
        unit="limit, docs/limits.md",
    )
    max_watchers: int = setting(
        Limits.max_watchers,
        integer(0, 1 << 31),
        "Watch streams open at once, in all; 0 = no limit",
        unit="limit, docs/limits.md",
    )
    max_watchers_per_identity: int = setting(
        Limits.max_watchers_per_identity,
        integer(0, 1 << 31),
        "Watch streams one identity may have open; 0 = no limit",
        unit="limit, docs/limits.md",
    )
    max_pasids_per_request: int = setting(
        Limits.max_pasids_per_request,
        integer(0, 1 << 31),
        "most PASIDs one Alloc may ask for: bounds the work one request makes the broker do "
        "while others wait; 0 = no limit",
        unit="limit, docs/limits.md",
    )
    watch_buffer: int = setting(
        Limits.watch_buffer,
        integer(0, 1 << 31),
        "committed events kept in memory for live watchers; a watcher further behind is cut "
        "off with RESOURCE_EXHAUSTED naming the revision to Watch again from",
        unit="limit, docs/limits.md",
    )
    max_request_bytes: int = setting(
        Limits.max_request_bytes,
        integer(0, 1 << 31),
        "largest request message accepted (bytes); larger: RESOURCE_EXHAUSTED from gRPC",
        unit="limit, docs/limits.md",
    )

    @property
    def limits(self) -> Limits:
        """What one client may make the broker hold (broker/service/limits.py)."""
        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits)})

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


@dataclass(frozen=True)
class Option:
    """One setting as the outside world spells it, derived from a Config field."""

    name: str  # the Config field, also the file key
    parse: Parse
    help: str
    unit: str
    metavar: str | None
    show: Callable[[Any], str] | None
    default: Any
    alias: str = ""
    kind: str = "value"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def envs(self) -> tuple[str, ...]:
        """Its variable, then its old name's."""
        return (self.env, *((ENV_PREFIX + self.alias.upper(),) if self.alias else ()))


OPTIONS: tuple[Option, ...] = tuple(
    Option(
        f.name,
        f.metadata["parse"],
        f.metadata["help"],
        f.metadata["unit"],
        f.metadata["metavar"],
        f.metadata["show"],
        f.default,
        f.metadata["alias"],
        f.metadata["kind"],
    )
    for f in fields(Config)
)
BY_NAME = {o.name: o for o in OPTIONS}
ALIASES = {o.alias: o.name for o in OPTIONS if o.alias}


@dataclass(frozen=True)
class Loaded:
    """The effective settings and where each came from ('flag', 'env NAME', 'file PATH',
    'default')."""

    config: Config
    sources: Mapping[str, str]
    config_file: str
    print_config: str = ""  # '', 'text' or 'json'

    def describe(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for o in OPTIONS:
            v = getattr(self.config, o.name)
            shown: Any = o.show(v) if o.show else v
            out[o.name] = {"value": shown, "source": self.sources[o.name]}
        return out

    def render(self, fmt: str) -> str:
        rows = self.describe()
        if fmt == "json":
            return json.dumps({"config_file": self.config_file or None, "settings": rows})
        width = max(len(n) for n in rows)
        vwidth = max(len(str(r["value"])) for r in rows.values())
        head = f"# config file: {self.config_file or '(none)'}; precedence flag > env > file"
        lines = [head] + [
            f"{n:<{width}}  {r['value']!s:<{vwidth}}  {r['source']}" for n, r in rows.items()
        ]
        return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the nearest flag, exit 2."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            known = [s for a in self._actions for s in a.option_strings]
            for u in unknown:
                near = difflib.get_close_matches(u.split("=")[0], known, n=1)
                if near:
                    message += f" (did you mean {near[0]}?)"
                    break
        raise ConfigError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pasid-broker",
        allow_abbrev=False,
        description=(
            "Arbitrate this host's system-wide PCIe PASID namespace over gRPC. Each client "
            "session owns one ioasid_set; PASIDs it did not free are freed when the session "
            "ends (set-destroy-on-exit). Every allocation is durable in SQLite before it is "
            "acknowledged. Every setting is a flag, a PASID_BROKER_* environment variable "
            "(shown in brackets) and a key of the --config TOML file; precedence: flag > "
            "environment > file > default. Subcommands: 'pasid-broker backup DEST' (online "
            "copy of the database), 'pasid-broker restore SOURCE' (while stopped), "
            "'pasid-broker health' (exit 0 when SERVING)."
        ),
        epilog="Exit status: 0 after a clean stop, 2 if it cannot start (one line on stderr).",
    )
    p.add_argument("--version", action="version", version=f"pasid-broker {__version__}")
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML file of settings (keys as below, e.g. quota_per_set = 100) [{CONFIG_ENV}]",
    )
    p.add_argument(
        "--print-config",
        nargs="?",
        const="text",
        choices=("text", "json"),
        help="print the effective settings and where each came from, then exit",
    )
    for o in OPTIONS:
        shown = (o.show or str)(o.default) if o.default not in ("", ()) else "''"
        unit = f"; {o.unit}" if o.unit else ""
        flags = [o.flag] + (["--" + o.alias.replace("_", "-")] if o.alias else [])
        helptext = f"{o.help} (default {shown}{unit}) [{', '.join(o.envs)}]".replace("%", "%%")
        if o.kind == "switch":
            p.add_argument(
                *flags, dest=o.name, action="store_const", const=True, default=None, help=helptext
            )
        else:
            p.add_argument(
                *flags,
                dest=o.name,
                metavar=o.metavar or o.name.upper(),
                default=None,
                action="append" if o.kind == "repeat" else "store",
                help=helptext,
            )
    return p


def _nearest(name: str, known: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean {near[0]}?)" if near else ""


def _check_env(env: Mapping[str, str]) -> None:
    known = [e for o in OPTIONS for e in o.envs] + [CONFIG_ENV, *FOREIGN_ENV]
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            raise ConfigError(f"unknown environment variable {name}{_nearest(name, known)}")


def read_file(file: str) -> dict[str, object]:
    """The TOML file's settings by field name; unknown keys are refused."""
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file}: not TOML: {exc}") from None
    out: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in BY_NAME:
            raise ConfigError(
                f"config file {file}: unknown key {key!r}{_nearest(name, list(BY_NAME))}"
            )
        out[name] = value
    return out


def load_full(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Loaded:
    """Read flags, environment and file; check every value. Raises ConfigError."""
    env = os.environ if env is None else env
    # Flags first: --help and --version must work whatever the environment holds.
    ns = build_parser().parse_args(argv)
    _check_env(env)
    config_file = ns.config or env.get(CONFIG_ENV, "")
    from_file = read_file(config_file) if config_file else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for o in OPTIONS:
        flag_value = getattr(ns, o.name)
        named = [e for e in o.envs if e in env]
        if flag_value is not None:
            raw, where, label = flag_value, "flag", f"{o.flag} {flag_value!r}"
        elif named:
            raw, where = env[named[0]], f"env {named[0]}"
            label = f"{named[0]}={env[named[0]]!r}"
            if o.kind == "repeat":
                raw = [line for line in str(raw).splitlines() if line.strip()]
        elif o.name in from_file:
            raw, where = from_file[o.name], f"file {config_file}"
            label = f"{o.name} = {from_file[o.name]!r} in {config_file}"
        else:
            values[o.name], sources[o.name] = o.default, "default"
            continue
        try:
            values[o.name] = o.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        sources[o.name] = where
    cfg = Config(**values)
    for derived, given, what in (
        (cfg.admin_socket_path, cfg.admin_socket, "admin socket"),
        (cfg.peer_socket_path, cfg.peer_socket, "peer socket"),
    ):
        if derived and given != derived:  # the default beside --socket
            try:
                socket_path(derived)
            except ValueError as exc:
                raise ConfigError(f"{what} {derived} (beside --socket): {exc}") from None
    return Loaded(cfg, sources, config_file, ns.print_config or "")


def load(argv: Sequence[str] | None = None) -> Config:
    return load_full(argv).config


def refuse(message: str) -> NoReturn:
    """The one line a refusal to start prints, and exit 2."""
    print(f"pasid-broker: cannot start: {message}", file=sys.stderr)
    raise SystemExit(2)
