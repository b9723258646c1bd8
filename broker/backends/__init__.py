"""Backends: where PASID requests go. `create(name, ...)` is the one place that picks."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from broker.backends.base import Backend, Capabilities, error_from_errno, replay
from broker.backends.simulator import SimulatorBackend
from broker.core.errors import PasidError

log = logging.getLogger("pasid_broker")

# "vfio-fake" is TEST ONLY: the real VFIO backend over a fake of the patched kernel's
# ioctls (broker/backends/vfio_fake_kernel.py), so the e2e suite covers its success path.
NAMES = ("simulator", "vfio", "vfio-fake")
FALLBACKS = ("none", "simulator")


class FallbackBackend:
    """The operator's documented choice: if `primary` refuses at open(), serve with
    `fallback` instead, and say so loudly in the log and in the backend's detail."""

    def __init__(self, primary: Backend, fallback: Backend) -> None:
        self.primary = primary
        self.fallback = fallback
        self.current: Backend = primary
        self.name = primary.name

    def open(self) -> Capabilities:
        try:
            return self.primary.open()
        except PasidError as exc:
            log.warning(
                "backend %s refused (%s); serving with the %s backend as --vfio-fallback asks:"
                " PASIDs are NOT allocated in the kernel",
                self.primary.name,
                exc.message,
                self.fallback.name,
            )
            self.current = self.fallback
            self.name = self.fallback.name
            caps = self.fallback.open()
            return Capabilities(
                caps.name,
                caps.pasid_bits,
                caps.pasid_bits_source,
                f"fallback from {self.primary.name}: {exc.message}",
            )

    def alloc(self, lo: int, hi: int) -> int:
        return self.current.alloc(lo, hi)

    def free(self, lo: int, hi: int) -> None:
        self.current.free(lo, hi)

    def replay(self, pasids: Iterable[int]) -> int:
        return replay(self.current, pasids)

    def close(self) -> None:
        self.current.close()


def create(
    name: str,
    *,
    pasid_bits: int = 20,
    kernel_quota: int = 0,
    vfio_groups: Sequence[str] = (),
    vfio_pasid_bits: int = 0,
    vfio_fallback: str = "none",
) -> Backend:
    """Build the backend named by configuration."""
    if name == "simulator":
        return SimulatorBackend(pasid_bits=pasid_bits, quota=kernel_quota)
    if name in ("vfio", "vfio-fake"):
        from broker.backends.vfio import VfioBackend

        if name == "vfio":
            backend: Backend = VfioBackend(groups=vfio_groups, pasid_bits=vfio_pasid_bits)
        else:
            from broker.backends.vfio_fake_kernel import FakePatchedKernel

            # The fake kernel reports --pasid-bits in its nesting capability and models
            # --kernel-quota as vfio_pasid's pasid_quota, as the simulator does.
            fake = FakePatchedKernel(pasid_bits=pasid_bits, quota=kernel_quota)
            backend = VfioBackend(groups=vfio_groups, kernel=fake, name="vfio-fake")
        if vfio_fallback == "simulator":
            return FallbackBackend(backend, SimulatorBackend(pasid_bits, kernel_quota))
        if vfio_fallback != "none":
            raise ValueError(f"unknown --vfio-fallback {vfio_fallback!r}")
        return backend
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")


__all__ = [
    "FALLBACKS",
    "NAMES",
    "Backend",
    "Capabilities",
    "FallbackBackend",
    "SimulatorBackend",
    "create",
    "error_from_errno",
    "replay",
]
