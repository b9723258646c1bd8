"""A sidecar that holds one set for each of many VMM processes, by delegation.

    python -m tests.e2e.sidecar ADDRESS PID [PID ...] [--count N]

Opens one session per PID (`delegate_pid`: the set's holder is that process), allocates
N PASIDs in each, prints one JSON line {pid: {"set_id", "pasids"}}, then waits for stdin
to close. The restart tests SIGKILL it, or kill the broker under it: its streams break,
and every set must live on with its VMM (issue 19).
"""

from __future__ import annotations

import argparse
import json
import sys

from pasid_client import Client


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("pids", type=int, nargs="+")
    p.add_argument("--count", type=int, default=2)
    args = p.parse_args()
    out: dict[int, dict[str, object]] = {}
    # No reconnect of its own: the restart tests look at what the broker keeps by itself.
    with Client(args.address, reconnect_deadline_seconds=0) as c:
        sessions = []
        for pid in args.pids:
            s = c.session(f"vmm-{pid}", delegate_pid=pid)
            sessions.append(s)
            out[pid] = {"set_id": s.set_id, "pasids": s.alloc(1, 1 << 19, args.count)}
        print(json.dumps(out), flush=True)
        sys.stdin.read()
        for s in sessions:
            s.detach()  # a sidecar going away is not a release


if __name__ == "__main__":
    main()
