"""Hold PASIDs for the VMM in this pod, as the VMM: a sidecar for pasid-broker.

The pod runs with shareProcessNamespace: true (and no hostPID), so this sidecar sees the
VMM's process. It opens a pidfd on it and hands that pidfd to the broker on its peer
socket (the verified-peer handshake with delegation, docs/peer-identity.md): the broker
checks from the kernel that the VMM holds no uid this sidecar lacks (same uid, here the
pod's runAsUser) and makes the VMM the holder of the set. When the VMM exits, the broker
destroys the set at once, whether this sidecar is still there or not; when this sidecar
stops (SIGTERM) or dies while the VMM runs, the set stays, and the restarted sidecar
re-attaches it. A broker that is not serving yet (starting, recovering) is waited for,
and a broker restart is lived through; both are said on stderr.

Settings (environment): VMM_COMMAND (the VMM's executable name), PASID_COUNT,
PASID_BROKER_SOCKET, PASID_FILE (where the PASIDs are written for the VMM to read),
VMM_WAIT_SECONDS.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from pathlib import Path


def find_vmm(command: str, proc: str = "/proc") -> int | None:
    """The pid of a process of ours (same uid) running `command`, else None."""
    me, uid = os.getpid(), os.getuid()
    for entry in Path(proc).iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            comm = (entry / "comm").read_text().strip()
            owner = entry.stat().st_uid
        except OSError:
            continue  # gone meanwhile
        if owner == uid and command in (os.path.basename(argv0), comm):
            return int(entry.name)
    return None


def wait_for_vmm(command: str, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while (pid := find_vmm(command)) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"pasid-sidecar: no process {command!r} after {seconds:g} s")
        time.sleep(0.5)
    return pid


def say(what: str) -> None:
    """One line on stderr: what the sidecar waits for or lives through."""
    print(f"pasid-sidecar: {what}", file=sys.stderr, flush=True)


def main() -> int:
    command = os.environ.get("VMM_COMMAND", "qemu-system-x86_64")
    count = int(os.environ.get("PASID_COUNT", "1"))
    socket = os.environ.get("PASID_BROKER_SOCKET", "/run/pasid-broker/broker.sock")
    out = Path(os.environ.get("PASID_FILE", "/run/vmm/pasids.json"))
    pid = wait_for_vmm(command, float(os.environ.get("VMM_WAIT_SECONDS", "120")))
    # A pidfd, never the number: the broker must not adopt a recycled pid.
    pidfd = os.pidfd_open(pid)

    from pasid_client import Client, SessionState, StateChange, Unavailable

    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    def told(change: StateChange) -> None:
        """A broker restart (a DaemonSet update) is lived through, and said on stderr."""
        what = {
            SessionState.RECONNECTING: f"broker went away ({change.error}); reconnecting",
            SessionState.RESUMED: f"resumed set {change.set_id}",
            SessionState.LOST: f"set {change.set_id} lost: {change.error}",
        }.get(change.state)
        if what:
            say(what)

    signal.signal(signal.SIGTERM, on_term)
    # The library handshakes on peer.sock beside the socket, sending the VMM's pidfd
    # (docs/peer-identity.md, delegation): the broker makes the VMM the holder of the
    # set. The session reconnects by itself when the broker restarts, proving the VMM
    # again.
    with Client(socket=socket) as client:
        try:
            client.wait_ready(0)
        except Unavailable:  # starting or recovering (a refusal, SOCKET_ACCESS, is final)
            say("waiting for the broker to serve, up to 60 s")
            client.wait_ready(60)
            say("the broker serves")
        name = f"vmm-{pid}"
        # Restarted (the kubelet, an OOM kill)? The VMM's set outlived us, detached:
        # take it back instead of opening a second one (docs/peer-identity.md).
        mine = [
            v.set_id
            for v in client.held_sets(delegate_pidfd=pidfd)
            if v.state == "detached" and v.client == name
        ]
        reattach = mine[0] if len(mine) == 1 else 0
        with client.session(
            name, delegate_pidfd=pidfd, reattach_set_id=reattach, on_state_change=told
        ) as session:
            have = sorted(session.list().pasids()) if reattach else []
            pasids = have + session.alloc(count=count - len(have)) if count > len(have) else have
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"pasids": pasids, "holder_pid": pid}))
            again = "re-attached, " if reattach else ""
            print(f"pasid-sidecar: {again}holding {pasids} for pid {pid}", flush=True)
            # Until the VMM exits (its pidfd becomes readable) or the pod stops us.
            while not stop and not select.select([pidfd], [], [], 1.0)[0]:
                if session.state is SessionState.LOST:
                    return 1  # the kubelet restarts us
            if stop:
                # SIGTERM: this container stops, maybe to be restarted while the VMM runs.
                # Let go of the stream without releasing the set: it lives on with the
                # VMM (and goes the moment the VMM exits, pod deletion included).
                session.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
