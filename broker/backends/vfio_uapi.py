"""VFIO's user API as the backend needs it: ioctl numbers, argsz-first structs, capability ids.

Written from include/uapi/linux/vfio.h. VFIO encodes its ioctls with plain _IO(type, nr),
without the size and direction bits (the kernel reads `argsz` instead), so a request number
is just (';' << 8) | (100 + n). tests/backends/test_vfio_uapi.py compiles a C program
against the system's <linux/vfio.h> and checks every mainline value here.

The seed's out-of-tree additions (the v7 series, never merged) are in the last section
and nowhere else.
"""

from __future__ import annotations

import ctypes

# -- ioctl encoding (include/uapi/asm-generic/ioctl.h) ----------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS


def _IO(type_: str, nr: int) -> int:
    """_IO(type, nr): no direction, no size; what every VFIO ioctl uses."""
    return (ord(type_) << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


# -- mainline <linux/vfio.h> ------------------------------------------------------------

VFIO_API_VERSION = 0
VFIO_TYPE = ";"
VFIO_BASE = 100

# Extensions (CHECK_EXTENSION arguments) and IOMMU types (SET_IOMMU arguments).
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_TYPE1_NESTING_IOMMU = 6  # "Implies v2"; the series needs it for PASID requests

# On the container fd (/dev/vfio/vfio).
VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)

# On a group fd (/dev/vfio/N).
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

# On a device fd; the last mainline number before the seed's (see below).
VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)

VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_info_cap_header(ctypes.Structure):
    """Each capability starts with this; `next` is an offset from the start of the info."""

    _fields_ = [
        ("id", ctypes.c_uint16),
        ("version", ctypes.c_uint16),
        ("next", ctypes.c_uint32),
    ]


class vfio_iommu_type1_info(ctypes.Structure):
    """Caller sets argsz; a kernel with more to say raises argsz and sets INFO_CAPS."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
    ]


class vfio_iommu_type1_info_dma_avail(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("avail", ctypes.c_uint32)]


# ======================================================================================
# The seed's out-of-tree UAPI: "vfio: expose virtual Shared Virtual Addressing to VMs",
# v7 (Sep 2020), patches 01, 03 and 07. NEVER MERGED: no mainline header has any of it,
# so the constants test cannot check it; it is copied from the posted patches.
#
# Two numbers collide with mainline, so neither may be trusted on its own:
# - VFIO_IOMMU_PASID_REQUEST is VFIO_BASE + 18. In mainline that number is a *device*
#   ioctl (VFIO_DEVICE_BIND_IOMMUFD since 6.6). On the *container* fd of an unpatched
#   kernel it falls through vfio_iommu_type1_ioctl()'s default: ENOTTY.
# - VFIO_IOMMU_TYPE1_INFO_CAP_NESTING is 3 in the series, which mainline gave to
#   VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL (12 bytes). A nesting cap is told apart by its size
#   (header + struct iommu_nesting_info, at least 32 bytes) and the argsz inside it.
# Support is decided by asking (a harmless FREE of [0, 0]), never by a number alone.
# ======================================================================================

VFIO_IOMMU_PASID_REQUEST = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_IOMMU_FLAG_ALLOC_PASID = 1 << 0
VFIO_IOMMU_FLAG_FREE_PASID = 1 << 1
VFIO_PASID_REQUEST_MASK = VFIO_IOMMU_FLAG_ALLOC_PASID | VFIO_IOMMU_FLAG_FREE_PASID

VFIO_IOMMU_TYPE1_INFO_CAP_NESTING = 3
IOMMU_NESTING_FEAT_SYSWIDE_PASID = 1 << 0
IOMMU_NESTING_FEAT_BIND_PGTBL = 1 << 1
IOMMU_NESTING_FEAT_CACHE_INVLD = 1 << 2

# The series' default for vfio_pasid's `pasid_quota` module parameter (per mm).
VFIO_DEFAULT_PASID_QUOTA = 1000


class _pasid_range(ctypes.Structure):
    _fields_ = [("min", ctypes.c_uint32), ("max", ctypes.c_uint32)]


class vfio_iommu_type1_pasid_request(ctypes.Structure):
    """ALLOC returns the PASID as the ioctl's (int) value; FREE returns 0."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("range", _pasid_range),
    ]


class iommu_nesting_info(ctypes.Structure):
    """The fixed part of the series' struct (a vendor union follows: 24 bytes for VT-d)."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("format", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("addr_width", ctypes.c_uint16),
        ("pasid_bits", ctypes.c_uint16),
        ("padding", ctypes.c_uint8 * 12),
    ]


class iommu_nesting_info_vtd(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("cap_reg", ctypes.c_uint64),
        ("ecap_reg", ctypes.c_uint64),
    ]


class vfio_iommu_type1_info_cap_nesting(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("info", iommu_nesting_info)]


NESTING_CAP_MIN_SIZE = ctypes.sizeof(vfio_iommu_type1_info_cap_nesting)


def pasid_request(flags: int, lo: int, hi: int) -> bytearray:
    """The seed's request as the bytes the ioctl takes (argsz set)."""
    req = vfio_iommu_type1_pasid_request(
        ctypes.sizeof(vfio_iommu_type1_pasid_request), flags, _pasid_range(lo, hi)
    )
    return bytearray(req)
