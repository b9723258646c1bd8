"""Backends: where PASID requests go. `create(name, config)` is the one place that picks."""

from __future__ import annotations

from broker.backends.base import Backend, Capabilities, replay
from broker.backends.simulator import SimulatorBackend

NAMES = ("simulator", "vfio")


def create(name: str, *, pasid_bits: int = 20, kernel_quota: int = 0) -> Backend:
    """Build the backend named by configuration."""
    if name == "simulator":
        return SimulatorBackend(pasid_bits=pasid_bits, quota=kernel_quota)
    if name == "vfio":
        from broker.backends.vfio import VfioBackend

        return VfioBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")


__all__ = ["NAMES", "Backend", "Capabilities", "SimulatorBackend", "create", "replay"]
