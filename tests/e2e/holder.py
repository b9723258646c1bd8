"""A client process for tests: opens a session, allocates, prints one JSON line, waits.

    python -m tests.e2e.holder ADDRESS COUNT [GRACE] [LOOPS]

With LOOPS > 0 it instead allocates and frees LOOPS times, printing its final holding.
Killing it (SIGKILL) is how tests make a client die.
"""

from __future__ import annotations

import json
import sys
import time

from pasid_client import Client


def main() -> None:
    address, count = sys.argv[1], int(sys.argv[2])
    grace = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    loops = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    # No reconnect of its own: the tests resume its set by hand after a broker restart.
    with (
        Client(address, reconnect_deadline_seconds=0) as c,
        c.session("holder", grace_seconds=grace) as s,
    ):
        seen: list[int] = []
        for _ in range(loops):
            got = s.alloc(1, (1 << s.pasid_bits) - 1, count)
            seen.extend(got)
            s.free(got[0], got[-1])
        got = s.alloc(1, (1 << s.pasid_bits) - 1, count) if count else []
        print(
            json.dumps({"session_id": s.session_id, "token": s.token, "pasids": got, "seen": seen}),
            flush=True,
        )
        time.sleep(3600)


if __name__ == "__main__":
    main()
