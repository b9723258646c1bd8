"""PasidRequest: VFIO_IOMMU_PASID_REQUEST line for line, over the broker."""

from __future__ import annotations

import errno

import pytest
from pasid_client import Client, InvalidArgument, InvalidRange, QuotaExceeded, ResourceExhausted

ALLOC, FREE = 1 << 0, 1 << 1


def test_alloc_returns_the_pasid_and_free_returns_zero(client: Client) -> None:
    with client.session("vmm") as s:
        assert s.pasid_request(16, ALLOC, 1, 100) == 1
        assert s.pasid_request(16, ALLOC, 1, 100) == 2
        assert client.pasid_request(s.session_id, s.token, 16, ALLOC, 50, 60) == 50
        assert s.pasid_request(16, FREE, 0, 100) == 0
        assert s.list().count == 0


@pytest.mark.parametrize(
    ("argsz", "flags", "lo", "hi", "exc", "err", "msg"),
    [
        (12, ALLOC, 1, 2, InvalidArgument, errno.EINVAL, "argsz 12 < minsz 16"),
        (16, 1 << 2, 1, 2, InvalidArgument, errno.EINVAL, "outside VFIO_PASID_REQUEST_MASK"),
        (16, ALLOC | FREE, 1, 2, InvalidArgument, errno.EINVAL, "both ALLOC_PASID and FREE_PASID"),
        (16, 0, 1, 2, InvalidArgument, errno.EINVAL, "neither ALLOC_PASID nor FREE_PASID"),
        (16, ALLOC, 9, 2, InvalidRange, errno.EINVAL, "min 9 > max 2"),
        (16, FREE, 0, 2**32 - 1, InvalidRange, errno.EINVAL, "max 4294967295 >= 2^20"),
        (16, ALLOC, 0, 0, ResourceExhausted, errno.ENOSPC, "no 1 free PASID in [0, 0]"),
    ],
)
def test_the_seeds_checks_with_its_errno(
    client: Client,
    argsz: int,
    flags: int,
    lo: int,
    hi: int,
    exc: type[Exception],
    err: int,
    msg: str,
) -> None:
    with client.session("vmm") as s:
        s.alloc(1, 10)
        for call in (
            lambda: s.pasid_request(argsz, flags, lo, hi),
            lambda: client.pasid_request(s.session_id, s.token, argsz, flags, lo, hi),
        ):
            with pytest.raises(exc) as e:
                call()
            assert e.value.errno == err  # type: ignore[attr-defined]
            assert msg in e.value.message  # type: ignore[attr-defined]
        assert list(s.list().pasids()) == [1]  # nothing changed


def test_quota_is_edquot(client: Client) -> None:
    with client.session("vmm") as s:
        s.alloc(1, 2000, count=1000)
        with pytest.raises(QuotaExceeded) as e:
            s.pasid_request(16, ALLOC, 1, 2000)
        assert (e.value.errno, e.value.quota, e.value.limit) == (errno.EDQUOT, "set", 1000)
