"""iommufd's and VFIO cdev's user API as the iommufd backend needs it, and its errnos.

Written from include/uapi/linux/iommufd.h and vfio.h (Linux 7.2). Like VFIO, iommufd
encodes ioctls as plain _IO(';', nr) and reads a leading size/argsz instead, so a number
is (';' << 8) | nr. tests/backends/test_iommufd_uapi.py compiles a C program against
linux-libc-dev of the kernel the real-kernel tier boots and checks every value here.

`call()` is the one place an ioctl's errno becomes a core PasidError, with a message that
names the step (bind, hw_info, attach, detach, ...) and what that errno means there, as a
7.2 kernel answered (../shared/reference/KERNEL-NOTES.md).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os

from broker.backends.base import errno_name
from broker.core.errors import (
    BackendError,
    Conflict,
    Exhausted,
    InvalidArgument,
    InvalidRange,
    NotFound,
    PasidError,
    Unsupported,
)

IOMMUFD_TYPE = ";"
VFIO_TYPE = ";"
VFIO_BASE = 100


def _IO(type_: str, nr: int) -> int:
    return (ord(type_) << 8) | nr


# -- <linux/iommufd.h> -----------------------------------------------------------------
IOMMUFD_CMD_BASE = 0x80
IOMMU_DESTROY = _IO(IOMMUFD_TYPE, 0x80)
IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, 0x81)
IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, 0x89)
IOMMU_GET_HW_INFO = _IO(IOMMUFD_TYPE, 0x8A)

IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_HWPT_ALLOC_PASID = 1 << 3

IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_INTEL_VTD = 1
IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2
IOMMU_HW_INFO_TYPE_AMD = 4
HW_INFO_TYPES = {0: "none", 1: "intel-vtd", 2: "arm-smmuv3", 3: "tegra241-cmdqv", 4: "amd"}


class iommu_destroy(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("id", ctypes.c_uint32)]


class iommu_ioas_alloc(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("out_ioas_id", ctypes.c_uint32),
    ]


class iommu_hwpt_alloc(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dev_id", ctypes.c_uint32),
        ("pt_id", ctypes.c_uint32),
        ("out_hwpt_id", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("data_type", ctypes.c_uint32),
        ("data_len", ctypes.c_uint32),
        ("data_uptr", ctypes.c_uint64),
        ("fault_id", ctypes.c_uint32),
        ("__reserved2", ctypes.c_uint32),
    ]


class iommu_hw_info(ctypes.Structure):
    """out_max_pasid_log2 is the device's usable PASID width (0: no PASID support)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dev_id", ctypes.c_uint32),
        ("data_len", ctypes.c_uint32),
        ("data_uptr", ctypes.c_uint64),
        ("out_data_type", ctypes.c_uint32),
        ("out_max_pasid_log2", ctypes.c_uint8),
        ("__reserved", ctypes.c_uint8 * 3),
        ("out_capabilities", ctypes.c_uint64),
    ]


# -- <linux/vfio.h>: the device cdev (/dev/vfio/devices/vfioN) --------------------------
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)
VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_PASID = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1


class vfio_device_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class vfio_device_bind_iommufd(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iommufd", ctypes.c_int32),
        ("out_devid", ctypes.c_uint32),
        ("token_uuid_ptr", ctypes.c_uint64),
    ]


class vfio_device_attach_iommufd_pt(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pt_id", ctypes.c_uint32),
        ("pasid", ctypes.c_uint32),
    ]


class vfio_device_detach_iommufd_pt(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pasid", ctypes.c_uint32),
    ]


# -- errno -> PasidError, per step -------------------------------------------------------
# What an errno means at each step, from the 7.2 kernel's answers. A step missing here, or
# an errno missing for a step, still maps (by class) with the errno named.
_MEANING: dict[tuple[str, int], str] = {
    ("bind", _errno.EINVAL): "the fd is not an unbound VFIO device cdev, or the iommufd is bad",
    ("bind", _errno.EBUSY): "the device is already bound (or its group is in legacy use)",
    ("bind", _errno.EPERM): "no permission to bind this device",
    ("hw_info", _errno.ENOENT): "no device with this dev_id is bound to this iommufd",
    ("hw_info", _errno.EOPNOTSUPP): "the device's IOMMU driver reports no hardware info",
    ("device_info", _errno.EINVAL): "the VFIO device is not bound to an iommufd yet",
    ("device_info", _errno.ENOTTY): "the fd is not a VFIO device",
    ("attach", _errno.EINVAL): (
        "the page table does not allow PASIDs (allocate it with IOMMU_HWPT_ALLOC_PASID), is not"
        " a hwpt of this iommufd, or the PASID is beyond the device's width"
    ),
    ("attach", _errno.ENOENT): "no page table with this pt_id in the device's iommufd",
    ("attach", _errno.ENOSPC): "the PASID is beyond what the IOMMU can address",
    ("attach", _errno.EBUSY): "the device is busy (resetting, or its RID is attached elsewhere)",
    ("attach", _errno.EOPNOTSUPP): "the device or its IOMMU cannot attach PASIDs",
    ("detach", _errno.EINVAL): "the VFIO device is not bound to an iommufd",
    ("ioas_alloc", _errno.ENOTTY): "the fd is not an iommufd",
    ("hwpt_alloc", _errno.EOPNOTSUPP): "the IOMMU cannot allocate a PASID-capable page table",
    ("destroy", _errno.EBUSY): "the object is still in use (PASIDs attached to it)",
}


def error_for(step: str, err: int, detail: str = "") -> PasidError:
    """An ioctl's errno as the core's exception; the message names step, errno and meaning."""
    meaning = _MEANING.get((step, err), os.strerror(err))
    message = f"iommufd {step}{' ' + detail if detail else ''}: {errno_name(err)} ({meaning})"
    exc: PasidError
    if err == _errno.EINVAL:
        exc = InvalidArgument(message)
    elif err == _errno.ERANGE:
        exc = InvalidRange(message)
    elif err == _errno.ENOSPC:
        exc = InvalidRange(message) if step == "attach" else Exhausted(message)
    elif err == _errno.ENOENT:
        exc = NotFound(message)
    elif err == _errno.EBUSY:
        exc = Conflict(message)
    elif err in (_errno.EOPNOTSUPP, _errno.ENOTTY, _errno.ENODEV):
        exc = Unsupported(message)
    else:
        exc = BackendError(err, message)
    exc.errno = err
    return exc


def call(fd: int, request: int, arg: ctypes.Structure, step: str, detail: str = "") -> None:
    """ioctl(fd, request, &arg), raising error_for(step, errno) on failure."""
    buf = bytearray(bytes(arg))
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as exc:
        raise error_for(step, exc.errno or _errno.EIO, detail) from None
    ctypes.memmove(ctypes.addressof(arg), bytes(buf), len(buf))


def sized(cls: type[ctypes.Structure], **fields: int) -> ctypes.Structure:
    """A struct with its leading size/argsz set, as every iommufd/VFIO cdev ioctl wants."""
    s = cls()
    first = cls._fields_[0][0]
    setattr(s, first, ctypes.sizeof(cls))
    for k, v in fields.items():
        setattr(s, k, v)
    return s


def attach_pasid(device_fd: int, pt_id: int, pasid: int) -> None:
    arg = sized(
        vfio_device_attach_iommufd_pt, flags=VFIO_DEVICE_ATTACH_PASID, pt_id=pt_id, pasid=pasid
    )
    call(device_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg, "attach", f"pasid {pasid} pt_id {pt_id}")


def detach_pasid(device_fd: int, pasid: int) -> None:
    arg = sized(vfio_device_detach_iommufd_pt, flags=VFIO_DEVICE_DETACH_PASID, pasid=pasid)
    call(device_fd, VFIO_DEVICE_DETACH_IOMMUFD_PT, arg, "detach", f"pasid {pasid}")


def hw_info(iommufd: int, dev_id: int) -> iommu_hw_info:
    arg = sized(iommu_hw_info, dev_id=dev_id)
    call(iommufd, IOMMU_GET_HW_INFO, arg, "hw_info", f"dev_id {dev_id}")
    assert isinstance(arg, iommu_hw_info)
    return arg


def device_info(device_fd: int) -> vfio_device_info:
    arg = sized(vfio_device_info)
    call(device_fd, VFIO_DEVICE_GET_INFO, arg, "device_info")
    assert isinstance(arg, vfio_device_info)
    return arg


def bind(device_fd: int, iommufd: int) -> int:
    """Bind a device cdev to an iommufd; returns dev_id (what a VMM does, and the tests)."""
    arg = sized(vfio_device_bind_iommufd, iommufd=iommufd)
    call(device_fd, VFIO_DEVICE_BIND_IOMMUFD, arg, "bind")
    return int(arg.out_devid)


def ioas_alloc(iommufd: int) -> int:
    arg = sized(iommu_ioas_alloc)
    call(iommufd, IOMMU_IOAS_ALLOC, arg, "ioas_alloc")
    return int(arg.out_ioas_id)


def hwpt_alloc(iommufd: int, dev_id: int, pt_id: int, flags: int) -> int:
    arg = sized(iommu_hwpt_alloc, dev_id=dev_id, pt_id=pt_id, flags=flags)
    call(iommufd, IOMMU_HWPT_ALLOC, arg, "hwpt_alloc", f"dev_id {dev_id} pt_id {pt_id}")
    return int(arg.out_hwpt_id)


def destroy(iommufd: int, obj_id: int) -> None:
    call(iommufd, IOMMU_DESTROY, sized(iommu_destroy, id=obj_id), "destroy", f"id {obj_id}")
