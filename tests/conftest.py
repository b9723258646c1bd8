"""Fixtures every tier shares, and how `make test` spreads the suite over workers.

`make test` runs pytest with pytest-xdist (`-n N --dist loadgroup`, docs/test-time.md):
most tests wait on broker processes, sockets and QEMU rather than on a core, so several
run at once. Tests that share one expensive set-up (a module fixture: a booted systemd, a
QEMU guest, a crashed broker's files) or that must not run beside each other (each QEMU
boot is TCG and keeps a core busy) carry an `xdist_group` mark: a group runs on one worker,
in file order. Everything else goes to whichever worker is free; every test already owns
its resources (a fresh directory, port 0, a random machine name: TEAM rules).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pasid_client import Client

from tests import terminal
from tests.harness import BrokerProcess

# Dealt out first, in this order, when the suite runs on workers: the groups and tests that
# take longest (measured in docs/test-time.md), so that none of them starts last and keeps
# one worker busy after the others have finished. Then the `slow`-marked tests, then the rest.
# `blockdev`: the tests that mount loop devices, and every test that makes a mount
# namespace (which copies the host's mounts at that moment and would keep a loop device
# busy); the real-systemd tier is one of them.
LONGEST_GROUPS = ("blockdev", "qemu")


def _deal_order(item: pytest.Item) -> tuple[int, int]:
    group = item.get_closest_marker("xdist_group")
    if group is not None and group.args and group.args[0] in LONGEST_GROUPS:
        return 0, LONGEST_GROUPS.index(group.args[0])
    if item.get_closest_marker("slow") is not None:
        return 1, 0
    return 2, 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On workers only: the longest work first (the order of a plain run is left alone).
    Every worker sorts the same collection the same way, as xdist requires."""
    if hasattr(config, "workerinput"):
        items.sort(key=_deal_order)  # stable: file order within each rank


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Lines from tests.terminal.note travel with the report (to the controller, under
    xdist)."""
    outcome = yield
    report = outcome.get_result()
    report.user_properties += [("terminal-note", text) for text in terminal.take()]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Print the notes where the reports arrive: the run's own terminal."""
    notes = [str(v) for k, v in report.user_properties if k == "terminal-note"]
    if notes and _config is not None and not hasattr(_config, "workerinput"):
        # Looked up now: it registers after this file's pytest_configure has run. A
        # worker's terminal goes nowhere; its notes reach the controller's.
        tr = _config.pluginmanager.get_plugin("terminalreporter")
        for text in notes if tr is not None else ():
            tr.write_line(f"\n{text}")


_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """A running broker on the simulator (20 bits, set quota 1000), with the flags of the
    test's `broker_args` marker (`pytestmark = pytest.mark.broker_args(...)` for a
    module)."""
    mark = request.node.get_closest_marker("broker_args")
    b = BrokerProcess(*(mark.args if mark is not None else ()))
    b.start()
    yield b
    b.cleanup()


@pytest.fixture
def make_broker() -> Iterator[object]:
    """A factory for brokers with extra flags; all are cleaned up."""
    made: list[BrokerProcess] = []

    def make(*args: str, start: bool = True) -> BrokerProcess:
        b = BrokerProcess(*args)
        made.append(b)
        return b.start() if start else b

    yield make
    for b in made:
        b.cleanup()


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[Client]:
    with Client(broker.address) as c:
        yield c


@pytest.fixture
def admin(broker: BrokerProcess) -> Iterator[Client]:
    """A client on the broker's admin socket."""
    with Client(broker.admin_address) as c:
        yield c
