"""One setting's value: a raw value (text from a flag or variable, a TOML value from the
file) -> the checked value, or ValueError saying what is wrong in words an operator acts on.
Also how a value is shown back (--help's defaults, --print-config)."""

from __future__ import annotations

import difflib
import grp
import ipaddress
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

Parse = Callable[[object], Any]

# sun_path is 108 bytes with its NUL: a longer path cannot be bound (unix(7)).
MAX_SOCKET_PATH = 107


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


def socket_file_mode(raw: object) -> int:
    """A socket's file mode: connecting needs write permission (unix(7)), so a mode that
    gives it to no one makes a socket only root could use."""
    v = file_mode(raw)
    if not v & 0o222:
        raise ValueError(
            f"{v:04o} lets no one connect (connecting to a Unix socket needs write "
            "permission); e.g. 0660 for the owner and --socket-group"
        )
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


def show_octal(v: int) -> str:
    return f"0{v:o}"


def show_comma(v: tuple[str, ...]) -> str:
    return ",".join(v)
