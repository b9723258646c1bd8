"""TEST ONLY: a fake of the *patched* kernel at the ioctl boundary of the VFIO backend.

No mainline kernel has VFIO_IOMMU_PASID_REQUEST (the v7 series was never merged), so the
backend's success path (alloc, free, replay, quota, ENOSPC) cannot meet a real kernel.
This models what the series' kernel would answer, from its patches 03, 04 and 07:

- /dev/vfio/vfio and /dev/vfio/N behave as mainline's do (API version, extensions,
  group status, SET_CONTAINER, SET_IOMMU, IOMMU_GET_INFO with argsz and a capability
  chain) plus the series' nesting capability on a TYPE1_NESTING container;
- VFIO_IOMMU_PASID_REQUEST: argsz/flags -> EINVAL; min > max or a bound >= 2^pasid_bits
  -> EINVAL (the review's `>=`); no nesting -> EOPNOTSUPP; ALLOC gives the lowest free
  PASID of the range in the caller's per-process set (one vfio_mm per mm); ENOSPC when
  the range is full AND at the pasid_quota (the series' vfio_pasid_alloc() turns any
  ioasid_alloc() failure, quota included, into -ENOSPC); FREE frees what the set owns in the range;
- the set is destroyed when the process's last container closes (the series frees a
  process's PASIDs at exit).

The backend name `vfio-fake`, registered by the test launcher (tests/faults/launch.py),
runs the daemon on it, so the e2e suite exercises the real VfioBackend code against it.
It never touches a device and is not for production.
"""

from __future__ import annotations

import ctypes
import errno
import os

from sortedcontainers import SortedList

from broker.backends import vfio_uapi as uapi
from broker.core.namespace import Namespace

_FIRST_FD = 1000


def _fail(err: int) -> OSError:
    return OSError(err, os.strerror(err))


class _IoasidSet(Namespace):
    """One process's PASIDs; `owned` makes FREE cost what the set holds."""

    def __init__(self, pasid_bits: int) -> None:
        super().__init__(pasid_bits)
        self.owned: SortedList = SortedList()

    def take(self, pasid: int) -> None:
        super().take(pasid)
        self.owned.add(pasid)

    def release(self, pasid: int) -> None:
        super().release(pasid)
        self.owned.remove(pasid)


class _Container:
    def __init__(self) -> None:
        self.groups: list[str] = []
        self.iommu_type = 0


class _Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.container: _Container | None = None


class FakePatchedKernel:
    """Implements broker.backends.vfio.Kernel as a kernel with the v7 series would."""

    def __init__(
        self,
        pasid_bits: int = 20,
        quota: int = uapi.VFIO_DEFAULT_PASID_QUOTA,
        groups: tuple[str, ...] = ("0",),
        syswide_pasid: bool = True,
        nesting_cap: bool = True,
        ecap: int | None = None,
        patched: bool = True,
    ) -> None:
        self.pasid_bits = pasid_bits
        self.quota = quota
        self.group_names = groups
        self.syswide_pasid = syswide_pasid
        self.nesting_cap = nesting_cap
        self.ecap = ecap
        # patched=False answers as mainline does (seen under QEMU): no nesting container,
        # no nesting capability, ENOTTY for the PASID request. For refusal tests.
        self.patched = patched
        self._fds: dict[int, _Container | _Group] = {}
        self._next_fd = _FIRST_FD
        # One ioasid_set per process (the series' vfio_mm), keyed by pid.
        self.sets: dict[int, _IoasidSet] = {}
        self._users: dict[int, int] = {}
        # Fault injection: the next PASID requests fail with these errnos, in order.
        self.fail_next: list[int] = []
        self.calls: list[tuple[int, int, int, int]] = []

    # -- files ---------------------------------------------------------------------------

    def open(self, path: str) -> int:
        head, _, tail = path.rpartition("/")
        if head != "/dev/vfio":
            raise _fail(errno.ENOENT)
        obj: _Container | _Group
        if tail == "vfio":
            obj = _Container()
        elif tail in self.group_names:
            if any(isinstance(o, _Group) and o.name == tail for o in self._fds.values()):
                raise _fail(errno.EBUSY)
            obj = _Group(tail)
        else:
            raise _fail(errno.ENOENT)
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = obj
        return fd

    def close(self, fd: int) -> None:
        obj = self._fds.pop(fd, None)
        if obj is None:
            raise _fail(errno.EBADF)
        if isinstance(obj, _Container) and obj.iommu_type == uapi.VFIO_TYPE1_NESTING_IOMMU:
            pid = os.getpid()
            self._users[pid] -= 1
            if self._users[pid] == 0:
                del self.sets[pid]  # the set is destroyed with its last user

    def read_text(self, path: str) -> str:
        if self.patched and path == "/sys/module/vfio_pasid/parameters/pasid_quota":
            return f"{self.quota}\n"
        if self.ecap is not None and path == "/sys/class/iommu/dmar0/intel-iommu/ecap":
            return f"{self.ecap:x}\n"
        raise _fail(errno.ENOENT)

    def glob(self, pattern: str) -> list[str]:
        if pattern == "/dev/vfio/*":
            return ["/dev/vfio/vfio", *(f"/dev/vfio/{g}" for g in self.group_names)]
        if pattern == "/sys/class/iommu/*/intel-iommu/ecap" and self.ecap is not None:
            return ["/sys/class/iommu/dmar0/intel-iommu/ecap"]
        return []

    # -- ioctls --------------------------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        obj = self._fds.get(fd)
        if obj is None:
            raise _fail(errno.EBADF)
        if isinstance(obj, _Group):
            return self._group_ioctl(obj, request, arg)
        return self._container_ioctl(obj, request, arg)

    def _group_ioctl(self, g: _Group, request: int, arg: int | bytearray) -> int:
        if request == uapi.VFIO_GROUP_GET_STATUS:
            assert isinstance(arg, bytearray)
            st = uapi.vfio_group_status.from_buffer(arg)
            if st.argsz < ctypes.sizeof(uapi.vfio_group_status):
                raise _fail(errno.EINVAL)
            st.flags = uapi.VFIO_GROUP_FLAGS_VIABLE | (
                uapi.VFIO_GROUP_FLAGS_CONTAINER_SET if g.container else 0
            )
            return 0
        if request == uapi.VFIO_GROUP_SET_CONTAINER:
            assert isinstance(arg, bytearray)
            c = self._fds.get(ctypes.c_int32.from_buffer(arg).value)
            if not isinstance(c, _Container):
                raise _fail(errno.EBADF)
            if g.container is not None:
                raise _fail(errno.EINVAL)
            g.container = c
            c.groups.append(g.name)
            return 0
        raise _fail(errno.ENOTTY)

    def _container_ioctl(self, c: _Container, request: int, arg: int | bytearray) -> int:
        if request == uapi.VFIO_GET_API_VERSION:
            return uapi.VFIO_API_VERSION
        if request == uapi.VFIO_CHECK_EXTENSION:
            return int(arg in (uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_NESTING_IOMMU))
        if request == uapi.VFIO_SET_IOMMU:
            if not c.groups or c.iommu_type:
                raise _fail(errno.EINVAL)
            if arg not in (uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_NESTING_IOMMU):
                raise _fail(errno.EINVAL)
            if arg == uapi.VFIO_TYPE1_NESTING_IOMMU and not self.patched:
                raise _fail(errno.EINVAL)  # 6.1's VT-d cannot enable nesting
            c.iommu_type = int(arg)
            if c.iommu_type == uapi.VFIO_TYPE1_NESTING_IOMMU:
                pid = os.getpid()
                self._users[pid] = self._users.get(pid, 0) + 1
                self.sets.setdefault(pid, _IoasidSet(self.pasid_bits))
            return 0
        if not c.iommu_type:
            raise _fail(errno.EINVAL)
        if request == uapi.VFIO_IOMMU_GET_INFO:
            assert isinstance(arg, bytearray)
            return self._get_info(c, arg)
        if request == uapi.VFIO_IOMMU_PASID_REQUEST and self.patched:
            assert isinstance(arg, bytearray)
            return self._pasid_request(c, arg)
        raise _fail(errno.ENOTTY)

    def _get_info(self, c: _Container, arg: bytearray) -> int:
        info_size = ctypes.sizeof(uapi.vfio_iommu_type1_info)
        caps = bytearray()
        # An IOVA range capability (one range), as mainline reports, then the series' own.
        iova = bytearray(32)
        uapi.vfio_info_cap_header.from_buffer(iova).id = uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
        uapi.vfio_info_cap_header.from_buffer(iova).version = 1
        caps += iova
        if c.iommu_type == uapi.VFIO_TYPE1_NESTING_IOMMU and self.nesting_cap:
            vtd_size = ctypes.sizeof(uapi.iommu_nesting_info_vtd)
            nest = bytearray(uapi.NESTING_CAP_MIN_SIZE + vtd_size)
            cap = uapi.vfio_iommu_type1_info_cap_nesting.from_buffer(nest)
            cap.header.id = uapi.VFIO_IOMMU_TYPE1_INFO_CAP_NESTING
            cap.header.version = 1
            cap.info.argsz = ctypes.sizeof(uapi.iommu_nesting_info) + vtd_size
            cap.info.format = 1  # IOMMU_PASID_FORMAT_INTEL_VTD
            cap.info.features = (
                uapi.IOMMU_NESTING_FEAT_SYSWIDE_PASID if self.syswide_pasid else 0
            ) | uapi.IOMMU_NESTING_FEAT_BIND_PGTBL
            cap.info.addr_width = 48
            cap.info.pasid_bits = self.pasid_bits
            del cap
            uapi.vfio_info_cap_header.from_buffer(iova).next = info_size + len(caps)
            caps = iova + nest
        full = info_size + len(caps)
        req = uapi.vfio_iommu_type1_info.from_buffer(arg)
        if req.argsz < info_size:
            raise _fail(errno.EINVAL)
        req.flags = uapi.VFIO_IOMMU_INFO_PGSIZES | uapi.VFIO_IOMMU_INFO_CAPS
        req.iova_pgsizes = 0x40201000
        if req.argsz < full:
            req.cap_offset = 0  # no room: say how much is needed
        else:
            req.cap_offset = info_size
            arg[info_size:full] = caps
        req.argsz = full
        return 0

    def _pasid_request(self, c: _Container, arg: bytearray) -> int:
        minsz = ctypes.sizeof(uapi.vfio_iommu_type1_pasid_request)
        if len(arg) < minsz:
            raise _fail(errno.EFAULT)
        req = uapi.vfio_iommu_type1_pasid_request.from_buffer_copy(arg)
        self.calls.append((req.argsz, req.flags, req.range.min, req.range.max))
        if req.argsz < minsz or req.flags & ~uapi.VFIO_PASID_REQUEST_MASK:
            raise _fail(errno.EINVAL)
        lo, hi, size = req.range.min, req.range.max, 1 << self.pasid_bits
        if lo > hi or lo >= size or hi >= size:
            raise _fail(errno.EINVAL)
        if c.iommu_type != uapi.VFIO_TYPE1_NESTING_IOMMU or not self.syswide_pasid:
            raise _fail(errno.EOPNOTSUPP)
        if self.fail_next:
            raise _fail(self.fail_next.pop(0))
        ns = self.sets[os.getpid()]
        flags = req.flags & uapi.VFIO_PASID_REQUEST_MASK
        if flags == uapi.VFIO_IOMMU_FLAG_ALLOC_PASID:
            if self.quota and ns.used >= self.quota:
                raise _fail(errno.ENOSPC)  # INVALID_IOASID from the set's quota
            p = ns.lowest_free(lo, hi)
            if p is None:
                raise _fail(errno.ENOSPC)
            ns.take(p)
            return p
        if flags == uapi.VFIO_IOMMU_FLAG_FREE_PASID:
            # What the set owns in the range, not the range's width (the review's v3 point).
            for q in list(ns.owned.irange(lo, hi)):
                ns.release(q)
            return 0
        raise _fail(errno.EINVAL)

    # -- for tests -----------------------------------------------------------------------

    def held(self, pid: int | None = None) -> int:
        ns = self.sets.get(os.getpid() if pid is None else pid)
        return ns.used if ns else 0
