"""`pasidctl`: the operator's view of a pasid-broker. Every command takes --json."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from pasid_client.errors import PasidClientError
from pasid_client.sync import Client
from pasid_client.types import ALL, SetView

EXIT_ERROR = 1
EXIT_USAGE = 2


def _fmt_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges) or "-"


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=True), flush=True)
    else:
        print(text(), flush=True)


def _session_ref(args: argparse.Namespace) -> tuple[int, str]:
    sid = args.session or os.environ.get("PASID_SESSION_ID")
    token = args.token or os.environ.get("PASID_SESSION_TOKEN")
    if not sid or not token:
        raise SystemExit(
            "pasidctl: this command acts on a session held elsewhere (e.g. by 'pasidctl hold'):"
            " give --session and --token, or PASID_SESSION_ID and PASID_SESSION_TOKEN"
        )
    return int(sid), token


def _set_dict(v: SetView) -> dict[str, Any]:
    d = asdict(v)
    d["ranges"] = [list(r) for r in v.ranges]
    return d


def cmd_info(c: Client, args: argparse.Namespace) -> int:
    i = c.info()
    d = asdict(i)
    d["quotas"] = {
        "per_set": i.quotas.per_set,
        "per_client": i.quotas.per_client,
        "global": i.quotas.global_,
    }
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
            ]
        )

    _emit(args, d, text)
    return 0


def cmd_alloc(c: Client, args: argparse.Namespace) -> int:
    sid, token = _session_ref(args)
    hi = args.max if args.max is not None else (1 << c.info().pasid_bits) - 1
    got = c.alloc(sid, token, args.min, hi, args.count)
    _emit(args, {"session_id": sid, "pasids": got}, lambda: " ".join(map(str, got)))
    return 0


def cmd_free(c: Client, args: argparse.Namespace) -> int:
    sid, token = _session_ref(args)
    n = c.free(sid, token, args.min, args.max)
    _emit(args, {"session_id": sid, "freed": n}, lambda: f"freed {n}")
    return 0


def cmd_list(c: Client, args: argparse.Namespace) -> int:
    if args.all or not (args.session or os.environ.get("PASID_SESSION_ID")):
        sets = c.list_all()
    else:
        sid, token = _session_ref(args)
        sets = [c.list_session(sid, token)]

    def text() -> str:
        lines = [f"{'SET':>6} {'STATE':9} {'CLIENT':20} {'PID':>7} {'COUNT':>7}  PASIDS"]
        for s in sets:
            lines.append(
                f"{s.set_id:>6} {s.state:9} {s.client[:20]:20} {s.pid:>7} {s.count:>7}"
                f"  {_fmt_ranges(s.ranges)}"
            )
        return "\n".join(lines)

    _emit(args, {"sets": [_set_dict(s) for s in sets]}, text)
    return 0


def cmd_hold(c: Client, args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with c.session(args.client, grace_seconds=args.grace) as s:
        hi = args.max if args.max is not None else (1 << s.pasid_bits) - 1
        got = s.alloc(args.min, hi, args.count) if args.count else []
        data = {
            "session_id": s.session_id,
            "token": s.token,
            "pasids": got,
            "ranges": [list(r) for r in s.list().ranges],
        }

        def text() -> str:
            return (
                f"holding {len(got)} PASIDs in session {s.session_id}:"
                f" {_fmt_ranges(s.list().ranges)}\n"
                f"  export PASID_SESSION_ID={s.session_id} PASID_SESSION_TOKEN={s.token}\n"
                "Ctrl-C releases them."
            )

        _emit(args, data, text)
        stop.wait()
    if not args.json:
        print("released", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document")
    common.add_argument(
        "--socket",
        help="broker's Unix socket [PASID_BROKER_SOCKET; default /run/pasid-broker/broker.sock]",
    )
    common.add_argument(
        "--address", help="gRPC target instead, e.g. unix:/path or host:port [PASID_BROKER_ADDRESS]"
    )
    common.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    sess = argparse.ArgumentParser(add_help=False)
    sess.add_argument("--session", help="session id [PASID_SESSION_ID]")
    sess.add_argument("--token", help="session token [PASID_SESSION_TOKEN]")
    rng = argparse.ArgumentParser(add_help=False)
    rng.add_argument("--min", type=int, default=1, help="lowest acceptable PASID")
    rng.add_argument(
        "--max", type=int, default=None, help="highest acceptable PASID (default: 2^pasid_bits - 1)"
    )

    p = argparse.ArgumentParser(
        prog="pasidctl",
        parents=[common],
        description="Talk to a pasid-broker: inspect the PASID namespace, hold a session, "
        "allocate and free. Exit status: 0 ok, 1 the broker refused (message on stderr), "
        "2 usage.",
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
    f.add_argument("--min", type=int, default=0)
    f.add_argument("--max", type=int, default=ALL)
    li = sub.add_parser(
        "list",
        parents=[common, sess],
        help="a session's set, or every set (the default without a session)",
    )
    li.add_argument("--all", action="store_true", help="every set on the broker")
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
        help="seconds the set outlives this process (0: freed at once)",
    )
    return p


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "info": cmd_info,
    "alloc": cmd_alloc,
    "free": cmd_free,
    "list": cmd_list,
    "hold": cmd_hold,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.address, socket=args.socket, timeout=args.timeout) as c:
            return COMMANDS[args.command](c, args)
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
