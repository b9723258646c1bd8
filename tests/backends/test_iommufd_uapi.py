"""The iommufd ioctl layer against the headers of the kernel the real-kernel tier boots.

A C program is compiled against linux-libc-dev of that kernel (Debian sid's, unpacked into
the tier's cache by tests/kernel/build_kernel.py) and prints every number, size and
offset broker/backends/iommufd_uapi.py encodes; each must match. Without those headers
(no cache and no way to fetch them) the comparison skips, saying why. The errno mapping
is checked without any header: each step's errno must name the step and keep the errno.
"""

from __future__ import annotations

import ctypes
import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.backends import iommufd_uapi as uapi
from broker.backends.base import errno_name
from broker.core.errors import Conflict, InvalidArgument, InvalidRange, NotFound, Unsupported
from tests.kernel import build_kernel

CONSTANTS = [
    "IOMMU_DESTROY",
    "IOMMU_IOAS_ALLOC",
    "IOMMU_HWPT_ALLOC",
    "IOMMU_GET_HW_INFO",
    "IOMMU_HWPT_ALLOC_PASID",
    "IOMMU_HWPT_ALLOC_NEST_PARENT",
    "IOMMU_HW_INFO_TYPE_INTEL_VTD",
    "VFIO_DEVICE_GET_INFO",
    "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    "VFIO_DEVICE_DETACH_IOMMUFD_PT",
    "VFIO_DEVICE_ATTACH_PASID",
    "VFIO_DEVICE_DETACH_PASID",
    "VFIO_DEVICE_FLAGS_PCI",
]
STRUCTS = {
    "iommu_destroy": uapi.iommu_destroy,
    "iommu_ioas_alloc": uapi.iommu_ioas_alloc,
    "iommu_hwpt_alloc": uapi.iommu_hwpt_alloc,
    "iommu_hw_info": uapi.iommu_hw_info,
    "vfio_device_info": uapi.vfio_device_info,
    "vfio_device_bind_iommufd": uapi.vfio_device_bind_iommufd,
    "vfio_device_attach_iommufd_pt": uapi.vfio_device_attach_iommufd_pt,
    "vfio_device_detach_iommufd_pt": uapi.vfio_device_detach_iommufd_pt,
}
# Every field of every struct: a reordering anywhere shows.
OFFSETS = [
    (s, name) for s, cls in STRUCTS.items() for name, *_ in cls._fields_ if name != "__reserved"
]


def _headers() -> Path:
    found = sorted(build_kernel.CACHE.glob("libc-*/usr/include/linux/iommufd.h"))
    if found:
        return found[-1].parent.parent
    try:
        return build_kernel.linux_libc_dev()
    except (build_kernel.Unavailable, OSError) as exc:
        reason = f"no linux-libc-dev {build_kernel.KERNEL_SERIES} headers: {exc}"
        print(f"SKIP iommufd constants test: {reason}")
        pytest.skip(reason)


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/iommufd.h>",
        "#include <linux/vfio.h>",
        "int main(void) {",
    ]
    for name in CONSTANTS:
        lines.append(f'  printf("{name} %lu\\n", (unsigned long)({name}));')
    for name in STRUCTS:
        lines.append(f'  printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for struct, field in OFFSETS:
        c_field = "out_data_type" if field == "out_data_type" else field
        lines.append(
            f'  printf("offsetof {struct}.{field} %zu\\n", offsetof(struct {struct}, {c_field}));'
        )
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler (Debian: gcc)")
    inc = _headers()
    d = tmp_path_factory.mktemp("iommufd_h")
    (d / "probe.c").write_text(_c_program())
    # The kernel's uapi first, then its asm/ for this architecture.
    flags = [f"-I{inc}", f"-I{inc / 'x86_64-linux-gnu'}"]
    subprocess.run([cc, *flags, "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(" ")
        values[key] = int(value)
    print(f"iommufd uapi checked against {inc}")
    return values


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_the_booted_kernels_headers(
    header_values: dict[str, int], name: str
) -> None:
    assert getattr(uapi, name) == header_values[name], name


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_matches(header_values: dict[str, int], name: str) -> None:
    assert ctypes.sizeof(STRUCTS[name]) == header_values[f"sizeof {name}"]


@pytest.mark.parametrize(("struct", "field"), OFFSETS)
def test_field_offset_matches(header_values: dict[str, int], struct: str, field: str) -> None:
    assert getattr(STRUCTS[struct], field).offset == header_values[f"offsetof {struct}.{field}"]


def test_the_numbers_a_72_kernel_answered_to() -> None:
    """KERNEL-NOTES.md's measured values, so a slip shows even without headers."""
    assert uapi.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76
    assert uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT == 0x3B77
    assert uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT == 0x3B78
    assert uapi.IOMMU_IOAS_ALLOC == 0x3B81
    assert uapi.IOMMU_HWPT_ALLOC == 0x3B89
    assert uapi.IOMMU_GET_HW_INFO == 0x3B8A
    assert ctypes.sizeof(uapi.iommu_hw_info) == 40
    assert uapi.iommu_hw_info.out_max_pasid_log2.offset == 28
    assert ctypes.sizeof(uapi.vfio_device_bind_iommufd) == 24
    assert ctypes.sizeof(uapi.vfio_device_attach_iommufd_pt) == 16


@pytest.mark.parametrize(
    ("step", "err", "cls", "words"),
    [
        ("bind", errno.EBUSY, Conflict, "already bound"),
        ("hw_info", errno.ENOENT, NotFound, "no device with this dev_id"),
        ("attach", errno.EINVAL, InvalidArgument, "does not allow PASIDs"),
        ("attach", errno.ENOSPC, InvalidRange, "beyond what the IOMMU"),
        ("attach", errno.EBUSY, Conflict, "busy"),
        ("attach", errno.EOPNOTSUPP, Unsupported, "cannot attach PASIDs"),
        ("detach", errno.EINVAL, InvalidArgument, "not bound"),
        ("device_info", errno.ENOTTY, Unsupported, "not a VFIO device"),
    ],
)
def test_every_errno_names_its_step(step: str, err: int, cls: type, words: str) -> None:
    exc = uapi.error_for(step, err, "pasid 5")
    assert isinstance(exc, cls)
    assert exc.errno == err
    assert exc.message.startswith(f"iommufd {step} pasid 5: {errno_name(err)}")
    assert words in exc.message


def test_an_unlisted_errno_still_names_step_and_errno() -> None:
    exc = uapi.error_for("attach", errno.EFAULT)
    assert exc.errno == errno.EFAULT and "iommufd attach: EFAULT" in exc.message


def test_an_ioctl_on_a_non_vfio_fd_is_a_named_error(tmp_path: Path) -> None:
    """A real ioctl on a real (wrong) fd: the kernel's ENOTTY comes back as the step's."""
    f = (tmp_path / "plain").open("wb")
    try:
        with pytest.raises(
            Unsupported, match=r"iommufd device_info: ENOTTY \(the fd is not a VFIO"
        ):
            uapi.device_info(f.fileno())
    finally:
        f.close()
