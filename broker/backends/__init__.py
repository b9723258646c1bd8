"""Backends: where PASID requests go. `create(name, ...)` is the one place that picks.

Backends are registered by name (register_backend); the daemon's --backend choices are
the registered names. The built-in ones are "simulator", "iommufd" and "vfio"; a test launcher may
register more (tests/faults/launch.py registers a fake kernel).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from broker.backends.base import (
    Backend,
    Capabilities,
    alloc_many,
    error_from_errno,
    replay,
)
from broker.backends.simulator import SimulatorBackend
from broker.core.errors import PasidError

log = logging.getLogger("pasid_broker")

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

    def alloc_many(self, lo: int, hi: int, count: int) -> list[int]:
        return alloc_many(self.current, lo, hi, count)

    def free(self, lo: int, hi: int) -> None:
        self.current.free(lo, hi)

    def free_many(self, pasids: Sequence[int]) -> bool:
        own = getattr(self.current, "free_many", None)
        return bool(own is not None and own(pasids))

    def replay(self, pasids: Iterable[int]) -> int:
        return replay(self.current, pasids)

    def close(self) -> None:
        self.current.close()


@dataclass(frozen=True)
class BackendOptions:
    """What configuration tells a backend factory (the --backend family of flags)."""

    pasid_bits: int = 20
    kernel_quota: int = 0
    vfio_groups: Sequence[str] = ()
    vfio_pasid_bits: int = 0
    vfio_fallback: str = "none"


BackendFactory = Callable[[BackendOptions], Backend]
_REGISTRY: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `--backend NAME` build its backend with `factory` (replacing any earlier one)."""
    _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_REGISTRY)


def factory_of(name: str) -> BackendFactory:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None


def with_fallback(backend: Backend, opts: BackendOptions) -> Backend:
    """`backend`, or the simulator should it refuse at open(), as --vfio-fallback asks."""
    if opts.vfio_fallback == "simulator":
        return FallbackBackend(backend, SimulatorBackend(opts.pasid_bits, opts.kernel_quota))
    if opts.vfio_fallback != "none":
        raise ValueError(f"unknown --vfio-fallback {opts.vfio_fallback!r}")
    return backend


def _simulator(opts: BackendOptions) -> Backend:
    return SimulatorBackend(pasid_bits=opts.pasid_bits, quota=opts.kernel_quota)


def _vfio(opts: BackendOptions) -> Backend:
    from broker.backends.vfio import VfioBackend

    return with_fallback(
        VfioBackend(groups=opts.vfio_groups, pasid_bits=opts.vfio_pasid_bits), opts
    )


def _iommufd(opts: BackendOptions) -> Backend:
    from broker.backends.iommufd import IommufdBackend

    return IommufdBackend()


register_backend("simulator", _simulator)
register_backend("iommufd", _iommufd)
register_backend("vfio", _vfio)


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
    return factory_of(name)(
        BackendOptions(pasid_bits, kernel_quota, tuple(vfio_groups), vfio_pasid_bits, vfio_fallback)
    )


__all__ = [
    "FALLBACKS",
    "Backend",
    "BackendFactory",
    "BackendOptions",
    "Capabilities",
    "FallbackBackend",
    "SimulatorBackend",
    "alloc_many",
    "create",
    "error_from_errno",
    "factory_of",
    "names",
    "register_backend",
    "replay",
    "with_fallback",
]
