"""The VFIO backend's logic against FakePatchedKernel, a fake AT THE IOCTL BOUNDARY.

The fake stands in for the v7-patched kernel, which no mainline kernel is (the real-kernel
tier, tests/kernel, shows mainline's answer). Everything above the ioctl is real: the
probe, the capability walk, the errno mapping, alloc/free/replay.
"""

from __future__ import annotations

import errno

import grpc
import pytest

from broker.backends import FallbackBackend, SimulatorBackend, create, error_from_errno
from broker.backends import vfio_uapi as uapi
from broker.backends.base import errno_name
from broker.backends.vfio import VfioBackend, pasid_bits_from_ecap
from broker.core.errors import (
    BackendError,
    Exhausted,
    InvalidRange,
    QuotaExceeded,
    Unsupported,
)
from broker.service.status import status_of
from tests.faults.launch import register_fake_backend
from tests.faults.vfio_fake_kernel import FakePatchedKernel


def opened(kernel: FakePatchedKernel | None = None, **kw: object) -> VfioBackend:
    b = VfioBackend(kernel=kernel or FakePatchedKernel(), **kw)  # type: ignore[arg-type]
    b.open()
    return b


def test_open_walks_the_chain_and_takes_pasid_bits_from_nesting_cap() -> None:
    b = VfioBackend(kernel=FakePatchedKernel(pasid_bits=20))
    caps = b.open()
    assert (caps.name, caps.pasid_bits) == ("vfio", 20)
    assert caps.pasid_bits_source == "nesting capability (VFIO_IOMMU_GET_INFO)"
    assert b.probe["set_iommu"] == "TYPE1_NESTING"
    assert b.probe["pasid_request"] == "ok"
    chain = b.probe["iommu_info"]["caps"]
    assert [c["id"] for c in chain] == [1, 3]
    assert chain[1]["pasid_bits"] == 20
    assert b.groups == ("0",)  # found in /dev/vfio when none was configured


def test_alloc_free_and_enospc() -> None:
    k = FakePatchedKernel()
    b = opened(k)
    assert b.alloc(5, 5) == 5
    with pytest.raises(Exhausted, match=r"ALLOC \[5, 5\]: ENOSPC"):
        b.alloc(5, 5)
    assert b.alloc(1, 10) == 1
    b.free(0, 2**20 - 1)
    assert k.held() == 0
    assert b.alloc(5, 5) == 5


def test_kernel_quota_enospc_is_told_apart_from_a_taken_pasid() -> None:
    k = FakePatchedKernel(quota=2)
    b = opened(k)
    b.alloc(1, 1), b.alloc(2, 2)
    with pytest.raises(QuotaExceeded) as exc:
        b.alloc(3, 3)
    # The series answers ENOSPC at its quota; the backend knows it holds pasid_quota.
    assert exc.value.kind == "kernel" and "ENOSPC" in exc.value.message
    assert exc.value.limit == 2  # read from vfio_pasid's pasid_quota parameter
    assert "raise vfio_pasid.pasid_quota" in exc.value.message
    b.free(2, 2)
    with pytest.raises(Exhausted):
        b.alloc(1, 1)  # held by us already: ENOSPC, and not the quota
    assert b.alloc(3, 3) == 3


def test_range_checks_are_the_kernels_einval() -> None:
    b = opened(FakePatchedKernel(pasid_bits=8))
    with pytest.raises(InvalidRange, match="EINVAL"):
        b.alloc(0, 256)  # the review's >=: 2^pasid_bits is out
    with pytest.raises(InvalidRange):
        b.alloc(9, 3)
    assert b.alloc(255, 255) == 255


def test_replay_after_restart_and_set_destroyed_on_close() -> None:
    k = FakePatchedKernel()
    b = opened(k)
    b.alloc(7, 7)
    b.close()
    assert k.held() == 0  # the kernel freed the set with its last container
    b2 = opened(k)
    assert b2.replay([1, 7, 9]) == 3
    assert k.held() == 3
    with pytest.raises(Exhausted):
        b2.replay([9])


def test_other_errno_is_backend_error_unavailable() -> None:
    k = FakePatchedKernel()
    b = opened(k)
    k.fail_next = [errno.EIO]
    with pytest.raises(BackendError) as exc:
        b.alloc(1, 1)
    assert exc.value.errno == errno.EIO
    assert status_of(exc.value) == grpc.StatusCode.UNAVAILABLE


def test_mainline_kernel_is_refused_with_ioctl_errno_and_what_is_needed() -> None:
    b = VfioBackend(kernel=FakePatchedKernel(patched=False, ecap=0x490080F00F4A))
    with pytest.raises(Unsupported) as exc:
        b.open()
    msg = exc.value.message
    assert "VFIO_IOMMU_PASID_REQUEST" in msg and "ENOTTY" in msg and "0x3b76" in msg
    assert "v7 series" in msg and "--vfio-fallback simulator" in msg
    assert exc.value.errno == errno.ENOTTY
    assert b.probe["set_iommu_nesting"] == "EINVAL" and b.probe["set_iommu"] == "TYPE1v2"
    assert status_of(exc.value) == grpc.StatusCode.FAILED_PRECONDITION


def test_no_syswide_pasid_is_eopnotsupp() -> None:
    with pytest.raises(Unsupported, match="EOPNOTSUPP") as exc:
        opened(FakePatchedKernel(syswide_pasid=False))
    assert exc.value.errno == errno.EOPNOTSUPP


def test_pasid_bits_from_config_then_sysfs_when_no_nesting_cap() -> None:
    # QEMU 7.2's VT-d reports PSS 0 (1 bit): small widths must work.
    ecap = 0x490080F00F4A
    assert pasid_bits_from_ecap(ecap) == 1
    assert pasid_bits_from_ecap(19 << 35) == 20
    k = FakePatchedKernel(nesting_cap=False, ecap=19 << 35)
    caps = VfioBackend(kernel=k).open()
    assert caps.pasid_bits == 20 and caps.pasid_bits_source.startswith("sysfs ecap PSS+1")
    k2 = FakePatchedKernel(nesting_cap=False, ecap=19 << 35)
    caps = VfioBackend(kernel=k2, pasid_bits=16).open()
    assert (caps.pasid_bits, caps.pasid_bits_source) == (16, "config (--vfio-pasid-bits)")
    with pytest.raises(Unsupported, match="--vfio-pasid-bits"):
        VfioBackend(kernel=FakePatchedKernel(nesting_cap=False)).open()


def test_group_held_elsewhere_is_named() -> None:
    k = FakePatchedKernel()
    opened(k, groups=("0",))
    with pytest.raises(Unsupported, match=r"open\(/dev/vfio/0\) failed: EBUSY.*another process"):
        VfioBackend(kernel=k, groups=("0",)).open()


def test_missing_container_names_path_and_errno(tmp_path: object) -> None:
    with pytest.raises(Unsupported, match=r"open\(.*/vfio\) failed: ENOENT"):
        VfioBackend(vfio_dir=f"{tmp_path}/none").open()


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.EINVAL, grpc.StatusCode.INVALID_ARGUMENT),
        (errno.ENOSPC, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errno.EDQUOT, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errno.EOPNOTSUPP, grpc.StatusCode.FAILED_PRECONDITION),
        (errno.ENOTTY, grpc.StatusCode.FAILED_PRECONDITION),
        (errno.EIO, grpc.StatusCode.UNAVAILABLE),
        (errno.EFAULT, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_every_errno_maps_as_the_foundation_table_says(err: int, code: grpc.StatusCode) -> None:
    exc = error_from_errno(err, "VFIO_IOMMU_PASID_REQUEST ALLOC [1, 1]")
    assert status_of(exc) == code
    assert exc.errno == err
    assert errno_name(err) in exc.message


def test_fallback_serves_from_the_simulator_and_says_why() -> None:
    b = create("vfio", vfio_fallback="simulator")
    assert isinstance(b, FallbackBackend)
    b.primary = VfioBackend(kernel=FakePatchedKernel(patched=False, ecap=19 << 35))
    caps = b.open()
    assert caps.name == "simulator" and "fallback from vfio" in caps.detail
    assert "ENOTTY" in caps.detail
    assert isinstance(b.current, SimulatorBackend)
    assert b.alloc(1, 1) == 1


def test_fallback_not_taken_when_the_kernel_serves() -> None:
    register_fake_backend()  # test-only: the daemon has no vfio-fake of its own
    b = create("vfio-fake", vfio_fallback="simulator")
    assert b.open().name == "vfio-fake"
    b.close()


class _BadChainKernel(FakePatchedKernel):
    """GET_INFO whose first capability points back at itself."""

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        ret = super().ioctl(fd, request, arg)
        if request == uapi.VFIO_IOMMU_GET_INFO and isinstance(arg, bytearray) and len(arg) > 24:
            uapi.vfio_info_cap_header.from_buffer(arg, 24).next = 24
        return ret


def test_a_looping_capability_chain_is_an_error_not_a_hang() -> None:
    with pytest.raises(BackendError, match="capability chain is malformed at offset 24"):
        VfioBackend(kernel=_BadChainKernel()).open()


def test_argsz_protocol_first_call_too_small() -> None:
    k = FakePatchedKernel()
    b = opened(k)
    assert b.probe["iommu_info"]["argsz"] == 24 + 32 + 64  # asked for, then walked
