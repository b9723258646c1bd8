"""sd_notify(3) by hand: READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 to $NOTIFY_SOCKET.

The protocol is one datagram of newline-separated KEY=VALUE lines on an AF_UNIX socket
whose path (or abstract name, '@...') systemd puts in NOTIFY_SOCKET; a dozen lines do not
justify a dependency. Outside systemd (no NOTIFY_SOCKET) every call is a no-op, and a
failed send is logged once, never fatal: the broker serves whether or not anyone listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

log = logging.getLogger("pasid_broker")


class Notifier:
    """The service manager's ear, if there is one."""

    def __init__(self, address: str = "", watchdog_seconds: float = 0.0) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds
        self._warned = False

    @classmethod
    def from_env(cls) -> Notifier:
        """NOTIFY_SOCKET, and WATCHDOG_USEC when WATCHDOG_PID (if set) is this process."""
        address = os.environ.get("NOTIFY_SOCKET", "")
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watchdog = 0.0
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec) / 1e6
        return cls(address, watchdog)

    def notify(self, *lines: str) -> bool:
        """Send one datagram of KEY=VALUE lines; False if there is no listener."""
        if not self.address:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]  # abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), target)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %s: %s", self.address, exc)
            return False

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def ready(self, text: str) -> bool:
        return self.notify("READY=1", f"STATUS={text}")

    def stopping(self, text: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={text}")

    async def watchdog(self) -> None:
        """Ping at half the watchdog interval for as long as the event loop turns: a
        stuck loop stops the pings and systemd restarts the broker."""
        if not self.watchdog_seconds or not self.address:
            return
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                self.notify("WATCHDOG=1")
                await asyncio.sleep(self.watchdog_seconds / 2)
