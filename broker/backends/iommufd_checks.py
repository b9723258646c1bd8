"""What the kernel says about a delegated device, for the iommufd backend: is an fd a VFIO
device cdev or /dev/iommu, does the holder have the device open, and the PASID widths
that VT-d's ECAP and the device's PCIe PASID capability report. Reads sysfs, /proc and
kcmp; changes nothing."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from collections.abc import Iterable

from broker.core.errors import InvalidArgument

SYS_DEV_CHAR = "/sys/dev/char"
PCI_EXT_CAP_ID_PASID = 0x1B
_SYS_KCMP = 312  # x86_64
_KCMP_FILE = 0


def pasid_bits_from_ecap(ecap: int) -> int:
    """VT-d ECAP.PSS (bits 39:35) is the PASID width minus one; ECAP.PASID (bit 40) says
    whether PASIDs are supported at all."""
    if not (ecap >> 40) & 1:
        return 0
    return ((ecap >> 35) & 0x1F) + 1


def pasid_bits_from_config(config: bytes) -> int:
    """A PCIe function's PASID width from its config space (ext cap 0x1b; 0: none)."""
    off = 0x100
    seen = 0
    while 0x100 <= off <= len(config) - 8 and seen < 64:
        header = int.from_bytes(config[off : off + 4], "little")
        if header in (0, 0xFFFFFFFF):
            return 0
        if header & 0xFFFF == PCI_EXT_CAP_ID_PASID:
            cap = int.from_bytes(config[off + 4 : off + 6], "little")
            return (cap >> 8) & 0x1F
        off = header >> 20
        seen += 1
    return 0


def vfio_device_path(fd: int) -> str:
    """The sysfs path of the device behind a VFIO device cdev fd; refused if it is not one."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise InvalidArgument(f"iommufd adopt: device fd: {exc.strerror}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise InvalidArgument("iommufd adopt: the device fd is not a VFIO device cdev")
    node = f"{SYS_DEV_CHAR}/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    cls = os.path.realpath(os.path.join(node, "subsystem"))
    if os.path.basename(cls) != "vfio-dev":
        raise InvalidArgument(
            "iommufd adopt: the device fd is not a VFIO device cdev"
            " (/dev/vfio/devices/vfioN; needs CONFIG_VFIO_DEVICE_CDEV)"
        )
    return os.path.realpath(os.path.join(node, "device"))


def check_iommufd(fd: int, dev_iommu: str) -> None:
    """Refused unless `fd` is an open /dev/iommu (the same character device)."""
    try:
        st = os.fstat(fd)
        ref = os.stat(dev_iommu)
    except OSError as exc:
        raise InvalidArgument(f"iommufd adopt: iommufd: {exc.strerror}") from None
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != ref.st_rdev:
        raise InvalidArgument(f"iommufd adopt: the iommufd fd is not {dev_iommu}")


def config_pasid_bits(syspath: str) -> int | None:
    """The device's PASID width from its config space; None if it cannot be read."""
    try:
        with open(os.path.join(syspath, "config"), "rb") as f:
            return pasid_bits_from_config(f.read(4096))
    except OSError:
        return None


def holder_has(pid: int, fd: int) -> bool:
    """Does process `pid` have our `fd`'s device open? The same open file by kcmp
    (KCMP_FILE) where the kernel has kcmp (CONFIG_KCMP); else the same character
    device among its fds (a cdev can be bound through one open file only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        theirs = os.listdir(f"/proc/{pid}/fd")
        mine = os.fstat(fd).st_rdev
    except OSError:
        return False
    me = os.getpid()
    kcmp = True
    for entry in theirs:
        if kcmp:
            r = libc.syscall(_SYS_KCMP, me, pid, _KCMP_FILE, fd, int(entry))
            if r == 0:
                return True
            if r < 0 and ctypes.get_errno() == errno.ENOSYS:
                kcmp = False
        if not kcmp:
            try:
                st = os.stat(f"/proc/{pid}/fd/{entry}")
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == mine:
                return True
    return False


def _key(st: os.stat_result) -> str:
    if stat.S_ISCHR(st.st_mode):
        return f"c:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"f:{st.st_dev}:{st.st_ino}"


def device_key(fd: int) -> str:
    """What names a delegated device across a restart (stored with a PASID whose DETACH
    failed): "c:MAJOR:MINOR" for a character device (a VFIO cdev, whatever node it was
    opened by), "f:DEV:INODE" for anything else (a test's stand-in)."""
    return _key(os.fstat(fd))


def open_elsewhere(
    keys: Iterable[str], proc: str = "/proc", give_up_after: float | None = None
) -> str | None:
    """None if no process but this one has any of these devices open, else why not (the
    pids). A VFIO cdev is bound to an iommufd through one open file at a time, and the
    kernel detaches its PASIDs when that file's last fd closes: open nowhere, nothing is
    attached through it any more. Open somewhere (a VMM, a child that inherited its fd,
    one it was passed to, or a new user of the device), it may be. Reads /proc: the
    processes of this pid namespace, whose fds this process may read; one it may not
    read counts as holding it. An fd in flight (SCM_RIGHTS not yet received) is not seen.
    Stops at the first process found with it: only a look that finds nothing must read
    them all (about 6 us per fd on the test VM: 0.3 s on a host with 50k fds, which is
    why the broker looks on a thread, never on its event loop). A look still going after
    `give_up_after` seconds stops and proves nothing."""
    want = set(keys)
    me = str(os.getpid())
    unreadable: list[str] = []
    until = None if give_up_after is None else time.monotonic() + give_up_after
    for pid in os.listdir(proc):
        if not pid.isdigit() or pid == me:
            continue
        if until is not None and time.monotonic() > until:
            return f"the look through {proc} took over {give_up_after:g} s (stopped at pid {pid})"
        try:
            entries = os.listdir(f"{proc}/{pid}/fd")
        except FileNotFoundError:
            continue  # exited meanwhile
        except OSError:
            unreadable.append(pid)
            continue
        for entry in entries:
            try:
                st = os.stat(f"{proc}/{pid}/fd/{entry}")
            except OSError:
                continue  # closed meanwhile, or not a file to stat (an anon inode's fd)
            if _key(st) in want:
                return f"device open in pid {pid}"
    if unreadable:
        pids = ", ".join(sorted(unreadable, key=int)[:8])
        return f"cannot read the fds of pid {pids} (another user's: needs CAP_SYS_PTRACE)"
    return None
