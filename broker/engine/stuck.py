"""PASIDs whose DETACH failed when their set was destroyed: withheld from the pool until
the kernel has let go of them (issue 22, point 7; docs/quarantine.md, "A failed DETACH").

A failed DETACH leaves the PASID attached to the gone set's device: handed to another set,
its DMA would land in the old owner's address space. So it is withheld (counted as
quarantined, held by no set, still held in the backend) until either a DETACH retried
every RETRY_SECONDS succeeds, or the set's verified holder has exited, when the broker
closes its own copies of the device fds and the kernel detaches at the last close.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

from broker.backends.base import Devices
from broker.core import Allocator
from broker.engine.backend_calls import BackendCalls
from broker.engine.holders import Holder, reopen_holder

log = logging.getLogger("pasid_broker")

RETRY_SECONDS = 1.0


def _alive(holder: Holder) -> bool:
    fd = reopen_holder(holder)
    if fd is None:
        return False
    os.close(fd)
    return True


class StuckDetaches:
    """The engine's withheld PASIDs and the timer that retries their DETACH."""

    def __init__(
        self, devices: Devices, allocator: Callable[[], Allocator], backend_calls: BackendCalls
    ) -> None:
        self._devices = devices
        self._allocator = allocator
        self._backend_calls = backend_calls
        self._holders: dict[int, Holder | None] = {}  # gone set -> its verified holder
        self._timer: asyncio.TimerHandle | None = None

    def withhold(self, set_id: int, pasids: Sequence[int], holder: Holder | None) -> None:
        """The set is gone but the kernel kept these attached: keep them from the pool."""
        kept = self._allocator().withhold(pasids)
        self._holders[set_id] = holder
        log.error(
            "set %d: DETACH failed for %d PASIDs; withheld from the pool until a DETACH"
            " succeeds or the holder exits",
            set_id,
            len(kept),
            extra={"session": set_id, "pasids": kept[:32]},
        )
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RETRY_SECONDS, self.retry)

    def retry(self) -> list[int]:
        """Retry the DETACHes; let go of the sets whose holder exited; release what the
        kernel no longer uses. Returns those PASIDs."""
        self._timer = None
        done = self._devices.retry_detach()
        stuck = self._devices.stuck()
        for set_id, holder in list(self._holders.items()):
            if set_id not in stuck:
                del self._holders[set_id]
            elif holder is not None and not _alive(holder):
                done += self._devices.let_go(set_id)
                del self._holders[set_id]
        if done:
            free = self._allocator().release_withheld(done)
            if free:
                self._backend_calls.free(free)
            log.info("withheld PASIDs detached: released", extra={"pasids": sorted(done)[:32]})
        if self._devices.stuck():
            self._timer = asyncio.get_running_loop().call_later(RETRY_SECONDS, self.retry)
        return sorted(done)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
