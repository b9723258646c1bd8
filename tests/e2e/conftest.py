"""Fixtures shared by the end-to-end tests; the e2e suite runs on each backend its
daemons may use, in one pytest run.

Every e2e test is parametrized with the backend its brokers run on, as a module-scoped
fixture that sets PASID_BROKER_BACKEND (the daemon reads it itself; the test launcher
registers the test-only vfio-fake): `simulator`, and `vfio-fake`, the VFIO backend over
the fake of the patched kernel (tests/faults/vfio_fake_kernel.py), which no mainline
kernel is. `make test` asks for both (PASID_E2E_BACKENDS=simulator,vfio-fake), so both
passes share one pool of workers instead of the second waiting for the first to end.

Which backends: PASID_E2E_BACKENDS (comma-separated); else PASID_BROKER_BACKEND alone, as
`PASID_BROKER_BACKEND=vfio-fake pytest tests/e2e` always meant; else the simulator. A
test marked `backend_pinned` chooses its daemons' backend itself (or starts none), so it
runs once, on the first backend. A module-scoped fixture that starts a broker takes
`e2e_backend`, so that it is made again for each backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest


def backends() -> list[str]:
    listed = os.environ.get("PASID_E2E_BACKENDS", "")
    names = [n.strip() for n in listed.split(",") if n.strip()]
    return names or [os.environ.get("PASID_BROKER_BACKEND") or "simulator"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "e2e_backend" in metafunc.fixturenames:
        names = backends()
        if metafunc.definition.get_closest_marker("backend_pinned") is not None:
            names = names[:1]
        metafunc.parametrize("e2e_backend", names, indirect=True, scope="module")


@pytest.fixture(autouse=True, scope="module")
def e2e_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The backend of every broker this test starts (PASID_BROKER_BACKEND, for the
    daemon and for what the test spawns)."""
    name = str(request.param)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PASID_BROKER_BACKEND", name)
        yield name


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts (holders, clients); each is killed at the end, woken
    first in case the test left it stopped (SIGSTOP)."""
    made: list[subprocess.Popen[str]] = []
    yield made
    for p in made:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait(10)
