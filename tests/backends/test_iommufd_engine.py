"""The engine with the iommufd backend: kernel attachments follow the sets.

In process: the real Broker, a real SQLite file and the real IommufdBackend. Mocked, at
the boundary this host cannot provide (no /dev/iommu, no VFIO cdev here): the two
ioctls ATTACH/DETACH (recorded into a model of the kernel's PASID table) and the
delegated devices' handles (adopt_device() needs a real cdev; the guest tier,
tests/kernel/test_iommufd_kernel.py, runs it against a real kernel). What is tested is
the order the engine keeps: the invariant that no PASID is handed to a set while an
attachment made for another set remains, through alloc, free, revoke, session end,
quarantine and a random mix of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from broker.backends.iommufd import DeviceHandle, IommufdBackend
from broker.backends.iommufd_checks import device_key
from broker.core import (
    BackendError,
    Conflict,
    Exhausted,
    InvalidRange,
    NotFound,
    Quarantine,
    Unsupported,
)
from broker.engine import Broker, Session, stuck
from broker.peer import PeerIdentity, TicketBook, credentials
from broker.store import SqliteStore

ECAP_20_BITS = "0x499880f00f4a"  # what QEMU 11's VT-d reported (KERNEL-NOTES.md)


class KernelModel:
    """The kernel's PASID table as ATTACH/DETACH leave it: (device fd, pasid) -> set."""

    def __init__(self) -> None:
        self.table: dict[tuple[int, int], int] = {}
        self.fd_set: dict[int, int] = {}
        self.log: list[tuple[str, int, int]] = []

    def attach(self, fd: int, pt_id: int, pasid: int) -> None:
        self.table[(fd, pasid)] = self.fd_set[fd]
        self.log.append(("attach", fd, pasid))

    def detach(self, fd: int, pasid: int) -> None:
        self.table.pop((fd, pasid), None)
        self.log.append(("detach", fd, pasid))


def make_backend(tmp_path: Path, kernel: KernelModel, ecap: str = ECAP_20_BITS) -> IommufdBackend:
    (tmp_path / "iommu").write_text("")
    unit = tmp_path / "sys" / "dmar0" / "intel-iommu"
    unit.mkdir(parents=True)
    (unit / "ecap").write_text(ecap + "\n")
    return IommufdBackend(
        dev_iommu=str(tmp_path / "iommu"),
        sysfs_iommu=str(tmp_path / "sys"),
        attach=kernel.attach,
        detach=kernel.detach,
    )


def real_fd() -> int:
    """A real fd of this process for a delegated device's handle: the backend closes a
    handle's fds when it lets go, so a made-up number could close one of the test
    process's own (SQLite's, pytest's). Never closed here: the backend owns it."""
    return os.open(os.devnull, os.O_RDONLY)


def delegate(
    be: IommufdBackend, kernel: KernelModel, sess: Session, bits: int = 20, path: str = ""
) -> int:
    """What adopt_device() leaves behind once the kernel has checked the device; returns
    the device fd (the iommufd is -1, which no close touches). The device is a stand-in
    file (`path`, else a new one, unlinked at once: for a broker in this process only,
    as its inode may be reused once the fd closes) whose key (device_key) no other
    process has open unless a test opens `path` in one."""
    if path:
        fd = os.open(path, os.O_RDONLY)
    else:
        fd, tmp = tempfile.mkstemp(prefix="pasid-dev-")
        os.unlink(tmp)
    h = DeviceHandle(
        "dev", sess.session_id, -1, fd, 1, 2, bits, "intel-vtd", 0, "/sys/x",
        key=device_key(fd),
    )  # fmt: skip
    be._devices.setdefault(sess.session_id, {})["dev"] = h
    kernel.fd_set[fd] = sess.session_id
    return fd


def check_invariant(broker: Broker, kernel: KernelModel) -> None:
    """Every attachment in the kernel belongs to a live set that holds that PASID."""
    held = {s.session_id: set(s.set.pasids) for s in broker.sessions()}
    for (_fd, pasid), set_id in kernel.table.items():
        assert pasid in held.get(set_id, set()), (pasid, set_id, held)


async def opened(broker: Broker, client: str, **kw: object) -> Session:
    """A new session whose set is durable (open_session is synchronous, the commit not)."""
    sess, _, _, created = broker.open_session(client, **kw)  # type: ignore[arg-type]
    await created
    return sess


def run(  # type: ignore[no-untyped-def]
    tmp_path: Path, scenario, kernel: KernelModel | None = None, **kw
) -> None:
    """`scenario(broker, backend, kernel)` on a started Broker, stopped after."""
    model = kernel or KernelModel()

    async def main() -> None:
        be = make_backend(tmp_path, model)
        broker = Broker(be, SqliteStore(tmp_path / "b.db"), devices=be, **kw)
        await broker.start()
        try:
            await scenario(broker, be, model)
        finally:
            await broker.stop()

    asyncio.run(main())


@contextlib.contextmanager
def live_holder() -> Iterator[subprocess.Popen[bytes]]:
    """A process that holds sets until the test kills it; killed and reaped after."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield holder
    finally:
        holder.kill()
        holder.wait()


def identity_of(pid: int) -> PeerIdentity:
    """What the peer socket learns of process `pid` from the kernel (a pidfd of it)."""
    return PeerIdentity(
        pid, os.getuid(), os.getgid(), pid, credentials.start_time(pid), os.pidfd_open(pid)
    )


async def settle(done: Callable[[], object], seconds: float) -> None:
    """Until `done()` is true, polled every 50 ms for at most `seconds` (a retry runs every
    stuck.RETRY_SECONDS); the caller then asserts what it expects."""
    for _ in range(round(seconds / 0.05)):
        if done():
            return
        await asyncio.sleep(0.05)


def test_open_reads_the_width_from_vtd_ecap(tmp_path: Path) -> None:
    be = make_backend(tmp_path, KernelModel())
    caps = be.open()
    assert (caps.pasid_bits, be.iommu_widths) == (20, {"dmar0": 20})
    assert "ecap" in caps.pasid_bits_source


def test_a_kernel_without_iommufd_is_one_clear_line(tmp_path: Path) -> None:
    be = IommufdBackend(dev_iommu=str(tmp_path / "none"))
    with pytest.raises(Unsupported) as e:
        be.open()
    assert "no " in e.value.message and "CONFIG_IOMMUFD" in e.value.message
    assert "\n" not in e.value.message


def test_an_iommu_without_pasids_is_refused(tmp_path: Path) -> None:
    be = make_backend(tmp_path, KernelModel(), ecap="0x0")
    with pytest.raises(Unsupported, match="no PASID support"):
        be.open()


def test_alloc_attaches_free_detaches_before_reuse(tmp_path: Path) -> None:
    async def scenario(broker: Broker, be: IommufdBackend, kernel: KernelModel) -> None:
        a = await opened(broker, "vm-a")
        b = await opened(broker, "vm-b")
        fa, fb = delegate(be, kernel, a), delegate(be, kernel, b)
        assert await broker.alloc(a, 1, 100, 1, "dev") == [1]
        assert kernel.table == {(fa, 1): a.session_id}
        assert await broker.free(a, 1, 1) == 1
        assert kernel.table == {}
        assert await broker.alloc(b, 1, 100, 1, "dev") == [1]  # the same number, now B's
        assert kernel.table == {(fb, 1): b.session_id}
        # The detach for A came before the attach for B.
        assert kernel.log.index(("detach", fa, 1)) < kernel.log.index(("attach", fb, 1))
        check_invariant(broker, kernel)

    run(tmp_path, scenario)


def test_revoke_and_session_end_detach(tmp_path: Path) -> None:
    async def scenario(broker: Broker, be: IommufdBackend, kernel: KernelModel) -> None:
        a = await opened(broker, "vm-a")
        b = await opened(broker, "vm-b")
        fa, fb = delegate(be, kernel, a), delegate(be, kernel, b)
        assert await broker.alloc(a, 1, 100, 3, "dev") == [1, 2, 3]
        assert await broker.alloc(b, 1, 100, 1, "dev") == [4]
        assert await broker.revoke(a.session_id, "test") == 3
        assert sorted(kernel.table) == [(fb, 4)]
        assert be.devices(a.session_id) == []  # its fds are closed with it
        with pytest.raises(OSError):
            os.fstat(fa)
        broker.end_session(b, "test")
        await broker.journal.drain()
        assert kernel.table == {}

    run(tmp_path, scenario)


def test_quarantine_still_detaches_at_free(tmp_path: Path) -> None:
    """Quarantine keeps the number from others; the device must lose it at once."""

    async def scenario(broker: Broker, be: IommufdBackend, kernel: KernelModel) -> None:
        a = await opened(broker, "vm-a")
        fa = delegate(be, kernel, a)
        assert await broker.alloc(a, 1, 100, 2, "dev") == [1, 2]
        assert await broker.free(a, 1, 1) == 1
        assert broker.info().quarantined == 1
        assert kernel.table == {(fa, 2): a.session_id}

    run(tmp_path, scenario, quarantine=Quarantine(allocs=5))


def test_beyond_the_device_width_is_refused_before_any_ioctl(tmp_path: Path) -> None:
    async def scenario(broker: Broker, be: IommufdBackend, kernel: KernelModel) -> None:
        a = await opened(broker, "vm-a")
        delegate(be, kernel, a, bits=4)
        with pytest.raises(InvalidRange, match="beyond device dev's PASID width"):
            await broker.alloc(a, 16, 100, 1, "dev")
        assert kernel.log == [] and broker.info().in_use == 0
        # A range reaching past the width is clipped to it.
        assert await broker.alloc(a, 14, 100, 2, "dev") == [14, 15]
        with pytest.raises(Exhausted, match=r"free PASID in \[14, 15\]"):
            await broker.alloc(a, 14, 100, 1, "dev")
        with pytest.raises(NotFound, match="no device 'other'"):
            await broker.alloc(a, 1, 10, 1, "other")
        assert broker.info().widths == (("iommu", "dmar0", 20, 0), ("device", "dev", 4, 1))

    run(tmp_path, scenario)


def test_a_failed_attach_gives_the_numbers_back(tmp_path: Path) -> None:
    async def scenario(broker: Broker, be: IommufdBackend, kernel: KernelModel) -> None:
        a = await opened(broker, "vm-a")
        delegate(be, kernel, a)
        real = kernel.attach

        def failing(fd: int, pt: int, pasid: int) -> None:
            if pasid == 2:
                from broker.backends.iommufd_uapi import error_for

                raise error_for("attach", 22, f"pasid {pasid} pt_id {pt}")
            real(fd, pt, pasid)

        be._attach = failing
        with pytest.raises(Exception, match="iommufd attach pasid 2 pt_id 2: EINVAL"):
            await broker.alloc(a, 1, 100, 3, "dev")
        assert kernel.table == {} and broker.info().in_use == 0 and be.held == set()

    run(tmp_path, scenario)


def test_random_mix_keeps_the_invariant(tmp_path: Path) -> None:
    async def scenario(broker: Broker, be: IommufdBackend, kernel: KernelModel) -> None:
        rng = random.Random(14)
        sessions: list[Session] = []
        for n in range(400):
            op = rng.random()
            if op < 0.15 or not sessions:
                s = await opened(broker, f"vm{n}")
                delegate(be, kernel, s)
                sessions.append(s)
            elif op < 0.6:
                s = rng.choice(sessions)
                with contextlib.suppress(Exhausted):  # the small range fills up: expected
                    await broker.alloc(s, 1, 31, rng.randint(1, 3), "dev")
            elif op < 0.85:
                s = rng.choice(sessions)
                lo = rng.randint(1, 31)
                await broker.free(s, lo, min(31, lo + rng.randint(0, 4)))
            elif op < 0.93:
                s = sessions.pop(rng.randrange(len(sessions)))
                await broker.revoke(s.session_id, "mix")
            else:
                s = sessions.pop(rng.randrange(len(sessions)))
                broker.end_session(s, "mix")
                await broker.journal.drain()
            check_invariant(broker, kernel)

    run(tmp_path, scenario)


def test_after_a_restart_a_live_holders_set_waits_for_its_exit(tmp_path: Path) -> None:
    """The restart rule: attachments made before it live on in the holder's device fd,
    which the new broker cannot detach; so the set's PASIDs stay out of the pool until the
    holder exits (not merely until the grace ends), and a re-delegation counts them as
    attached so that a later free detaches them."""

    async def main(holder: subprocess.Popen[bytes]) -> None:
        kernel = KernelModel()
        be = make_backend(tmp_path, kernel)
        book = TicketBook(30)
        broker = Broker(
            be, SqliteStore(tmp_path / "b.db"), devices=be, restart_grace=0, tickets=book
        )
        await broker.start()
        ident = identity_of(holder.pid)
        a = await opened(broker, "vm-a", grace_seconds=1, ticket=book.issue(ident), peer="unix:")
        delegate(be, kernel, a)
        assert await broker.alloc(a, 1, 100, 2, "dev") == [1, 2]
        await broker.stop()  # the kernel keeps (fd, 1), (fd, 2): the holder's fd lives

        kernel2 = KernelModel()
        (tmp_path / "k2").mkdir()
        be2 = make_backend(tmp_path / "k2", kernel2)
        broker2 = Broker(
            be2, SqliteStore(tmp_path / "b.db"), devices=be2, restart_grace=0, tickets=book
        )
        await broker2.start()
        try:
            await asyncio.sleep(1.5)  # beyond the set's grace
            (sess,) = broker2.sessions()
            assert list(sess.set.pasids) == [1, 2]  # not reclaimed: the holder lives
            # The holder resumes and re-delegates: what it holds counts as attached.
            fd = real_fd()
            kernel2.fd_set[fd] = sess.session_id
            h = DeviceHandle("dev", sess.session_id, -1, fd, 1, 2, 20, "intel-vtd", 0, "/x")
            be2._devices[sess.session_id] = {"dev": h}
            be2.assume_attached(h, sess.set.pasids)  # what adopt_device(held=...) does
            assert await broker2.free(sess, 1, 1) == 1
            assert ("detach", fd, 1) in kernel2.log
            holder.kill()
            holder.wait()
            await settle(lambda: not broker2.sessions(), 2.5)
            assert broker2.sessions() == []  # the holder's exit reclaims it
        finally:
            await broker2.stop()

    with live_holder() as holder:
        asyncio.run(main(holder))


def test_widths_from_ecap_and_config_space() -> None:
    from broker.backends.iommufd import pasid_bits_from_config, pasid_bits_from_ecap
    from tests.kernel.vfio_user_server import config_space

    assert pasid_bits_from_ecap(int(ECAP_20_BITS, 16)) == 20
    assert pasid_bits_from_ecap(0x490080F00F4A) == 1  # QEMU 7.2: PSS 0 (KERNEL-NOTES.md)
    assert pasid_bits_from_ecap(0) == 0  # ECAP.PASID clear
    assert pasid_bits_from_config(bytes(config_space(20))) == 20
    assert pasid_bits_from_config(bytes(config_space(0))) == 0
    assert pasid_bits_from_config(bytes(4096)) == 0


def test_delegated_fds_of_the_wrong_kind_are_refused(tmp_path: Path) -> None:
    from broker.core import InvalidArgument

    be = make_backend(tmp_path, KernelModel())
    be.open()
    with (tmp_path / "plain").open("wb") as f:
        with pytest.raises(InvalidArgument, match="not a VFIO device cdev"):
            be.check_fd("device", f.fileno())
        with pytest.raises(InvalidArgument, match=r"the iommufd fd is not /.*/iommu"):
            be.check_fd("iommufd", f.fileno())
        with pytest.raises(InvalidArgument, match="one 'device' fd per entry"):
            be.adopt_delegated(
                1, [("iommufd", f.fileno())], [{"name": "a", "dev_id": 1, "pt_id": 2}],
                holder_pid=None,
            )  # fmt: skip
        assert be.devices() == []


# -- a failed DETACH (issue 22, point 7) ------------------------------------------------
# Injected at the ioctl boundary: the kernel's DETACH does not fail on 7.2, and nothing on
# this host (no /dev/iommu, no VFIO cdev) can make a real one fail. What is tested is the
# engine's answer: a PASID the kernel may still use never returns to the pool.


class RefusingKernel(KernelModel):
    """DETACH fails with EIO for the PASIDs in `refuse`."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[int] = set()

    def detach(self, fd: int, pasid: int) -> None:
        if pasid in self.refuse:
            self.log.append(("detach-failed", fd, pasid))
            raise BackendError(errno.EIO, f"DETACH pasid {pasid}: EIO (injected)")
        super().detach(fd, pasid)


def device_user(path: Path) -> subprocess.Popen[bytes]:
    """A process that has the stand-in device `path` open (as a set's client has its
    device): while it runs, the device is open elsewhere."""
    with open(path, "rb") as f:
        return subprocess.Popen(["sleep", "60"], stdin=f)


def test_a_failed_detach_at_destroy_withholds_the_pasid_until_a_retry_succeeds(
    tmp_path: Path,
) -> None:
    dev = tmp_path / "dev-a"
    dev.write_bytes(b"")
    user = device_user(dev)  # an anonymous set's client: it has the device open

    async def scenario(broker: Broker, be: IommufdBackend, kernel: RefusingKernel) -> None:
        a = await opened(broker, "vm-a")
        b = await opened(broker, "vm-b")
        fa, fb = delegate(be, kernel, a, path=str(dev)), delegate(be, kernel, b)
        assert await broker.alloc(a, 1, 100, 2, "dev") == [1, 2]
        kernel.refuse = {1}
        broker.end_session(a, "test")
        await broker.journal.drain()
        assert kernel.table == {(fa, 1): a.session_id}  # the kernel kept it
        assert broker.info().quarantined == 1
        broker.allocator.check()
        # Never handed out while the kernel may still use it; the rest of the set is.
        assert await broker.alloc(b, 1, 100, 1, "dev") == [2]
        with pytest.raises(Exhausted):
            await broker.alloc(b, 1, 1, 1, "dev")
        with pytest.raises(Conflict):  # the backend refuses to attach it for another set
            be.attach(b.session_id, "dev", 1)
        await asyncio.sleep(stuck.RETRY_SECONDS * 2.5)
        assert kernel.log.count(("detach-failed", fa, 1)) >= 2  # retried
        assert broker.info().quarantined == 1
        kernel.refuse.clear()  # the device recovers: the next retry detaches it
        await settle(lambda: broker.info().quarantined == 0, 3)
        assert kernel.table == {(fb, 2): b.session_id}
        assert broker.info().quarantined == 0
        with pytest.raises(OSError):
            os.fstat(fa)  # nothing left attached on it: its fd is closed
        assert await broker.alloc(b, 1, 100, 1, "dev") == [1]
        broker.allocator.check()
        check_invariant(broker, kernel)

    try:
        run(tmp_path, scenario, kernel=RefusingKernel())
    finally:
        user.kill()
        user.wait()


@contextlib.asynccontextmanager
async def _a_refused_detach(
    tmp_path: Path, holder_pid: int, path: str = ""
) -> AsyncIterator[tuple[Broker, int]]:
    """A started broker whose set vm-a, held by `holder_pid` with a device delegated
    (`path`: see delegate), got PASID 1; the kernel then refuses its DETACH and the set
    is revoked, so 1 is withheld: (the broker, its fd of the device). Stopped on the way
    out, whatever the test asserted."""
    kernel = RefusingKernel()
    be = make_backend(tmp_path, kernel)
    book = TicketBook(30)
    broker = Broker(be, SqliteStore(tmp_path / "b.db"), devices=be, tickets=book)
    await broker.start()
    try:
        ident = identity_of(holder_pid)
        a = await opened(broker, "vm-a", ticket=book.issue(ident), peer="unix:")
        fa = delegate(be, kernel, a, path=path)
        assert await broker.alloc(a, 1, 100, 1, "dev") == [1]
        kernel.refuse = {1}
        assert await broker.revoke(a.session_id, "test") == 1
        yield broker, fa
    finally:
        await broker.stop()


def test_a_failed_detach_is_let_go_when_the_holder_exits(tmp_path: Path) -> None:
    """A DETACH that keeps failing: the holder's exit proves the PASID free once the broker
    closes its own copy of the device fd (the kernel detaches at the last close)."""

    async def main(holder: subprocess.Popen[bytes]) -> None:
        async with _a_refused_detach(tmp_path, holder.pid) as (broker, fa):
            await asyncio.sleep(stuck.RETRY_SECONDS * 2.5)
            assert broker.info().quarantined == 1  # the holder lives: still withheld
            os.fstat(fa)  # and the broker still holds the device open
            holder.kill()
            holder.wait()
            await settle(lambda: broker.info().quarantined == 0, 4)
            assert broker.info().quarantined == 0
            with pytest.raises(OSError):
                os.fstat(fa)
            b = await opened(broker, "vm-b")
            assert await broker.alloc(b, 1, 100, 1) == [1]
            broker.allocator.check()

    with live_holder() as holder:
        asyncio.run(main(holder))


# -- withheld across a restart (issue 22, point 7; the store keeps it) -------------------


def _withhold_then_stop(db: str, sysfs: str, holder_pid: int, how: str, dev: str = "") -> None:
    """A broker (in a child process: tests below) whose set's DETACH of PASID 1 fails at
    its revoke; once that is durable, it stops: `how` "sigterm" (the graceful stop
    SIGTERM runs) or "kill9" (SIGKILL to itself: no shutdown path runs)."""
    import signal

    async def main() -> None:
        kernel = RefusingKernel()
        be = make_backend(Path(sysfs), kernel)
        book = TicketBook(30)
        broker = Broker(be, SqliteStore(db), devices=be, tickets=book)
        await broker.start()
        ident = identity_of(holder_pid)
        a = await opened(broker, "vm-a", ticket=book.issue(ident), peer="unix:")
        delegate(be, kernel, a, path=dev)
        assert await broker.alloc(a, 1, 100, 2, "dev") == [1, 2]
        kernel.refuse = {1}
        assert await broker.revoke(a.session_id, "test") == 2
        await broker.journal.drain()  # the destroy and the withheld row are durable
        assert broker.info().quarantined == 1
        if how == "kill9":
            os.kill(os.getpid(), signal.SIGKILL)
        await broker.stop()

    asyncio.run(main())


def _withhold_in_a_child(
    db: Path, sysfs: Path, holder_pid: int, how: str, dev: Path
) -> subprocess.CompletedProcess[str]:
    """_withhold_then_stop in a child process: its "kill9" must not take the test down."""
    sysfs.mkdir()
    code = (
        "import sys; from tests.backends.test_iommufd_engine import _withhold_then_stop;"
        " _withhold_then_stop(*sys.argv[1:3], int(sys.argv[3]), *sys.argv[4:6])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(db), str(sysfs), str(holder_pid), how, str(dev)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("how", "holder_dies_while_down"),
    [("sigterm", False), ("kill9", False), ("kill9", True)],
)
def test_a_withheld_pasid_is_not_reissued_after_a_restart(
    tmp_path: Path, how: str, holder_dies_while_down: bool
) -> None:
    """The broker that withheld PASID 1 (a failed DETACH) stops, gracefully or by kill -9.
    The restarted broker has no fd to retry the DETACH on (the kernel closed the old
    process's), so 1 stays out of the pool for as long as the gone set's holder lives,
    and comes back within a retry of its exit (or at once if it died meanwhile)."""
    with live_holder() as holder:
        _withheld_across_a_restart(tmp_path, holder, how, holder_dies_while_down)


def _withheld_across_a_restart(
    tmp_path: Path, holder: subprocess.Popen[bytes], how: str, holder_dies_while_down: bool
) -> None:
    db = tmp_path / "b.db"
    # The stand-in device outlives the first broker: an unlinked one's inode could be
    # reused by another file meanwhile, which the look for its key would then find.
    dev = tmp_path / "vfio0"
    dev.write_bytes(b"")
    child = _withhold_in_a_child(db, tmp_path / "k1", holder.pid, how, dev)
    assert child.returncode == (-9 if how == "kill9" else 0), child.stderr
    if holder_dies_while_down:
        holder.kill()
        holder.wait()

    async def main() -> None:
        kernel = RefusingKernel()
        (tmp_path / "k2").mkdir()
        be = make_backend(tmp_path / "k2", kernel)
        broker = Broker(be, SqliteStore(db), devices=be)
        await broker.start()
        try:
            b = await opened(broker, "vm-b")
            if holder_dies_while_down:  # released at the first retry after the start
                await settle(lambda: broker.info().quarantined == 0, 10)
                assert broker.info().quarantined == 0
                assert await broker.alloc(b, 1, 100, 1) == [1]
                return
            assert broker.info().quarantined == 1
            assert await broker.alloc(b, 1, 100, 1) == [2]  # never 1
            with pytest.raises(Exhausted):
                await broker.alloc(b, 1, 1, 1)
            await asyncio.sleep(stuck.RETRY_SECONDS * 2.5)
            assert broker.info().quarantined == 1  # the holder lives: still withheld
            holder.kill()
            holder.wait()
            # Within a retry of its exit (10 s: a loaded machine).
            await settle(lambda: broker.info().quarantined == 0, 10)
            assert broker.info().quarantined == 0
            assert await broker.alloc(b, 1, 100, 1) == [1]
            broker.allocator.check()
        finally:
            await broker.stop()

    asyncio.run(main())
    # The release was stored too: a third start does not withhold 1 again.
    assert _quarantine_rows(db, "pasid, kind") == []


def _quarantine_rows(db: Path, columns: str) -> list[tuple[object, ...]]:
    """The stored quarantine's `columns`, in PASID order: what a restart finds withheld."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute(f"SELECT {columns} FROM quarantine ORDER BY pasid").fetchall()


# -- a contested PASID whose kernel calls fail: the claim outlives a restart ------------


class FreeFailingBackend(IommufdBackend):
    """Its free fails with EIO while `fail_free` is set. Injected: the iommufd backend's
    free is bookkeeping, and nothing on this host makes it fail; what is tested is the
    engine's store path after a late DETACH whose free then fails."""

    fail_free = False
    failed = 0

    def free(self, lo: int, hi: int) -> None:
        if self.fail_free:
            self.failed += 1
            raise BackendError(errno.EIO, f"free [{lo}, {hi}]: EIO (injected)")
        super().free(lo, hi)


def _free_failing(tmp_path: Path, kernel: KernelModel) -> FreeFailingBackend:
    be = make_backend(tmp_path, kernel)
    out = FreeFailingBackend(
        dev_iommu=be.dev_iommu, sysfs_iommu=be.sysfs_iommu, attach=kernel.attach,
        detach=kernel.detach,
    )  # fmt: skip
    return out


def test_a_contested_pasid_whose_late_free_fails_keeps_its_claim_across_a_restart(
    tmp_path: Path,
) -> None:
    """PASID 1 is contested (a witness's set claims it) when its set ends; its DETACH
    fails, then succeeds on a retry, and the backend's free that follows fails. Its row
    must keep the claim (kind "free", the claimant): after a restart the retried free
    succeeds, and 1 still stays out of the pool until the witness's set is gone."""
    db = tmp_path / "b.db"

    async def before() -> int:
        kernel = RefusingKernel()
        be = _free_failing(tmp_path, kernel)
        broker = Broker(be, SqliteStore(db), devices=be)
        await broker.start()
        try:
            a = await opened(broker, "vm-a")
            w = await opened(broker, "witness")
            delegate(be, kernel, a)
            assert await broker.alloc(a, 1, 100, 2, "dev") == [1, 2]
            await broker.witnesses.reconcile(w, [1])
            assert w.conflicts == [1]
            kernel.refuse = {1}
            broker.end_session(a, "test")
            await broker.journal.drain()
            assert broker.allocator.withheld == [1]
            be.fail_free = True
            kernel.refuse.clear()  # the retry detaches 1; the free then fails
            await settle(lambda: be.failed, 5)
            assert be.failed and kernel.table == {}
            assert broker.allocator.withheld == [1]
            return w.session_id
        finally:
            await broker.stop()  # the store holds its file while open: read after

    async def after(witness: int) -> None:
        (tmp_path / "k2").mkdir()
        be = make_backend(tmp_path / "k2", KernelModel())
        broker = Broker(be, SqliteStore(db), devices=be, restart_grace=60)
        await broker.start()
        try:
            assert broker.allocator.withheld == [1]
            await asyncio.sleep(stuck.RETRY_SECONDS * 2.5)  # the free is retried: it lands
            assert broker.allocator.withheld == [1]  # still claimed
            other = await opened(broker, "other")
            assert await broker.alloc(other, 1, 100, 2) == [2, 3]
            with pytest.raises(Exhausted):
                await broker.alloc(other, 1, 1, 1)
            await broker.revoke(witness, "test")
            await broker.journal.drain()
            assert broker.allocator.withheld == []
            assert await broker.alloc(other, 1, 100, 1) == [1]
            broker.allocator.check()
        finally:
            await broker.stop()

    witness = asyncio.run(before())
    # The wait and the claim.
    assert _quarantine_rows(db, "pasid, kind, claimant") == [(1, "free", witness)]
    asyncio.run(after(witness))
    assert _quarantine_rows(db, "pasid, kind, claimant") == []


# -- the proof, once no DETACH is left to retry: the device is open nowhere -------------

FORKING_HOLDER = """
import os, sys, time
f = open(sys.argv[1], "rb")  # the device, as a VMM has it open
pid = os.fork()  # a child inherits the fd: the device stays bound while it lives
if pid:
    print(pid, flush=True)
time.sleep(120)
"""


def forking_holder(dev: Path) -> tuple[subprocess.Popen[str], int]:
    """A holder with the stand-in device open, and its child that inherited the fd."""
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", FORKING_HOLDER, str(dev)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    return holder, int(holder.stdout.readline())


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


def test_the_holders_exit_is_no_proof_while_its_child_has_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The DETACH keeps failing; the set's holder exits, but a child that inherited its
    device fd keeps the device bound (and the PASID attached). The broker must not close
    its copies and release the PASID then: only once no process has the device open."""
    monkeypatch.setattr(stuck, "RESCAN_SECONDS", 0.3)
    dev = tmp_path / "vfio0"
    dev.write_bytes(b"")
    holder, child = forking_holder(dev)

    async def main() -> None:
        async with _a_refused_detach(tmp_path, holder.pid, str(dev)) as (broker, fa):
            holder.kill()
            holder.wait()
            await settle(lambda: f"device open in pid {child}" in caplog.text, 10)
            assert f"device open in pid {child}" in caplog.text
            await asyncio.sleep(stuck.RETRY_SECONDS * 2.5)
            assert broker.info().quarantined == 1  # the child has it: still withheld
            os.fstat(fa)  # and the broker keeps its copy, to retry the DETACH on
            b = await opened(broker, "vm-b")
            assert await broker.alloc(b, 1, 100, 1) == [2]
            _kill(child)
            await settle(lambda: broker.info().quarantined == 0, 10)
            assert broker.info().quarantined == 0
            with pytest.raises(OSError):
                os.fstat(fa)  # closed: the last fd of the device
            assert await broker.alloc(b, 1, 1, 1) == [1]
            broker.allocator.check()

    try:
        asyncio.run(main())
    finally:
        holder.kill()
        holder.wait()
        _kill(child)


def test_after_a_restart_a_detach_waits_until_the_device_is_open_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker that withheld PASID 1 (a failed DETACH) is killed (-9); its holder dies
    while it is down, but the holder's child keeps the device open. The restarted broker
    has no fd to retry the DETACH on: it knows the device from the stored row, and
    keeps 1 withheld until no process has the device open."""
    monkeypatch.setattr(stuck, "RESCAN_SECONDS", 0.3)
    dev = tmp_path / "vfio0"
    dev.write_bytes(b"")
    holder, child = forking_holder(dev)
    db = tmp_path / "b.db"
    try:
        ran = _withhold_in_a_child(db, tmp_path / "k1", holder.pid, "kill9", dev)
        assert ran.returncode == -9, ran.stderr
        holder.kill()
        holder.wait()
        rows = _quarantine_rows(db, "pasid, kind, devices")
        assert rows == [(1, "detach", device_key_of(dev))]

        async def main() -> None:
            (tmp_path / "k2").mkdir()
            be = make_backend(tmp_path / "k2", RefusingKernel())
            broker = Broker(be, SqliteStore(db), devices=be)
            await broker.start()
            try:
                assert broker.info().quarantined == 1
                await settle(lambda: f"device open in pid {child}" in caplog.text, 10)
                assert f"device open in pid {child}" in caplog.text
                await asyncio.sleep(stuck.RETRY_SECONDS * 2.5)
                assert broker.info().quarantined == 1  # the holder is gone, its child not
                b = await opened(broker, "vm-b")
                assert await broker.alloc(b, 1, 100, 1) == [2]
                _kill(child)
                await settle(lambda: broker.info().quarantined == 0, 10)
                assert broker.info().quarantined == 0
                assert await broker.alloc(b, 1, 1, 1) == [1]
                broker.allocator.check()
            finally:
                await broker.stop()

        asyncio.run(main())
        assert _quarantine_rows(db, "pasid, kind, devices") == []
    finally:
        holder.kill()
        holder.wait()
        _kill(child)


def device_key_of(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return device_key(fd)
    finally:
        os.close(fd)


def test_after_a_restart_the_detach_is_retried_on_the_device_delegated_again(
    tmp_path: Path,
) -> None:
    """The broker that withheld PASID 1 (a failed DETACH) is killed (-9); its holder lives
    on and delegates the same device again for a new set. That fd is the device's one
    bound file: the restarted broker retries the DETACH on it, and a success releases 1
    while the holder still runs (a refusal keeps it withheld)."""
    dev = tmp_path / "vfio0"
    dev.write_bytes(b"")
    holder, child = forking_holder(dev)
    db = tmp_path / "b.db"
    try:
        ran = _withhold_in_a_child(db, tmp_path / "k1", holder.pid, "kill9", dev)
        assert ran.returncode == -9, ran.stderr

        async def main() -> None:
            (tmp_path / "k2").mkdir()
            kernel = RefusingKernel()
            be = make_backend(tmp_path / "k2", kernel)
            book = TicketBook(30)
            broker = Broker(be, SqliteStore(db), devices=be, tickets=book)
            await broker.start()
            try:
                assert broker.info().quarantined == 1
                ident = identity_of(holder.pid)
                a2 = await opened(broker, "vm-a2", ticket=book.issue(ident), peer="unix:")
                kernel.refuse = {1}
                fd = delegate(be, kernel, a2, path=str(dev))  # the same device, again
                await settle(lambda: ("detach-failed", fd, 1) in kernel.log, 5)
                assert ("detach-failed", fd, 1) in kernel.log
                await asyncio.sleep(stuck.RETRY_SECONDS * 1.5)
                assert broker.info().quarantined == 1  # refused: still withheld
                kernel.refuse.clear()
                await settle(lambda: broker.info().quarantined == 0, 5)
                assert broker.info().quarantined == 0  # the holder still runs
                assert ("detach", fd, 1) in kernel.log
                assert await broker.alloc(a2, 1, 1, 1, "dev") == [1]
                broker.allocator.check()
                check_invariant(broker, kernel)
            finally:
                await broker.stop()

        asyncio.run(main())
        assert _quarantine_rows(db, "pasid, kind, devices") == []
    finally:
        holder.kill()
        holder.wait()
        _kill(child)


def test_the_look_for_a_device_counts_an_unreadable_process_as_holding_it(
    tmp_path: Path,
) -> None:
    """open_elsewhere over a made-up /proc: a process with the device among its fds holds
    it; one whose fds cannot be read proves nothing (it may hold it); one gone meanwhile
    does not count. (A made-up /proc: as root this test cannot be refused a real one.)"""
    from broker.backends.iommufd_checks import open_elsewhere

    dev = tmp_path / "vfio0"
    dev.write_bytes(b"")
    other = tmp_path / "other"
    other.write_bytes(b"")
    key = device_key_of(dev)
    proc = tmp_path / "proc"
    for pid, target in (("10", other), ("11", dev)):
        (proc / pid / "fd").mkdir(parents=True)
        (proc / pid / "fd" / "3").symlink_to(target)
    (proc / "12").mkdir()  # exited between listdir and its fd dir: no fd dir
    (proc / "self").mkdir()
    assert open_elsewhere([key], str(proc)) == "device open in pid 11"
    (proc / "11" / "fd" / "3").unlink()
    assert open_elsewhere([key], str(proc)) is None
    (proc / "13").mkdir()
    (proc / "13" / "fd").write_text("")  # listdir fails: its fds cannot be read
    why = open_elsewhere([key], str(proc))
    assert why is not None and why.startswith("cannot read the fds of pid 13 ("), why
    # A look that runs out of time proves nothing (it runs on a thread of its own, which
    # a look must not hold for good: stuck.LOOK_SECONDS).
    why = open_elsewhere([key], str(proc), give_up_after=-1)
    assert why is not None and why.startswith(f"the look through {proc} took over -1 s"), why


def test_a_device_a_live_set_delegated_is_no_proof_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DETACH keeps failing and the gone set's holder exits, but another (live) set
    has the same device delegated: the broker's own fd of it may be the same bound file,
    so the PASID stays withheld until that set lets go of the device too."""
    monkeypatch.setattr(stuck, "RESCAN_SECONDS", 0.3)

    async def main(holder: subprocess.Popen[bytes]) -> None:
        dev = tmp_path / "vfio0"
        dev.write_bytes(b"")
        kernel = RefusingKernel()
        be = make_backend(tmp_path, kernel)
        book = TicketBook(30)
        broker = Broker(be, SqliteStore(tmp_path / "b.db"), devices=be, tickets=book)
        await broker.start()
        try:
            ident = identity_of(holder.pid)
            a = await opened(broker, "vm-a", ticket=book.issue(ident), peer="unix:")
            delegate(be, kernel, a, path=str(dev))
            b = await opened(broker, "vm-b")
            delegate(be, kernel, b, path=str(dev))
            assert await broker.alloc(a, 1, 100, 1, "dev") == [1]
            kernel.refuse = {1}
            assert await broker.revoke(a.session_id, "test") == 1
            holder.kill()
            holder.wait()
            await asyncio.sleep(stuck.RETRY_SECONDS * 2.5)
            assert broker.info().quarantined == 1  # set b has the device
            await broker.revoke(b.session_id, "test")
            await settle(lambda: broker.info().quarantined == 0, 10)
            assert broker.info().quarantined == 0
        finally:
            await broker.stop()

    with live_holder() as holder:
        asyncio.run(main(holder))


FD_HOARDER = """
import os, resource, sys
n = min(int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 64)
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
fd = os.open(os.devnull, os.O_RDONLY)
for _ in range(n):
    os.dup(fd)
print(n, flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def fd_hoarders(n: int) -> Iterator[None]:
    """Processes with `n` open fds between them (each as many as its hard limit allows),
    as a host with many VMMs has: every look for a device in /proc stats each one."""
    procs: list[subprocess.Popen[str]] = []
    try:
        while n > 0 and len(procs) < 64:
            p = subprocess.Popen(
                [sys.executable, "-c", FD_HOARDER, str(n)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(p)
            assert p.stdout is not None
            held = p.stdout.readline().strip()
            if not held.isdigit():
                pytest.skip(f"a process cannot hold fds here (it said {held!r})")
            n -= int(held)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_look_through_proc_does_not_stall_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proof that a withheld PASID's device is open nowhere reads every process's fds
    in /proc (about 6 us each: 0.3 s on a host with 50k fds). It must run off the event
    loop, which meanwhile answers health, GetInfo and releases: here a ticker on the loop
    measures the longest the loop was away while the broker's look ran, against that
    look's own duration, timed as it ran (so that load stretches both alike; processes
    with 100k fds make it long). On the loop, the gap would be the whole look."""
    from broker.backends import iommufd
    from broker.backends.iommufd_checks import open_elsewhere

    timed: list[float] = []

    def timing(keys: Sequence[str], give_up_after: float | None = None) -> str | None:
        t0 = time.monotonic()
        try:
            return open_elsewhere(keys, give_up_after=give_up_after)
        finally:
            timed.append(time.monotonic() - t0)

    monkeypatch.setattr(iommufd, "open_elsewhere", timing)

    with fd_hoarders(100_000), live_holder() as holder:
        dev = tmp_path / "vfio0"
        dev.write_bytes(b"")
        key = device_key_of(dev)
        looks = []
        for _ in range(3):
            t0 = time.monotonic()
            assert open_elsewhere([key]) is None
            looks.append(time.monotonic() - t0)
        look = min(looks)
        if look < 0.05:
            pytest.skip(f"a look through /proc takes {look * 1000:.0f} ms here: no stall to see")

        async def main() -> float:
            async with _a_refused_detach(tmp_path, holder.pid, str(dev)) as (broker, _):
                assert broker.info().quarantined == 1
                holder.kill()
                holder.wait()
                # The next retry looks through /proc (the holder is gone), finds the
                # device open nowhere, and releases PASID 1; meanwhile the loop ticks.
                longest = 0.0
                deadline = time.monotonic() + 30
                while broker.info().quarantined and time.monotonic() < deadline:
                    t = time.monotonic()
                    await asyncio.sleep(0.002)
                    longest = max(longest, time.monotonic() - t)
                assert broker.info().quarantined == 0
                return longest

        longest = asyncio.run(main())
    assert timed, "the broker never looked through /proc"
    during = max(timed)
    print(
        f"look through /proc {look * 1000:.0f} ms alone, {during * 1000:.0f} ms in the broker;"
        f" the loop's longest gap {longest * 1e3:.1f} ms"
    )
    assert longest < during / 3, (longest, during)
