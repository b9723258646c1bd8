"""The seed's VFIO_IOMMU_PASID_REQUEST checks, in its order."""

from __future__ import annotations

import errno

import pytest

from broker.core import InvalidArgument, InvalidRange
from broker.core.ioctl import PasidOp, check_pasid_request


@pytest.mark.parametrize(
    ("argsz", "flags", "lo", "hi", "exc", "msg"),
    [
        (15, 1, 1, 2, InvalidArgument, "argsz 15 < minsz 16"),
        (16, 4, 1, 2, InvalidArgument, "flags 0x4 outside VFIO_PASID_REQUEST_MASK 0x3"),
        (16, 5, 1, 2, InvalidArgument, "outside VFIO_PASID_REQUEST_MASK"),
        (16, 3, 1, 2, InvalidArgument, "both ALLOC_PASID and FREE_PASID"),
        (16, 0, 1, 2, InvalidArgument, "neither ALLOC_PASID nor FREE_PASID"),
        (16, 1, 3, 2, InvalidRange, "min 3 > max 2"),
        (16, 1, 1, 1 << 20, InvalidRange, "max 1048576 >= 2^20"),
        (16, 2, 1 << 20, 1 << 20, InvalidRange, "min 1048576 >= 2^20"),  # FREE too
        (16, 2, 0, 2**32 - 1, InvalidRange, "max 4294967295 >= 2^20"),
    ],
)
def test_each_check_is_einval(
    argsz: int, flags: int, lo: int, hi: int, exc: type[Exception], msg: str
) -> None:
    with pytest.raises(exc, match=msg.replace("^", r"\^")) as e:
        check_pasid_request(argsz, flags, lo, hi, 20)
    assert e.value.errno == errno.EINVAL  # type: ignore[attr-defined]


def test_valid_requests() -> None:
    assert check_pasid_request(16, 1, 1, (1 << 20) - 1, 20) is PasidOp.ALLOC
    assert check_pasid_request(24, 2, 0, 0, 20) is PasidOp.FREE  # a larger argsz is fine
