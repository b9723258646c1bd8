"""`python -m bench [NAME ...]`: run the named benchmarks (default: all), print results."""

from __future__ import annotations

import argparse
import importlib

# name -> module under bench/ with main(quick: bool) -> int
BENCHMARKS = {
    "core": "bench.core",
    "rpc": "bench.rpc",
    "release": "bench.release",
    "restart": "bench.restart",
    "watch": "bench.watch",
    "handshake": "bench.handshake",
    "memory": "bench.memory",
}
# Run only when named: diagnostics, not targets (bench/profile.py needs perf).
ON_REQUEST = {"profile": "bench.profile"}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    known = {**BENCHMARKS, **ON_REQUEST}
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"one of {', '.join(known)} (default: all but {', '.join(ON_REQUEST)})",
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = p.parse_args()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(known)}")
    rc = 0
    for name in args.names or list(BENCHMARKS):
        print(f"== {name} ==", flush=True)
        rc |= importlib.import_module(known[name]).main(quick=args.quick)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
