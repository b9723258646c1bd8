"""The backend interface: where a PASID request goes after the broker has decided it.

Like httpx's BaseTransport, a deliberate cut between policy and mechanism: the core picks
the PASID, the backend makes the platform agree (a VFIO ioctl, or the simulator's model of
the kernel allocator). Plain ints in, plain ints out; failures as broker.core.errors.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from broker.core.errors import (
    BackendError,
    Exhausted,
    InvalidRange,
    PasidError,
    QuotaExceeded,
    Unsupported,
)


@dataclass(frozen=True)
class Capabilities:
    """What a backend reported at open()."""

    name: str
    pasid_bits: int
    # Where pasid_bits came from (e.g. "config", "nesting capability", "sysfs ecap"),
    # so that the start-up log can say it.
    pasid_bits_source: str
    detail: str = ""


class Backend(Protocol):
    """alloc/free PASIDs on the platform. Called from one thread at a time."""

    name: str

    def open(self) -> Capabilities:
        """Probe and prepare; raise Unsupported with the reason when PASIDs cannot be served."""
        ...

    def alloc(self, lo: int, hi: int) -> int:
        """Allocate one PASID in [lo, hi] (the broker always asks for [p, p])."""
        ...

    def free(self, lo: int, hi: int) -> None:
        """Free the broker's PASIDs in [lo, hi]."""
        ...

    # Optional: `alloc_many(lo, hi, count) -> list[int]`, `count` PASIDs in [lo, hi] in
    # one call, all or none. The broker asks for whole runs (count == hi - lo + 1). A
    # backend without it gets the loop of alloc_many() below.
    # Optional: `free_many(pasids) -> bool`, release exactly these PASIDs (ascending, all
    # held) in one call, all or none; False, having done nothing, when it cannot (the
    # caller then frees run by run). A set's PASIDs are often scattered: one call, not
    # one per run.

    def close(self) -> None:
        """Release everything; the kernel frees what is left when the set is destroyed."""
        ...


class DeviceHandleLike(Protocol):
    name: str
    pasid_bits: int


class Devices(Protocol):
    """Per-set delegated devices whose kernel PASID attachments follow the set (iommufd).

    The engine calls release() before a set's PASIDs go back to the pool (free, destroy,
    revoke) and drop_set() when the set is gone; attach() after a grant that names one."""

    def device(self, set_id: int, name: str) -> DeviceHandleLike: ...

    def attach(self, set_id: int, name: str, pasid: int) -> None: ...

    def release(self, set_id: int, pasids: Iterable[int]) -> None: ...

    def drop_set(self, set_id: int) -> None:
        """Detach all the set's attachments and close its devices. DetachFailed names the
        PASIDs the kernel would not detach: they stay attached, for retry_detach()."""
        ...

    def stuck(self) -> dict[int, list[int]]:
        """set_id -> PASIDs gone sets left attached (a failed DETACH)."""
        ...

    def retry_detach(self) -> list[int]:
        """Retry the failed DETACHes; the PASIDs now detached everywhere."""
        ...

    def let_go(self, set_id: int) -> list[int]:
        """The gone set's holder exited and nobody else has its devices open: close them
        (the kernel detaches at the last close); its PASIDs."""
        ...

    def stuck_devices(self, set_id: int) -> list[str]:
        """Keys of the gone set's devices that still have a PASID attached (stored)."""
        ...

    def detach_on(self, key: str, pasids: Sequence[int]) -> bool:
        """After a restart: DETACH these through the device `key` names, if a live set has
        delegated it again; True when all succeeded (none is attached on it now)."""
        ...

    def still_delegated(self, keys: Sequence[str]) -> str | None:
        """Why these devices may still be bound as the broker's own state says (no keys,
        a live set has one delegated); None if only open_elsewhere can tell. On the
        event loop."""
        ...

    def open_elsewhere(self, keys: Sequence[str], give_up_after: float) -> str | None:
        """None if no other process has any of these devices open (nothing can be
        attached through them any more); else why not. Reads /proc only, not the
        broker's state: called on a thread of its own (a look stats every fd on the
        host), and proves nothing after `give_up_after` seconds."""
        ...

    def adopt_delegated(
        self,
        set_id: int,
        fds: Sequence[tuple[str, int]],
        devices: Sequence[Mapping[str, Any]],
        *,
        holder_pid: int | None,
        held: Iterable[int] = (),
    ) -> Sequence[DeviceHandleLike]:
        """Adopt what a ticket delegated (docs/peer-identity.md roles), all or none."""
        ...

    def widths(self) -> list[tuple[str, str, int, int]]:
        """(kind "iommu"|"device", name, pasid_bits, set_id) as the kernel reported them."""
        ...


def replay(backend: Backend, pasids: Iterable[int]) -> int:
    """Re-establish held PASIDs after a restart, one [p, p] alloc each; returns the count.

    A backend may define a faster `replay(pasids)` of its own; this is the generic one.
    """
    own = getattr(backend, "replay", None)
    if own is not None:
        return int(own(pasids))
    n = 0
    for p in pasids:
        got = backend.alloc(p, p)
        if got != p:
            raise RuntimeError(f"backend {backend.name} replayed PASID {p} as {got}")
        n += 1
    return n


def alloc_many(backend: Backend, lo: int, hi: int, count: int) -> list[int]:
    """`count` PASIDs in [lo, hi], all or none: the backend's own `alloc_many` if it has
    one (the simulator's takes whole words), else alloc_each: one alloc per PASID, [p, p]
    when the run is whole as the kernel's ioctl is called, freeing what it got if one
    fails."""
    own = getattr(backend, "alloc_many", None)
    if own is not None:
        return list(own(lo, hi, count))
    return alloc_each(backend, lo, hi, count)


def alloc_each(backend: Backend, lo: int, hi: int, count: int) -> list[int]:
    """alloc_many as one alloc call per PASID (what a backend without its own gets)."""
    whole = count == hi - lo + 1
    got: list[int] = []
    try:
        for i in range(count):
            got.append(backend.alloc(lo + i, lo + i) if whole else backend.alloc(lo, hi))
    except BaseException:
        for p in got:
            # Best effort: a PASID the backend keeps is one it holds, never one handed
            # out twice.
            with contextlib.suppress(PasidError):
                backend.free(p, p)
        raise
    return got


def errno_name(err: int | None) -> str:
    """The kernel's name for an errno (Linux's 95 is EOPNOTSUPP in the kernel, not ENOTSUP)."""
    if err == _errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return _errno.errorcode.get(err or 0, str(err))


def error_from_errno(err: int, what: str, quota: int = 0) -> PasidError:
    """A kernel errno as the core's exception: the backend half of README's errno table.

    broker/service/status.py maps these exceptions to gRPC; this maps the errno to them,
    so that a backend never picks a gRPC status itself. `what` names the call and range.
    """
    message = f"{what}: {errno_name(err)} ({os.strerror(err)})"
    if err == _errno.EINVAL:
        return InvalidRange(message)
    if err == _errno.ENOSPC:
        return Exhausted(message)
    if err == _errno.EDQUOT:
        return QuotaExceeded("kernel", quota, message)
    if err in (_errno.EOPNOTSUPP, _errno.ENOTTY):
        exc = Unsupported(message)
        exc.errno = err
        return exc
    return BackendError(err, message)
