"""`pasidctl`: the operator's view of a pasid-broker. Every command takes --json.

Exit status: 0 ok, 1 the broker refused or could not be reached, 2 usage (a bad option, a
missing session, an unreadable --token-file). With --json every outcome is one JSON
document on stdout, errors as {"error": {"code", "message", "reason"}} (code USAGE for 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, fields
from typing import Any, NoReturn

import grpc

from pasid_client import address, bench, top
from pasid_client.errors import FailedPrecondition, PasidClientError, Unavailable
from pasid_client.reconnect import SessionState, StateChange, when_ready
from pasid_client.sync import Client, Session
from pasid_client.types import ALL, Event, Info, SetView, WithheldView

EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command line that cannot run (exit 2), from argparse or from a command; `usage`
    is the parser's usage line, shown in text mode as argparse would."""

    def __init__(self, message: str, usage: str = "") -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised, so that main() can honour --json for them too
    (argparse itself prints text and exits)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}", self.format_usage())


def _fmt_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges) or "-"


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=True), flush=True)
    else:
        print(text(), flush=True)


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise UsageError(f"pasidctl: cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise UsageError(f"pasidctl: the token file {path} is empty")
    return token


def session_token(args: argparse.Namespace) -> str | None:
    """The session's token, first found of: --token, --token-file, $PASID_SESSION_TOKEN,
    $PASID_SESSION_TOKEN_FILE. The last three keep it out of the command line, which every
    user of the host can read in /proc."""
    if args.token:
        return str(args.token)
    if args.token_file:
        return _read_token_file(args.token_file)
    if os.environ.get("PASID_SESSION_TOKEN"):
        return os.environ["PASID_SESSION_TOKEN"]
    if os.environ.get("PASID_SESSION_TOKEN_FILE"):
        return _read_token_file(os.environ["PASID_SESSION_TOKEN_FILE"])
    return None


def _session_ref(args: argparse.Namespace) -> tuple[int, str]:
    sid = args.session or os.environ.get("PASID_SESSION_ID")
    token = session_token(args)
    if not sid or not token:
        raise UsageError(
            "pasidctl: this command acts on a session held elsewhere (e.g. by 'pasidctl hold'):"
            " give --session (or PASID_SESSION_ID) and the token through PASID_SESSION_TOKEN,"
            " --token-file (or PASID_SESSION_TOKEN_FILE), or --token"
        )
    try:
        return int(sid), token
    except ValueError:
        raise UsageError(f"pasidctl: the session id must be an integer, not {sid!r}") from None


def _set_dict(v: SetView, now: float | None = None) -> dict[str, Any]:
    # Not asdict(): it deep-copies every range tuple, seconds for a million of them.
    d = {f.name: getattr(v, f.name) for f in fields(v)}
    d["ranges"] = [list(r) for r in v.ranges]
    # How long it has been detached, as the DETACHED column says it (0 while attached):
    # a script should not have to subtract detached_unix from its own clock.
    d["detached_seconds"] = _detached_seconds(v, now)
    return d


def _detached_seconds(s: SetView, now: float | None = None) -> float:
    """Seconds since the set was detached (stored by the broker, so a restart does not
    reset it); 0.0 while a stream holds it."""
    if s.state != "detached" or not s.detached_unix:
        return 0.0
    return round(max((time.time() if now is None else now) - s.detached_unix, 0.0), 3)


def cmd_info(c: Client, args: argparse.Namespace) -> int:
    i = _when_ready(c, args, "info")
    d = asdict(i)
    d["quotas"] = {
        "per_set": i.quotas.per_set,
        "per_client": i.quotas.per_client,
        "global": i.quotas.global_,
    }
    d["widths"] = [{"kind": k, "name": n, "pasid_bits": b, "set_id": s} for k, n, b, s in i.widths]
    pct = 100.0 * i.in_use / i.capacity if i.capacity else 0.0

    def text() -> str:
        q = i.quotas
        return "\n".join(
            [
                f"backend     {i.backend} (pasid-broker {i.version})",
                f"pasid_bits  {i.pasid_bits}",
                f"capacity    {i.capacity} ({i.reserved} reserved)",
                f"in use      {i.in_use} ({pct:.2f} %), {i.quarantined} quarantined",
                f"sessions    {i.sessions} attached, {i.sets} sets",
                f"quotas      per set {q.per_set or 'none'}, per client {q.per_client or 'none'},"
                f" global {q.global_ or 'none'}",
                *(
                    f"width       {kind} {name}: {bits} bits"
                    + (f" (set {set_id})" if kind == "device" else "")
                    for kind, name, bits, set_id in i.widths
                ),
            ]
        )

    _emit(args, d, text)
    return 0


def cmd_alloc(c: Client, args: argparse.Namespace) -> int:
    sid, token = _session_ref(args)
    info = _when_ready(c, args, "alloc")  # then the alloc goes once: it is no read
    hi = args.max if args.max is not None else (1 << info.pasid_bits) - 1
    got = c.alloc(sid, token, args.min, hi, args.count)
    _emit(args, {"session_id": sid, "pasids": got}, lambda: " ".join(map(str, got)))
    return 0


def cmd_free(c: Client, args: argparse.Namespace) -> int:
    sid, token = _session_ref(args)
    _when_ready(c, args, "free")
    n = c.free(sid, token, args.min, args.max)
    _emit(args, {"session_id": sid, "freed": n}, lambda: f"freed {n}")
    return 0


def _admin(args: argparse.Namespace) -> Client:
    return Client(
        address.resolve_admin(args.admin_socket, args.socket),
        timeout=args.timeout,
        reconnect_deadline_seconds=args.reconnect_deadline,
    )


@contextlib.contextmanager
def _admin_ready(args: argparse.Namespace, command: str) -> Iterator[Client]:
    """The admin socket's client, once the broker answers there (_when_ready: a broker
    not there yet, starting or recovering, is waited for within --reconnect-deadline)."""
    with _admin(args) as a:
        _when_ready(a, args, command)
        yield a


def _say(message: str) -> None:
    """One line on stderr: what the command lives through (stdout stays its output)."""
    print(f"pasidctl: {message}", file=sys.stderr, flush=True)


def cmd_list(c: Client, args: argparse.Namespace) -> int:
    if args.all or not (args.session or os.environ.get("PASID_SESSION_ID")):
        with _admin_ready(args, "list") as a:
            sets = a.list_sets()
    else:
        sid, token = _session_ref(args)
        _when_ready(c, args, "list")
        sets = [c.list_session(sid, token)]

    def text() -> str:
        lines = [
            f"{'SET':>6} {'STATE':9} {'CLIENT':20} {'PID':>7} {'UID':>6} {'NS_PID':>7}"
            f" {'COUNT':>7} {'DETACHED':>8}  PASIDS"
        ]
        for s in sets:
            lines.append(
                f"{s.set_id:>6} {s.state:9} {s.client[:20]:20} {_holder(s)}"
                f" {s.count:>7} {_detached_for(s):>8}  {_fmt_ranges(s.ranges)}"
            )
        return "\n".join(lines)

    _emit(args, {"sets": [_set_dict(s) for s in sets]}, text)
    return 0


def _holder(s: SetView) -> str:
    """PID UID NS_PID of the kernel-verified holder; '-' for an anonymous or TCP one."""
    if not s.verified:
        return f"{'-':>7} {'-':>6} {'-':>7}"
    return f"{s.pid:>7} {s.uid:>6} {s.ns_pid:>7}"


def _detached_for(s: SetView, now: float | None = None) -> str:
    """How long the set has been detached ("-" while attached), e.g. "3m07s"."""
    if s.state != "detached" or not s.detached_unix:
        return "-"
    secs = int(_detached_seconds(s, now))
    h, rest = divmod(secs, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _sets_table(sets: Sequence[SetView]) -> str:
    lines = [
        f"{'SET':>6} {'STATE':9} {'CLIENT':20} {'PID':>7} {'UID':>6} {'NS_PID':>7}"
        f" {'PEER':14} {'COUNT':>7} {'QUOTA':>6} {'DETACHED':>8}  PASIDS"
    ]
    for s in sets:
        lines.append(
            f"{s.set_id:>6} {s.state:9} {s.client[:20]:20} {_holder(s)} {s.peer[:14]:14}"
            f" {s.count:>7} {s.quota:>6} {_detached_for(s):>8}  {_fmt_ranges(s.ranges)}"
        )
    return "\n".join(lines)


def cmd_sets(c: Client, args: argparse.Namespace) -> int:
    with _admin_ready(args, "sets") as a:
        sets = sorted(a.list_sets(), key=lambda v: -v.count)
    _emit(args, {"sets": [_set_dict(s) for s in sets]}, lambda: _sets_table(sets))
    return 0


def _withheld_line(w: WithheldView) -> str:
    why = {
        "detach": f"DETACH failed at set {w.set_id}'s end; holder pid {w.holder_pid or '-'},"
        f" devices {','.join(w.devices) or 'not recorded'}",
        "free": f"the backend's free failed (set {w.set_id})",
        "contested": "claimed by a witness",
    }.get(w.kind, w.kind)
    claim = f"; claimed by set {w.claimant}" if w.claimant else ""
    return f"{w.pasid:>8} {w.kind:<9} {why}{claim}"


def cmd_withheld(c: Client, args: argparse.Namespace) -> int:
    with _admin_ready(args, "withheld") as a:
        rows = a.list_withheld()
    _emit(
        args,
        {"withheld": [dataclasses.asdict(w) for w in rows]},
        lambda: "\n".join([f"{len(rows)} withheld", *map(_withheld_line, rows)]),
    )
    return 0


def cmd_revoke(c: Client, args: argparse.Namespace) -> int:
    with _admin_ready(args, "revoke") as a:
        n = a.revoke(args.set_id, args.reason)
    _emit(
        args,
        {"set_id": args.set_id, "freed": n},
        lambda: f"revoked set {args.set_id}: {n} PASIDs freed",
    )
    return 0


def cmd_quota(c: Client, args: argparse.Namespace) -> int:
    with _admin_ready(args, "quota") as a:
        cur = a.info().quotas if args.set_id == 0 else None
        per_client = (
            args.per_client if args.per_client is not None else (cur.per_client if cur else 0)
        )
        global_ = args.global_ if args.global_ is not None else (cur.global_ if cur else 0)
        per_set = args.per_set if args.per_set is not None else (cur.per_set if cur else 0)
        info = a.set_quotas(per_set, per_client, global_, args.set_id)
    q = info.quotas
    data = {
        "set_id": args.set_id,
        "quotas": {"per_set": q.per_set, "per_client": q.per_client, "global": q.global_},
    }
    _emit(
        args,
        data,
        lambda: (
            f"quotas: per set {q.per_set}, per client {q.per_client},"
            f" global {q.global_}" + (f" (set {args.set_id}: {per_set})" if args.set_id else "")
        ),
    )
    return 0


def cmd_request(c: Client, args: argparse.Namespace) -> int:
    sid, token = _session_ref(args)
    _when_ready(c, args, "request")
    ret = c.pasid_request(sid, token, args.argsz, args.flags, args.min, args.max)
    _emit(args, {"ret": ret}, lambda: str(ret))
    return 0


def cmd_watch(c: Client, args: argparse.Namespace) -> int:
    # With a session: its own set's events, on the clients' socket; without: every set's,
    # on the admin socket (the clients' socket shows a caller only its own set).
    if args.session or os.environ.get("PASID_SESSION_ID"):
        sid, token = _session_ref(args)
        return _watch(c, args, sid, token)
    with _admin(args) as a:
        return _watch(a, args, 0, "")


def _watch(c: Client, args: argparse.Namespace, sid: int, token: str) -> int:
    """Print events. First wait (within --reconnect-deadline) for a broker that is not
    there yet, starting or recovering, as hold's open does; when the broker goes away,
    Watch again from the revision after the last one printed (no gap, no duplicate),
    within the same bound."""
    n = 0
    try:
        now = _when_ready(c, args, "watch")
        after = args.from_revision - 1 if args.from_revision else now.revision
        while True:
            try:
                for ev in c.watch(after + 1, session_id=sid, token=token):
                    _print_event(args, ev)
                    after = ev.revision
                    n += 1
                    if args.count and n >= args.count:
                        return 0
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, "watch ended")
            except Unavailable as exc:
                _say(f"watch: broker went away ({exc.message}); reconnecting")
                when_ready(c.info, args.reconnect_deadline)
                _say(f"watch: reconnected; following from revision {after + 1}")
    except KeyboardInterrupt:
        pass
    return 0


def _when_ready(c: Client, args: argparse.Namespace, command: str) -> Info:
    """The broker's GetInfo, waiting (when_ready, within --reconnect-deadline) for a
    broker that is not there yet, starting or recovering: one line on stderr as the wait
    starts, one as it ends. A refusal (SOCKET_ACCESS) fails at once."""
    waited: list[PasidClientError] = []

    def waiting(exc: PasidClientError) -> None:
        waited.append(exc)
        _say(
            f"{command}: waiting for the broker ({exc.message}),"
            f" up to {args.reconnect_deadline:g} s"
        )

    info = when_ready(c.info, args.reconnect_deadline, waiting=waiting)
    if waited:
        _say(f"{command}: the broker answers")
    return info


def _print_event(args: argparse.Namespace, ev: Event) -> None:
    if args.json:
        print(
            json.dumps(
                {
                    "revision": ev.revision,
                    "ts": ev.ts_unix,
                    "kind": ev.kind,
                    "set_id": ev.set_id,
                    "ranges": [list(r) for r in ev.ranges],
                    "reason": ev.reason,
                    **({"pid": ev.pid, "uid": ev.uid, "ns_pid": ev.ns_pid} if ev.verified else {}),
                }
            ),
            flush=True,
        )
    else:
        when = time.strftime("%H:%M:%S", time.localtime(ev.ts_unix))
        extra = f"  ({ev.reason})" if ev.reason else ""
        if ev.verified:
            extra += f"  pid {ev.pid} uid {ev.uid} ns_pid {ev.ns_pid}"
        print(
            f"{ev.revision:>8} {when} {ev.kind:14} set {ev.set_id:<6}"
            f" {_fmt_ranges(ev.ranges)}{extra}",
            flush=True,
        )


def _write_token(path: str, token: str) -> None:
    """A new file only its owner can read: never over an existing one, which might be
    another holder's."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"pasidctl: cannot create the token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def cmd_hold(c: Client, args: argparse.Namespace) -> int:
    stop = threading.Event()
    signalled: list[int] = []

    held: list[Session] = []  # the open session, once there is one

    def on_signal(signum: int, _frame: object) -> None:
        if signalled and signum == signal.SIGINT and held:
            # A second Ctrl-C: the user will not wait for the release (it may wait up to
            # --reconnect-deadline for a broker that is away). Said plainly, since the
            # set then stays: until its holder exits (this process, unless it delegates).
            s = held[0]
            _say(
                f"second Ctrl-C: not waiting for the release; set {s.set_id} stays until"
                " its holder exits" + ("" if s.verified else " or its grace ends")
            )
            os._exit(130)
        signalled.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if args.token_out and os.path.lexists(args.token_out):
        raise UsageError(f"pasidctl: the token file {args.token_out} exists already")
    # A broker not there yet, starting or recovering is waited for (said on stderr), before
    # looking for a detached set to take back: asked too early, that look found no peer
    # socket, or NOT_READY, and a restarted sidecar opened a second set or exited 1.
    _when_ready(c, args, "hold")
    reattach = _detached_set_to_reattach(c, args)
    carried: list[int] = []  # the release waited for the broker's return

    def told(change: StateChange) -> None:
        """One line when the broker goes away, one when the set is back (issue 19), one
        for what the broker tells unprompted (a conflict on the set, issue 22)."""
        if change.notice == "pasid_contested":
            _say(
                f"set {change.other_set_id}'s client claims PASIDs"
                f" {_fmt_ranges(change.contested)} of set {change.set_id} (a conflict):"
                " still held; see the runbook's PasidConflict"
            )
        elif change.notice == "pasid_conflict_resolved":
            _say(
                f"conflict resolved: PASIDs {_fmt_ranges(change.handed_over)} handed"
                + (
                    f" to set {change.set_id} from set {change.other_set_id}"
                    if change.received
                    else f" from set {change.set_id} to set {change.other_set_id}"
                )
            )
        elif change.releasing:  # Ctrl-C'd: the release waits for the broker
            if change.state is SessionState.RECONNECTING:
                _say(f"broker went away ({change.error}) before it took the release")
            elif change.state is SessionState.RESUMED:
                carried.append(change.set_id)
                _say(f"broker is back: releasing set {change.set_id}")
        elif change.state is SessionState.RECONNECTING:
            _say(f"broker went away ({change.error}); reconnecting to resume set {change.set_id}")
        elif change.state is SessionState.RESUMED:
            _say(f"resumed set {change.set_id} after {change.attempts} attempt(s)")
            if change.reclaimed:
                _say(f"the broker had lost PASIDs {_fmt_ranges(change.reclaimed)}: reclaimed")
            if change.conflicts:
                _say(
                    f"PASIDs {_fmt_ranges(change.conflicts)} now belong to another set:"
                    " no longer held"
                )
            if change.refreed:
                _say(
                    f"the broker had lost the frees of PASIDs {_fmt_ranges(change.refreed)}:"
                    " freed again"
                )
            if change.contested:
                _say(
                    f"PASIDs {_fmt_ranges(change.contested)} of this set are claimed by"
                    " another set's client (a conflict): still held"
                )

    with c.session(
        args.client,
        grace_seconds=args.grace,
        delegate_pid=args.delegate_pid,
        reattach_set_id=reattach,
        on_state_change=told,
    ) as s:
        held.append(s)
        hi = args.max if args.max is not None else (1 << s.pasid_bits) - 1
        had = s.list().count if reattach else 0
        need = max(args.count - had, 0)  # re-attached: top up to --count, no more
        got = s.alloc(args.min, hi, need) if need else []
        if reattach:
            got = sorted(s.list().pasids())
            print(
                f"pasidctl: re-attached detached set {reattach} of process"
                f" {args.delegate_pid} ({had} PASIDs)",
                file=sys.stderr,
            )
        if s.contested:  # re-attached to a set with a conflict
            _say(
                f"PASIDs {_fmt_ranges(s.contested)} of set {s.set_id} are claimed by another"
                " set's client (a conflict): still held; see the runbook's PasidConflict"
            )
        if args.token_out and s.token:
            _write_token(args.token_out, s.token)
        elif args.token_out:
            _say(f"re-attached without a token: nothing written to {args.token_out}")
        data = {
            "session_id": s.session_id,
            "token": s.token,
            "verified": s.verified,
            "pasids": got,
            "ranges": [list(r) for r in s.list().ranges],
        }

        def text() -> str:
            how = (
                f"  export PASID_SESSION_ID={s.session_id} PASID_SESSION_TOKEN={s.token}\n"
                if s.token
                # A re-attach carries no token (the broker keeps only its hash): an export
                # with an empty one would only lead to "no token" errors elsewhere.
                else "  (re-attached: no token, so no other command can name this session;"
                " running this command again takes the set back)\n"
            )
            return (
                f"holding {len(got)} PASIDs in session {s.session_id}:"
                f" {_fmt_ranges(s.list().ranges)}\n{how}Ctrl-C releases them."
            )

        _emit(args, data, text)
        ended: list[PasidClientError] = []

        def watch_end() -> None:  # the broker may end the session first (reconnects do not)
            ended.append(s.wait_ended())
            stop.set()

        threading.Thread(target=watch_end, daemon=True).start()
        # Waking each second: a signal the kernel gives one of grpc's threads runs our
        # handler only when the main thread next runs Python, which a bare wait never does.
        while not stop.wait(1.0):
            pass
        if ended:
            print(f"pasidctl: session ended by the broker: {ended[0]}", file=sys.stderr)
            return 1
        if signalled[:1] == [signal.SIGTERM] and args.delegate_pid is not None:
            # A sidecar stopped to be restarted (kubelet): the VMM's set must not go with
            # it. Ctrl-C (SIGINT) is the explicit release (docs/peer-identity.md). (Without
            # --delegate-pid this process is the holder: its set ends with it either way.)
            s.detach()
            print(
                f"pasidctl: detached set {s.session_id} (SIGTERM): it lives on with its"
                " holder; `pasidctl hold` again re-attaches it",
                file=sys.stderr,
            )
            return 0
        if s.state is SessionState.RECONNECTING:
            _say(
                f"releasing set {s.set_id} once the broker is back"
                f" (up to {args.reconnect_deadline:g} s; Ctrl-C again stops waiting)"
            )
    if s.kept:
        _say(
            f"set {s.set_id} not released: no broker took the release within"
            f" {args.reconnect_deadline:g} s; it keeps the set until its holder exits"
            + ("" if s.verified else " (or its grace ends)")
        )
        return 1
    if carried:
        _say(f"released set {s.set_id} after the broker came back")
    if args.token_out and args.grace == 0:
        # The set is gone with the session, and its token with it. (With a grace the
        # token still resumes the set, so the file stays.)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.token_out)
    if not args.json:
        print("released", flush=True)
    return 0


def _detached_set_to_reattach(c: Client, args: argparse.Namespace) -> int:
    """A restarted sidecar runs the same `hold --delegate-pid P` again: the VMM's set,
    detached when the old sidecar died, is taken back instead of a second one opened.
    --reattach ID names it; by default the one detached set of P with this --client name
    (several: refused, naming them). 0: open a new set."""
    if args.reattach is not None:
        return int(args.reattach)
    if args.delegate_pid is None or args.no_reattach:
        return 0
    try:
        mine = [
            v
            for v in c.held_sets(delegate_pid=args.delegate_pid)
            if v.state == "detached" and v.client == args.client
        ]
    except FailedPrecondition:  # no peer socket (an older broker, TCP): nothing to find
        return 0
    if len(mine) > 1:
        ids = ", ".join(str(v.set_id) for v in mine)
        raise UsageError(
            f"pasidctl: process {args.delegate_pid} has {len(mine)} detached sets named"
            f" {args.client!r} ({ids}): pick one with --reattach SET_ID, or --no-reattach"
        )
    return mine[0].set_id if mine else 0


def cmd_top(c: Client, args: argparse.Namespace) -> int:
    with _admin(args) as a:
        return top.run(
            a,
            interval=args.interval,
            count=args.count,
            once=args.once,
            as_json=args.json,
            top=args.top,
            reconnect_deadline=args.reconnect_deadline,
            say=_say,
        )


def cmd_bench(c: Client, args: argparse.Namespace) -> int:
    plan = bench.Plan(
        concurrency=args.concurrency,
        duration=args.duration,
        count=args.count,
        alloc_ratio=args.alloc_ratio,
        batch=args.batch,
        client=args.client,
    )
    result = bench.run(c.target, plan, as_json=args.json, timeout=args.timeout)
    _emit(args, result, lambda: bench.render(result))
    return 0


def _common_options(suppress: bool) -> _Parser:
    """The options every command takes. They may stand before or after the command; the
    subcommands' copies default to SUPPRESS, or their defaults would overwrite a value
    given before the command (`pasidctl --socket X info`)."""
    common = _Parser(add_help=False)

    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    common.add_argument(
        "--json", action="store_true", default=d(False), help="print one JSON document"
    )
    common.add_argument(
        "--socket",
        default=d(None),
        help="broker's Unix socket [PASID_BROKER_SOCKET; default /run/pasid-broker/broker.sock]",
    )
    common.add_argument(
        "--address",
        default=d(None),
        help="gRPC target instead, e.g. unix:/path or host:port [PASID_BROKER_ADDRESS]",
    )
    common.add_argument(
        "--admin-socket",
        default=d(None),
        help="the broker's admin socket, for sets, revoke, quota, top and list --all "
        "[PASID_BROKER_ADMIN_SOCKET; default admin.sock beside the socket]",
    )
    common.add_argument(
        "--peer-socket",
        default=d(None),
        help="the broker's peer-handshake socket, through which hold proves who it is "
        "[PASID_BROKER_PEER_SOCKET; default peer.sock beside the socket]",
    )
    common.add_argument("--timeout", type=float, default=d(10.0), help="seconds per call")
    common.add_argument(
        "--reconnect-deadline",
        type=float,
        default=d(60.0),
        metavar="SECONDS",
        help="how long a command waits for a broker that is not there yet, starting or"
        " recovering, and hold, watch and top reconnect after it went away (default 60;"
        " 0: never); a socket that refuses this user fails at once",
    )
    return common


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _ratio(v: str) -> float:
    r = float(v)
    if not 0.0 <= r <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {v}")
    return r


def _positive_float(v: str) -> float:
    x = float(v)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {v}")
    return x


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(suppress=True)
    sess = _Parser(add_help=False)
    sess.add_argument("--session", help="session id [PASID_SESSION_ID]")
    tok = sess.add_mutually_exclusive_group()
    tok.add_argument(
        "--token",
        help="session token; visible to every user in the process list, so prefer"
        " PASID_SESSION_TOKEN or --token-file [PASID_SESSION_TOKEN]",
    )
    tok.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the session token from this file (e.g. written by 'hold --token-out')"
        " [PASID_SESSION_TOKEN_FILE]",
    )
    rng = _Parser(add_help=False)
    rng.add_argument("--min", type=int, default=1, help="lowest acceptable PASID")
    rng.add_argument(
        "--max", type=int, default=None, help="highest acceptable PASID (default: 2^pasid_bits - 1)"
    )

    p = _Parser(
        prog="pasidctl",
        parents=[_common_options(suppress=False)],
        description="Talk to a pasid-broker: inspect the PASID namespace, hold a session, "
        "allocate and free, load it with a benchmark. Exit status: 0 ok, 1 the broker refused "
        "(message on stderr), 2 usage. With --json, errors too are one JSON document on stdout.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", parents=[common], help="backend, pasid_bits, capacity, use, quotas")
    a = sub.add_parser(
        "alloc", parents=[common, sess, rng], help="allocate PASIDs for a session held elsewhere"
    )
    a.add_argument("--count", type=int, default=1, help="how many, all or nothing")
    f = sub.add_parser(
        "free",
        parents=[common, sess],
        help="free a session's PASIDs in [min, max] (default: all it holds)",
    )
    f.add_argument("--min", type=int, default=0, help="lowest PASID to free (default 0)")
    f.add_argument(
        "--max", type=int, default=ALL, help="highest PASID to free (default: all above --min)"
    )
    li = sub.add_parser(
        "list",
        parents=[common, sess],
        help="a session's set, or every set (the default without a session)",
    )
    li.add_argument("--all", action="store_true", help="every set on the broker")
    w = sub.add_parser(
        "watch",
        parents=[common, sess],
        help="follow the event log (alloc, free, sets created and destroyed): a session's "
        "own set, or every set on the admin socket (the default without a session); waits "
        "for a broker that is starting and follows on through its restart",
    )
    w.add_argument(
        "--from",
        dest="from_revision",
        type=int,
        default=0,
        help="replay from this revision first (0: only new events)",
    )
    w.add_argument("--count", type=int, default=0, help="stop after this many events")
    sub.add_parser(
        "sets", parents=[common], help="every set with owner, pid, peer and counts (admin socket)"
    )
    sub.add_parser(
        "withheld",
        parents=[common],
        help="the PASIDs a failed kernel call or a witness's claim keeps from the pool, and"
        " what each waits for (admin socket; docs/runbook.md)",
    )
    r = sub.add_parser(
        "revoke",
        parents=[common],
        help="destroy a set now; its holder's stream ends (admin socket)",
    )
    r.add_argument("set_id", type=int, help="the set to destroy (see 'pasidctl sets')")
    r.add_argument("--reason", default="", help="recorded in the event log")
    qp = sub.add_parser(
        "quota",
        parents=[common],
        help="change quotas durably (they outlive a restart), for all sets or one (admin)",
    )
    qp.add_argument(
        "--set", dest="set_id", type=int, default=0, help="only this set (default: every set)"
    )
    qp.add_argument(
        "--per-set", type=int, default=None, help="PASIDs one set may hold (0: no limit)"
    )
    qp.add_argument(
        "--per-client",
        type=int,
        default=None,
        help="PASIDs all sets of one client may hold (0: no limit)",
    )
    qp.add_argument(
        "--global",
        dest="global_",
        type=int,
        default=None,
        help="PASIDs all clients together may hold (0: no limit)",
    )
    rq = sub.add_parser(
        "request",
        parents=[common, sess],
        help="VFIO_IOMMU_PASID_REQUEST as the ioctl: prints the PASID (ALLOC) or 0 (FREE)",
    )
    rq.add_argument(
        "--flags", type=lambda v: int(v, 0), required=True, help="1 = ALLOC_PASID, 2 = FREE_PASID"
    )
    rq.add_argument("--min", type=int, required=True, help="the ioctl's range.min")
    rq.add_argument("--max", type=int, required=True, help="the ioctl's range.max")
    rq.add_argument("--argsz", type=int, default=16, help="the struct size the caller passes")
    h = sub.add_parser(
        "hold",
        parents=[common, rng],
        help="open a session, allocate, and hold until Ctrl-C (then all is freed)",
    )
    h.add_argument("--count", type=int, default=1, help="how many PASIDs to hold")
    h.add_argument("--client", default="pasidctl", help="client name shown to operators")
    h.add_argument(
        "--grace",
        type=int,
        default=0,
        help="for an anonymous session (a TCP address) only: seconds its set waits for a"
        " resume by token after its stream ends (0: freed at once). A verified set (Unix"
        " socket) follows its holder process instead: it ends at Ctrl-C or when the holder"
        " exits, whatever its grace",
    )
    h.add_argument(
        "--delegate-pid",
        type=int,
        default=None,
        help="hold the set for this process instead (a sidecar for its VMM): the set dies "
        "with it; allowed if it holds no uid but this user's (root: any). The pid as this"
        " process sees it",
    )
    h.add_argument(
        "--reattach",
        type=int,
        metavar="SET_ID",
        default=None,
        help="take back this detached set of the holder (--delegate-pid) without its token."
        " Default with --delegate-pid: its one detached set of this --client name, if any",
    )
    h.add_argument(
        "--no-reattach",
        action="store_true",
        help="always open a new set, even if the holder has a detached one",
    )
    h.add_argument(
        "--token-out",
        metavar="PATH",
        help="also write the session token to this new file (mode 0600), for --token-file;"
        " removed at release unless --grace keeps the set",
    )
    t = sub.add_parser(
        "top",
        parents=[common],
        help="live view: utilisation, alloc/free rates, top holders (refreshed from the broker)",
        description=top.__doc__,
    )
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    t.add_argument("--count", type=int, default=0, help="stop after N screens (0: never)")
    t.add_argument("--once", action="store_true", help="one screen, with rates over one --interval")
    t.add_argument("--top", type=int, default=10, help="how many holders to show")
    b = sub.add_parser(
        "bench",
        parents=[common],
        help="load the broker with sessions allocating and freeing; throughput and latency",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--concurrency",
        type=_positive_int,
        default=4,
        help="sessions, each with one request in flight (default 4)",
    )
    amount = b.add_mutually_exclusive_group()
    amount.add_argument(
        "--duration", type=_positive_float, default=10.0, help="seconds to run (default 10)"
    )
    amount.add_argument(
        "--count",
        type=_positive_int,
        default=0,
        help="requests to issue in all, instead of --duration",
    )
    b.add_argument(
        "--alloc-ratio",
        type=_ratio,
        default=0.5,
        help="share of requests that allocate, the rest free (default 0.5; above it the"
        " sets grow until a quota refuses)",
    )
    b.add_argument(
        "--batch", type=_positive_int, default=1, help="PASIDs per alloc and per free (default 1)"
    )
    b.add_argument("--client", default="pasidctl-bench", help="client name of the bench's sessions")
    return p


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "info": cmd_info,
    "alloc": cmd_alloc,
    "free": cmd_free,
    "list": cmd_list,
    "hold": cmd_hold,
    "watch": cmd_watch,
    "sets": cmd_sets,
    "revoke": cmd_revoke,
    "withheld": cmd_withheld,
    "quota": cmd_quota,
    "request": cmd_request,
    "top": cmd_top,
    "bench": cmd_bench,
}


def _usage_error(exc: UsageError, as_json: bool) -> int:
    if as_json:
        doc = {"error": {"code": "USAGE", "message": str(exc), "reason": "usage"}}
        print(json.dumps(doc), flush=True)
    print(f"{exc.usage}{exc}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    # pasidctl says on stderr itself what the library's sessions live through.
    logging.getLogger("pasid_client").addHandler(logging.NullHandler())
    logging.getLogger("pasid_client").propagate = False
    raw = sys.argv[1:] if argv is None else argv
    # Known before parsing, so that a command line argparse refuses still gets JSON.
    as_json = "--json" in raw[: raw.index("--")] if "--" in raw else "--json" in raw
    try:
        args = build_parser().parse_args(raw)
    except UsageError as exc:
        return _usage_error(exc, as_json)
    try:
        with Client(
            args.address,
            socket=args.socket,
            timeout=args.timeout,
            peer_socket=args.peer_socket,
            reconnect_deadline_seconds=args.reconnect_deadline,
        ) as c:
            return COMMANDS[args.command](c, args)
    except UsageError as exc:
        return _usage_error(exc, args.json)
    except PasidClientError as exc:
        if args.json:
            print(
                json.dumps(
                    {"error": {"code": exc.code.name, "message": exc.message, "reason": exc.reason}}
                ),
                flush=True,
            )
        print(f"pasidctl: {exc.code.name}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
