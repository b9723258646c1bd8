"""VFIO_IOMMU_PASID_REQUEST's checks, as the v7 patch (after review) makes them.

So that a VMM can move from the ioctl to the broker line for line, the request keeps the
seed's struct, flag values and order of checks, and its errno on each failure.
"""

from __future__ import annotations

from enum import Enum

from broker.core.errors import InvalidArgument, InvalidRange

VFIO_IOMMU_FLAG_ALLOC_PASID = 1 << 0
VFIO_IOMMU_FLAG_FREE_PASID = 1 << 1
VFIO_PASID_REQUEST_MASK = VFIO_IOMMU_FLAG_ALLOC_PASID | VFIO_IOMMU_FLAG_FREE_PASID
# offsetofend(struct vfio_iommu_type1_pasid_request, range): argsz, flags, min, max.
PASID_REQUEST_MINSZ = 16


class PasidOp(Enum):
    ALLOC = VFIO_IOMMU_FLAG_ALLOC_PASID
    FREE = VFIO_IOMMU_FLAG_FREE_PASID


def check_pasid_request(argsz: int, flags: int, lo: int, hi: int, pasid_bits: int) -> PasidOp:
    """The ioctl's checks in its order; returns the operation or raises (EINVAL)."""
    if argsz < PASID_REQUEST_MINSZ:
        raise InvalidArgument(f"argsz {argsz} < minsz {PASID_REQUEST_MINSZ}")
    if flags & ~VFIO_PASID_REQUEST_MASK:
        raise InvalidArgument(
            f"flags {flags:#x} outside VFIO_PASID_REQUEST_MASK {VFIO_PASID_REQUEST_MASK:#x}"
        )
    limit = 1 << pasid_bits
    if lo > hi:
        raise InvalidRange(f"min {lo} > max {hi}")
    if lo >= limit or hi >= limit:
        bound = "min" if lo >= limit else "max"
        value = lo if lo >= limit else hi
        raise InvalidRange(f"{bound} {value} >= 2^{pasid_bits} ({limit}): beyond pasid_bits")
    op = flags & VFIO_PASID_REQUEST_MASK
    if op == VFIO_IOMMU_FLAG_ALLOC_PASID:
        return PasidOp.ALLOC
    if op == VFIO_IOMMU_FLAG_FREE_PASID:
        return PasidOp.FREE
    what = "both ALLOC_PASID and FREE_PASID" if op else "neither ALLOC_PASID nor FREE_PASID"
    raise InvalidArgument(f"flags {flags:#x} set {what}: exactly one is required")
