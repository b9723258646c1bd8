"""The VFIO backend: the seed's VFIO_IOMMU_PASID_REQUEST on a VFIO container.

open() does what a VMM would: open /dev/vfio/vfio, check the API version and extensions,
attach the IOMMU group(s) (SET_CONTAINER), set the IOMMU type (the series serves PASID
requests only on VFIO_TYPE1_NESTING_IOMMU), walk VFIO_IOMMU_GET_INFO's capability chain,
then asks the kernel: a FREE of [0, 0] is harmless on a patched kernel and ENOTTY on any
mainline one. Every step's answer is kept in `probe` so that logs and tests can say what
the kernel answered.

All system calls go through a `Kernel` (open/ioctl/close/read/glob): `OsKernel` is the
real one; tests/faults/vfio_fake_kernel.py is a test-only model of the patched kernel.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from broker.backends import vfio_uapi as uapi
from broker.backends.base import Capabilities, errno_name, error_from_errno
from broker.core.errors import BackendError, Exhausted, QuotaExceeded, Unsupported

log = logging.getLogger("pasid_broker.vfio")

VFIO_DIR = "/dev/vfio"
SYSFS_IOMMU = "/sys/class/iommu"
PASID_QUOTA_PARAM = "/sys/module/vfio_pasid/parameters/pasid_quota"

NEEDS = (
    "the backend needs a kernel with the v7 series 'vfio: expose virtual Shared Virtual"
    " Addressing to VMs' (VFIO_IOMMU_PASID_REQUEST on a VFIO_TYPE1_NESTING_IOMMU container;"
    " never merged into mainline), an Intel VT-d IOMMU in scalable mode"
    " (intel_iommu=on,sm_on), the vfio, vfio_iommu_type1 and vfio-pci modules, and a device"
    " bound to vfio-pci whose group is named by --vfio-group"
)
FALLBACK_HINT = "or start with --vfio-fallback simulator (or --backend simulator) on this host"


class Kernel(Protocol):
    """The system-call boundary. Errors are OSError with the kernel's errno."""

    def open(self, path: str) -> int: ...

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int: ...

    def close(self, fd: int) -> None: ...

    def read_text(self, path: str) -> str: ...

    def glob(self, pattern: str) -> list[str]: ...


class OsKernel:
    """The real kernel."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        if isinstance(arg, bytearray):
            # mutate_flag: the kernel writes into the buffer; the int is ioctl()'s return.
            return int(fcntl.ioctl(fd, request, arg, True))
        return int(fcntl.ioctl(fd, request, arg))

    def close(self, fd: int) -> None:
        os.close(fd)

    def read_text(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def glob(self, pattern: str) -> list[str]:
        return sorted(glob.glob(pattern))


_ename = errno_name


def _oserr(exc: OSError) -> str:
    return f"{_ename(exc.errno)} ({exc.strerror or os.strerror(exc.errno or 0)})"


def pasid_bits_from_ecap(ecap: int) -> int:
    """VT-d extended capability register: PSS, bits 39:35, is the PASID width minus one."""
    return ((ecap >> 35) & 0x1F) + 1


class VfioBackend:
    """PASIDs from the kernel through one VFIO container that holds the broker's groups."""

    def __init__(
        self,
        groups: Sequence[str] = (),
        pasid_bits: int = 0,
        kernel: Kernel | None = None,
        name: str = "vfio",
        vfio_dir: str = VFIO_DIR,
        sysfs_iommu: str = SYSFS_IOMMU,
    ) -> None:
        self.name = name
        self.groups = tuple(groups)
        self.pasid_bits_override = pasid_bits
        self.kernel: Kernel = kernel or OsKernel()
        self.vfio_dir = vfio_dir
        self.sysfs_iommu = sysfs_iommu
        self.container_path = f"{vfio_dir}/vfio"
        self.kernel_quota = 0
        # PASIDs this container holds: the series answers ENOSPC at its pasid_quota too,
        # and this count is how a refusal is told to be the quota's.
        self.held = 0
        self.probe: dict[str, Any] = {}
        self._container = -1
        self._group_fds: list[int] = []

    # -- open: the start-up probe --------------------------------------------------------

    def open(self) -> Capabilities:
        self.probe = {}
        try:
            return self._open()
        except BaseException:
            self.close()
            raise

    def _ioctl(self, fd: int, request: int, arg: int | bytearray, what: str) -> int:
        try:
            return self.kernel.ioctl(fd, request, arg)
        except OSError as exc:
            self.probe[what] = _ename(exc.errno)
            raise error_from_errno(exc.errno or errno.EIO, f"vfio backend: {what}") from exc

    def _open(self) -> Capabilities:
        k = self.kernel
        try:
            self._container = k.open(self.container_path)
        except OSError as exc:
            self.probe["open"] = _ename(exc.errno)
            raise Unsupported(
                f"vfio backend: open({self.container_path}) failed: {_oserr(exc)}; {NEEDS};"
                f" {FALLBACK_HINT}"
            ) from exc
        c = self._container
        version = self._ioctl(c, uapi.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
        self.probe["api_version"] = version
        if version != uapi.VFIO_API_VERSION:
            raise Unsupported(
                f"vfio backend: VFIO_GET_API_VERSION is {version}, expected"
                f" {uapi.VFIO_API_VERSION}; {FALLBACK_HINT}"
            )
        v2 = self._ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU, "CHECK_EXTENSION")
        nesting = self._ioctl(
            c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1_NESTING_IOMMU, "CHECK_EXTENSION"
        )
        self.probe["check_extension"] = {"TYPE1v2": v2, "TYPE1_NESTING": nesting}
        if not v2:
            raise Unsupported(
                f"vfio backend: {self.container_path} does not offer VFIO_TYPE1v2_IOMMU"
                f" (CHECK_EXTENSION = 0): is vfio_iommu_type1 loaded? {NEEDS}; {FALLBACK_HINT}"
            )
        self._attach_groups()
        self._set_iommu(bool(nesting))
        nesting_bits = self._walk_info()
        self._probe_pasid_request()
        bits, source = self._pasid_bits(nesting_bits)
        self.kernel_quota = self._read_kernel_quota()
        detail = (
            f"container {self.container_path}, groups {','.join(self.groups)},"
            f" iommu {self.probe['set_iommu']}"
        )
        log.info(
            "vfio backend: the kernel serves VFIO_IOMMU_PASID_REQUEST; pasid_bits %d from %s",
            bits,
            source,
            extra={"probe": self.probe},
        )
        return Capabilities(self.name, bits, source, detail)

    def _attach_groups(self) -> None:
        if not self.groups:
            found = [
                os.path.basename(p)
                for p in self.kernel.glob(f"{self.vfio_dir}/*")
                if os.path.basename(p).isdigit()
            ]
            if not found:
                raise Unsupported(
                    f"vfio backend: no IOMMU group in {self.vfio_dir}: a container needs one"
                    " before VFIO_SET_IOMMU; bind a device to vfio-pci and name its group with"
                    f" --vfio-group; {FALLBACK_HINT}"
                )
            self.groups = tuple(found)
            log.info("vfio backend: no --vfio-group given; using %s", ",".join(found))
        statuses: dict[str, int] = {}
        self.probe["groups"] = statuses
        for g in self.groups:
            path = f"{self.vfio_dir}/{g}"
            try:
                fd = self.kernel.open(path)
            except OSError as exc:
                hint = " (another process holds it)" if exc.errno == errno.EBUSY else ""
                raise Unsupported(
                    f"vfio backend: open({path}) failed: {_oserr(exc)}{hint}; {NEEDS};"
                    f" {FALLBACK_HINT}"
                ) from exc
            self._group_fds.append(fd)
            status = uapi.vfio_group_status(ctypes.sizeof(uapi.vfio_group_status), 0)
            buf = bytearray(status)
            self._ioctl(fd, uapi.VFIO_GROUP_GET_STATUS, buf, f"VFIO_GROUP_GET_STATUS({path})")
            flags = uapi.vfio_group_status.from_buffer(buf).flags
            statuses[g] = flags
            if not flags & uapi.VFIO_GROUP_FLAGS_VIABLE:
                raise Unsupported(
                    f"vfio backend: IOMMU group {g} is not viable (flags {flags:#x}): every"
                    f" device in it must be bound to vfio-pci; {FALLBACK_HINT}"
                )
            arg = bytearray(ctypes.c_int32(self._container))
            self._ioctl(fd, uapi.VFIO_GROUP_SET_CONTAINER, arg, f"VFIO_GROUP_SET_CONTAINER({g})")

    def _set_iommu(self, nesting: bool) -> None:
        """The series serves PASIDs only on a nesting container; mainline may refuse one."""
        c = self._container
        if nesting:
            try:
                self.kernel.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1_NESTING_IOMMU)
                self.probe["set_iommu"] = "TYPE1_NESTING"
                return
            except OSError as exc:
                self.probe["set_iommu_nesting"] = _ename(exc.errno)
                log.info(
                    "vfio backend: SET_IOMMU(TYPE1_NESTING) failed: %s; trying TYPE1v2",
                    _oserr(exc),
                )
        self._ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, "VFIO_SET_IOMMU(TYPE1v2)")
        self.probe["set_iommu"] = "TYPE1v2"

    def _walk_info(self) -> int:
        """VFIO_IOMMU_GET_INFO with the argsz the kernel asks for; returns the nesting
        capability's pasid_bits, or 0 when there is none."""
        c = self._container
        size = ctypes.sizeof(uapi.vfio_iommu_type1_info)
        buf = bytearray(size)
        uapi.vfio_iommu_type1_info.from_buffer(buf).argsz = size
        self._ioctl(c, uapi.VFIO_IOMMU_GET_INFO, buf, "VFIO_IOMMU_GET_INFO")
        info = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
        self.probe["iommu_info"] = {"flags": info.flags, "argsz": info.argsz}
        if info.argsz > size:
            # Too small for the capability chain: the kernel said how much it needs.
            buf = bytearray(info.argsz)
            uapi.vfio_iommu_type1_info.from_buffer(buf).argsz = info.argsz
            self._ioctl(c, uapi.VFIO_IOMMU_GET_INFO, buf, "VFIO_IOMMU_GET_INFO")
            info = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
        caps: list[dict[str, int]] = []
        self.probe["iommu_info"]["caps"] = caps
        if not info.flags & uapi.VFIO_IOMMU_INFO_CAPS:
            return 0
        return self._walk_caps(buf, info.cap_offset, caps)

    def _walk_caps(self, buf: bytearray, offset: int, caps: list[dict[str, int]]) -> int:
        hdr_size = ctypes.sizeof(uapi.vfio_info_cap_header)
        end = len(buf)
        bits = 0
        seen: set[int] = set()
        while offset:
            if offset in seen or offset < hdr_size or offset + hdr_size > end:
                raise BackendError(
                    errno.EPROTO,
                    f"vfio backend: VFIO_IOMMU_GET_INFO capability chain is malformed at"
                    f" offset {offset} (argsz {end})",
                )
            seen.add(offset)
            hdr = uapi.vfio_info_cap_header.from_buffer_copy(buf, offset)
            cap_end = hdr.next if hdr.next > offset else end
            size = cap_end - offset
            caps.append({"id": hdr.id, "version": hdr.version, "size": size})
            if (
                hdr.id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_NESTING
                and size >= uapi.NESTING_CAP_MIN_SIZE
            ):
                cap = uapi.vfio_iommu_type1_info_cap_nesting.from_buffer_copy(buf, offset)
                if cap.info.argsz >= ctypes.sizeof(uapi.iommu_nesting_info):
                    caps[-1]["pasid_bits"] = cap.info.pasid_bits
                    caps[-1]["features"] = cap.info.features
                    bits = cap.info.pasid_bits
            offset = hdr.next
        return bits

    def _probe_pasid_request(self) -> None:
        """Ask the kernel itself. FREE of [0, 0]: the broker never holds PASID 0."""
        req = uapi.pasid_request(uapi.VFIO_IOMMU_FLAG_FREE_PASID, 0, 0)
        try:
            self.kernel.ioctl(self._container, uapi.VFIO_IOMMU_PASID_REQUEST, req)
        except OSError as exc:
            err = exc.errno or errno.EIO
            self.probe["pasid_request"] = _ename(err)
            why = {
                errno.ENOTTY: "this kernel does not have the ioctl",
                errno.EOPNOTSUPP: "the kernel has the ioctl but this container has no"
                " system-wide PASID support (IOMMU_NESTING_FEAT_SYSWIDE_PASID)",
            }.get(err, "unexpected answer")
            message = (
                f"vfio backend: VFIO_IOMMU_PASID_REQUEST (_IO(';', VFIO_BASE + 18) ="
                f" {uapi.VFIO_IOMMU_PASID_REQUEST:#x}) on {self.container_path} failed:"
                f" {_oserr(exc)}: {why}; {NEEDS}; {FALLBACK_HINT}"
            )
            if err in (errno.ENOTTY, errno.EOPNOTSUPP):
                refusal = Unsupported(message)
                refusal.errno = err
                raise refusal from exc
            raise BackendError(err, message) from exc
        self.probe["pasid_request"] = "ok"

    def _pasid_bits(self, nesting_bits: int) -> tuple[int, str]:
        if nesting_bits:
            if self.pasid_bits_override and self.pasid_bits_override != nesting_bits:
                log.warning(
                    "vfio backend: --vfio-pasid-bits %d ignored: the kernel's nesting"
                    " capability says %d",
                    self.pasid_bits_override,
                    nesting_bits,
                )
            return nesting_bits, "nesting capability (VFIO_IOMMU_GET_INFO)"
        if self.pasid_bits_override:
            return self.pasid_bits_override, "config (--vfio-pasid-bits)"
        widths: list[tuple[int, str]] = []
        for path in self.kernel.glob(f"{self.sysfs_iommu}/*/intel-iommu/ecap"):
            try:
                widths.append((pasid_bits_from_ecap(int(self.kernel.read_text(path), 16)), path))
            except (OSError, ValueError) as exc:
                log.warning("vfio backend: cannot read %s: %s", path, exc)
        self.probe["sysfs_ecap"] = {p: b for b, p in widths}
        if widths:
            # Every unit must serve every PASID: the narrowest one bounds the namespace.
            bits, path = min(widths)
            return bits, f"sysfs ecap PSS+1 ({path})"
        raise Unsupported(
            "vfio backend: cannot tell pasid_bits: no nesting capability in"
            f" VFIO_IOMMU_GET_INFO and no {self.sysfs_iommu}/*/intel-iommu/ecap;"
            " set --vfio-pasid-bits"
        )

    def _read_kernel_quota(self) -> int:
        try:
            return int(self.kernel.read_text(PASID_QUOTA_PARAM))
        except (OSError, ValueError):
            return 0

    # -- requests ------------------------------------------------------------------------

    def _request(self, flags: int, lo: int, hi: int, what: str) -> int:
        if self._container < 0:
            raise BackendError(errno.EBADF, "vfio backend is not open")
        req = uapi.pasid_request(flags, lo, hi)
        try:
            return self.kernel.ioctl(self._container, uapi.VFIO_IOMMU_PASID_REQUEST, req)
        except OSError as exc:
            raise error_from_errno(
                exc.errno or errno.EIO,
                f"vfio backend: VFIO_IOMMU_PASID_REQUEST {what} [{lo}, {hi}]",
                self.kernel_quota,
            ) from exc

    def alloc(self, lo: int, hi: int) -> int:
        try:
            pasid = self._request(uapi.VFIO_IOMMU_FLAG_ALLOC_PASID, lo, hi, "ALLOC")
        except Exhausted as exc:
            if self.kernel_quota and self.held >= self.kernel_quota:
                raise QuotaExceeded(
                    "kernel",
                    self.kernel_quota,
                    f"{exc.message}: the broker holds {self.held}, vfio_pasid's pasid_quota"
                    f" is {self.kernel_quota} (the kernel counts the broker as one process;"
                    " raise vfio_pasid.pasid_quota)",
                ) from exc
            raise
        self.held += 1
        return pasid

    def free(self, lo: int, hi: int) -> None:
        self._request(uapi.VFIO_IOMMU_FLAG_FREE_PASID, lo, hi, "FREE")
        # The broker frees only runs it holds whole (engine._backend_free).
        self.held = max(0, self.held - (hi - lo + 1))

    def replay(self, pasids: Iterable[int]) -> int:
        """After a restart the kernel's set died with the old process: allocate each again."""
        n = 0
        for p in pasids:
            got = self.alloc(p, p)
            if got != p:
                raise BackendError(
                    errno.EEXIST, f"vfio backend: replay of PASID {p} got {got} from the kernel"
                )
            n += 1
        return n

    def close(self) -> None:
        """Closing the container ends the kernel's set (its PASIDs are freed)."""
        for fd in self._group_fds:
            try:
                self.kernel.close(fd)
            except OSError as exc:
                log.warning("vfio backend: close(group fd) failed: %s", exc)
        self._group_fds.clear()
        if self._container >= 0:
            try:
                self.kernel.close(self._container)
            except OSError as exc:
                log.warning("vfio backend: close(container) failed: %s", exc)
            self._container = -1
        self.held = 0
