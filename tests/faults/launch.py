"""The test-only way to run a broker daemon: `python -m tests.faults.launch <broker args>`.

It installs what tests need in this process, then calls broker's own main, so that the
daemon's code, flags and --help stay free of test hooks:

- the `vfio-fake` backend: the real VfioBackend over the fake patched kernel
  (tests/faults/vfio_fake_kernel.py), registered with broker.backends.register_backend;
- the faults named by PASID_BROKER_TEST_FAULTS (tests/faults/faults.py): a failing
  backend (every registered factory wrapped), a slow store (its commit delayed), a slow
  recovery (the broker listens, and answers UNAVAILABLE, for as long as asked), and
  ack_before_commit, the deliberate bug the crash test must catch (the journal resolves
  each change's future as soon as it is queued), and a store that writes nothing (for
  bench.rpc's account of what SQLite costs).

tests/harness.py starts every daemon under test this way.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from broker import backends
from broker.backends import Backend, BackendOptions
from broker.engine.journal import Journal
from broker.store import Event, Record, SqliteStore
from tests.faults.faults import ENV, FailingBackend, TestFaults, load

T = TypeVar("T")


def _vfio_fake(opts: BackendOptions) -> Backend:
    from broker.backends.vfio import VfioBackend
    from tests.faults.vfio_fake_kernel import FakePatchedKernel

    # The fake kernel reports --pasid-bits in its nesting capability and models
    # --kernel-quota as vfio_pasid's pasid_quota, as the simulator does.
    fake = FakePatchedKernel(pasid_bits=opts.pasid_bits, quota=opts.kernel_quota)
    backend = VfioBackend(groups=opts.vfio_groups, kernel=fake, name="vfio-fake")
    return backends.with_fallback(backend, opts)


def register_fake_backend() -> None:
    """`--backend vfio-fake` (and backends.create("vfio-fake")) in this process."""
    backends.register_backend("vfio-fake", _vfio_fake)


def _failing(factory: backends.BackendFactory, faults: TestFaults) -> backends.BackendFactory:
    def build(opts: BackendOptions) -> Backend:
        return FailingBackend(
            factory(opts), faults.backend_fail_file, faults.backend_free_fail_file
        )

    return build


def _slow_commit(delay: float, gate: str) -> None:
    commit = SqliteStore.commit

    def slow(self: SqliteStore, records: Sequence[Record]) -> list[Event]:
        if not gate or os.path.exists(gate):
            time.sleep(delay)  # on the journal's writer thread, as a slow disk's fsync
        return commit(self, records)

    SqliteStore.commit = slow  # type: ignore[method-assign]


def _slow_recovery(delay: float, gate: str) -> None:
    from broker.engine.broker import Broker

    start = Broker.start

    def gate_open(end: float) -> None:
        while os.path.exists(gate) and time.monotonic() < end:
            time.sleep(0.05)

    async def slow(self: Broker) -> None:
        # Awaited on the loop: health answers NOT_SERVING meanwhile.
        if gate:
            await asyncio.to_thread(gate_open, time.monotonic() + delay)
        else:
            await asyncio.sleep(delay)
        await start(self)

    Broker.start = slow  # type: ignore[method-assign]


def _store_writes_nothing() -> None:
    def nothing(self: SqliteStore, records: Sequence[Record]) -> list[Event]:
        return []  # no events either: nobody watches a bench

    SqliteStore.commit = nothing  # type: ignore[method-assign]


def _ack_before_commit() -> None:
    submit = Journal.submit

    def acked_now(self: Journal, record: Record, undo: Callable[[], None], result: Any) -> Any:
        fut = submit(self, record, undo, result)
        fut.set_result(result)  # THE BUG: acknowledged before its commit
        return fut

    Journal.submit = acked_now  # type: ignore[method-assign]


def install(faults: TestFaults) -> None:
    register_fake_backend()
    if not faults.active:
        return
    print(
        f"pasid-broker: TEST FAULTS ACTIVE ({ENV}): not for production: {faults}",
        file=sys.stderr,
        flush=True,
    )
    if faults.backend_fail_file or faults.backend_free_fail_file:
        for name in backends.names():
            backends.register_backend(name, _failing(backends.factory_of(name), faults))
    if faults.commit_delay_ms:
        _slow_commit(faults.commit_delay_ms / 1000, faults.commit_delay_file)
    if faults.recovery_delay_ms:
        _slow_recovery(faults.recovery_delay_ms / 1000, faults.recovery_delay_file)
    if faults.ack_before_commit:
        _ack_before_commit()
    if faults.store_writes_nothing:
        _store_writes_nothing()


def main(argv: list[str] | None = None) -> int:
    try:
        faults = load()
    except ValueError as exc:
        print(f"pasid-broker: cannot start: {exc}", file=sys.stderr)
        return 2
    install(faults)
    from broker import config
    from broker.__main__ import main as broker_main

    # The daemon refuses PASID_BROKER_* variables it does not know; this one is ours.
    config.FOREIGN_ENV[ENV] = "the test launcher's faults (tests/faults)"

    return broker_main(argv)


if __name__ == "__main__":
    sys.exit(main())
