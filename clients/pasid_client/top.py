"""`pasidctl top`: a live view of one broker from GetInfo and List(all), no Prometheus needed.

Rates come from the difference between two refreshes, set by set: PASIDs a set gained
count as allocated, PASIDs it lost (or a set that vanished) as released. An alloc and a
free of the same set within one refresh cancel out, so these are net rates, a lower bound
on the traffic; the broker's metrics (pasid_broker_pasids_*_total) count every one.

Started (`--once` too) while the broker is not there yet, starting or recovering, it
waits for it, and lives through its restart, within --reconnect-deadline (60 s; 0: ask
once), saying so on stderr; a socket that refuses this user fails at once.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from pasid_client.errors import PasidClientError
from pasid_client.reconnect import when_ready
from pasid_client.sync import Client
from pasid_client.types import Info, SetView

CLEAR = "\x1b[H\x1b[2J"


@dataclass(frozen=True)
class Sample:
    """One refresh: the broker's summary and every set's count, at monotonic time `t`."""

    t: float
    info: Info
    sets: tuple[SetView, ...]


def sample(client: Client, clock: Callable[[], float] = time.monotonic) -> Sample:
    """Ask the broker now, through its admin socket (every set is an admin listing).
    Raises PasidClientError subclasses (Unavailable, PermissionDenied, ...)."""
    info = client.info()
    sets = tuple(client.list_sets(with_ranges=False))  # counts only: cheap at 1 M held
    return Sample(clock(), info, sets)


def frame(prev: Sample | None, cur: Sample, top: int = 10) -> dict[str, Any]:
    """What one screen shows, as plain data (the --json output)."""
    i = cur.info
    holders: dict[str, dict[str, int]] = {}
    for s in cur.sets:
        h = holders.setdefault(s.client, {"pasids": 0, "sets": 0, "detached": 0})
        h["pasids"] += s.count
        h["sets"] += 1
        h["detached"] += s.state != "attached"
    ranked = sorted(holders.items(), key=lambda kv: (-kv[1]["pasids"], kv[0]))
    out: dict[str, Any] = {
        "backend": i.backend,
        "version": i.version,
        "pasid_bits": i.pasid_bits,
        "capacity": i.capacity,
        "in_use": i.in_use,
        "utilisation": i.in_use / i.capacity if i.capacity else 0.0,
        "sessions": i.sessions,
        "sets": i.sets,
        "detached_sets": sum(1 for s in cur.sets if s.state != "attached"),
        "clients": len(holders),
        "top": [{"client": c, **h} for c, h in ranked[:top]],
        "interval_seconds": None,
        "allocated_per_second": None,
        "released_per_second": None,
    }
    if prev is not None and cur.t > prev.t:
        dt = cur.t - prev.t
        before = {s.set_id: s.count for s in prev.sets}
        gained = lost = 0
        for s in cur.sets:
            d = s.count - before.pop(s.set_id, 0)
            gained += max(d, 0)
            lost += max(-d, 0)
        lost += sum(before.values())  # sets that are gone
        out["interval_seconds"] = round(dt, 3)
        out["allocated_per_second"] = gained / dt
        out["released_per_second"] = lost / dt
    return out


def render(f: dict[str, Any]) -> str:
    """The text screen for one frame."""
    pct = 100.0 * f["utilisation"]
    bar_width = 40
    filled = min(bar_width, round(f["utilisation"] * bar_width))
    if f["allocated_per_second"] is None:
        rates = "rates       (after the next refresh)"
    else:
        rates = (
            f"rates       +{f['allocated_per_second']:.1f}/s allocated,"
            f" -{f['released_per_second']:.1f}/s released"
            f"  (net, over {f['interval_seconds']:.1f} s)"
        )
    lines = [
        f"pasid-broker {f['version']}  backend {f['backend']}  pasid_bits {f['pasid_bits']}",
        f"utilisation [{'#' * filled}{'.' * (bar_width - filled)}] {pct:.3f} %"
        f"  ({f['in_use']} of {f['capacity']})",
        f"sessions    {f['sessions']} attached, {f['sets']} sets"
        f" ({f['detached_sets']} awaiting resume), {f['clients']} clients",
        rates,
        "",
        f"{'CLIENT':24} {'PASIDS':>9} {'SHARE':>7} {'SETS':>5} {'DETACHED':>8}",
    ]
    for h in f["top"]:
        share = 100.0 * h["pasids"] / f["in_use"] if f["in_use"] else 0.0
        lines.append(
            f"{h['client'][:24]:24} {h['pasids']:>9} {share:>6.1f}% {h['sets']:>5}"
            f" {h['detached']:>8}"
        )
    if not f["top"]:
        lines.append("(no sets)")
    return "\n".join(lines)


def run(
    client: Client,
    *,
    interval: float = 1.0,
    count: int = 0,
    once: bool = False,
    as_json: bool = False,
    top: int = 10,
    out: TextIO = sys.stdout,
    reconnect_deadline: float = 0.0,
    say: Callable[[str], None] | None = None,
) -> int:
    """Refresh every `interval` seconds, `count` frames (0: until interrupted). `once`:
    one frame from two samples `interval` apart, so that it has rates. A broker that is
    not there yet, starting or recovering is waited for up to `reconnect_deadline` seconds
    before the first sample, as a session's open waits; one that goes away later (its
    restart) as long again. Each wait is said once each way through `say`; rates then
    span the gap. Raises PasidClientError subclasses when the broker cannot be asked
    (at once for a refusal such as SOCKET_ACCESS)."""
    clear = not as_json and not once and out.isatty()
    try:
        prev = _sample_when_ready(
            client,
            reconnect_deadline,
            say,
            lambda e: f"waiting for the broker ({e.message}), up to {reconnect_deadline:g} s",
            "the broker answers",
        )
        if once:
            time.sleep(interval)
            count = 1
        shown = 0
        while True:
            if not once and shown == 0:
                cur = prev  # the first screen at once, without rates
                prev_for_frame = None
            else:
                cur = _sample_when_ready(
                    client,
                    reconnect_deadline,
                    say,
                    lambda e: f"broker went away ({e.message}); reconnecting",
                    "reconnected",
                )
                prev_for_frame = prev
            f = frame(prev_for_frame, cur, top)
            if as_json:
                out.write(json.dumps(f, sort_keys=True) + "\n")
            else:
                out.write((CLEAR if clear else ("\n" if shown else "")) + render(f) + "\n")
            out.flush()
            shown += 1
            prev = cur
            if count and shown >= count:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _sample_when_ready(
    client: Client,
    deadline_seconds: float,
    say: Callable[[str], None] | None,
    why: Callable[[PasidClientError], str],
    back: str,
) -> Sample:
    """A sample, waiting out a broker that is not there yet or restarting (when_ready:
    backoff, within the deadline), said once as the wait starts (`why` the first error)
    and once as it ends (`back`)."""
    waited: list[PasidClientError] = []

    def waiting(exc: PasidClientError) -> None:
        waited.append(exc)
        if say is not None:
            say(f"top: {why(exc)}")

    cur = when_ready(lambda: sample(client), deadline_seconds, waiting=waiting)
    if waited and say is not None:
        say(f"top: {back}")
    return cur
