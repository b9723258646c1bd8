"""The ioctl layer against the system's <linux/vfio.h>: every mainline number and size.

A small C program is compiled against Debian's linux-libc-dev and prints the values; the
Python encodings in broker/backends/vfio_uapi.py must match each one. The seed's
out-of-tree additions have no header to compare with: they are checked against the
layout the series posted, and the collision of their numbers with mainline's is pinned.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.backends import vfio_uapi as uapi

HEADER = Path("/usr/include/linux/vfio.h")

CONSTANTS = [
    "VFIO_API_VERSION",
    "VFIO_BASE",
    "VFIO_TYPE1_IOMMU",
    "VFIO_TYPE1v2_IOMMU",
    "VFIO_TYPE1_NESTING_IOMMU",
    "VFIO_GET_API_VERSION",
    "VFIO_CHECK_EXTENSION",
    "VFIO_SET_IOMMU",
    "VFIO_IOMMU_GET_INFO",
    "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER",
    "VFIO_GROUP_UNSET_CONTAINER",
    "VFIO_GROUP_FLAGS_VIABLE",
    "VFIO_GROUP_FLAGS_CONTAINER_SET",
    "VFIO_DEVICE_FEATURE",
    "VFIO_IOMMU_INFO_PGSIZES",
    "VFIO_IOMMU_INFO_CAPS",
    "VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE",
    "VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION",
    "VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL",
]
STRUCTS = {
    "vfio_group_status": uapi.vfio_group_status,
    "vfio_info_cap_header": uapi.vfio_info_cap_header,
    "vfio_iommu_type1_info": uapi.vfio_iommu_type1_info,
    "vfio_iommu_type1_info_dma_avail": uapi.vfio_iommu_type1_info_dma_avail,
}
OFFSETS = [
    ("vfio_iommu_type1_info", "flags"),
    ("vfio_iommu_type1_info", "iova_pgsizes"),
    ("vfio_iommu_type1_info", "cap_offset"),
    ("vfio_info_cap_header", "next"),
    ("vfio_iommu_type1_info_dma_avail", "avail"),
]


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/vfio.h>",
        "int main(void) {",
    ]
    for name in CONSTANTS:
        lines.append(f'  printf("{name} %lu\\n", (unsigned long)({name}));')
    lines.append('  printf("VFIO_TYPE %d\\n", (int)VFIO_TYPE);')
    for name in STRUCTS:
        lines.append(f'  printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for struct, field in OFFSETS:
        lines.append(
            f'  printf("offsetof {struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));'
        )
    # Mainline's own user of VFIO_BASE + 18, where the header has it (6.6+).
    lines += [
        "#ifdef VFIO_DEVICE_BIND_IOMMUFD",
        '  printf("VFIO_DEVICE_BIND_IOMMUFD %lu\\n", (unsigned long)VFIO_DEVICE_BIND_IOMMUFD);',
        "#endif",
        "#ifdef VFIO_IOMMU_PASID_REQUEST",
        '  printf("VFIO_IOMMU_PASID_REQUEST %lu\\n", (unsigned long)VFIO_IOMMU_PASID_REQUEST);',
        "#endif",
        "  return 0;",
        "}",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        reason = f"needs a C compiler and {HEADER} (Debian: gcc, linux-libc-dev)"
        print(f"SKIP constants test: {reason}")
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("vfio_h")
    (d / "probe.c").write_text(_c_program())
    subprocess.run([cc, "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(" ")
        values[key] = int(value)
    return values


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_linux_vfio_h(header_values: dict[str, int], name: str) -> None:
    assert getattr(uapi, name) == header_values[name], name


def test_vfio_type(header_values: dict[str, int]) -> None:
    assert ord(uapi.VFIO_TYPE) == header_values["VFIO_TYPE"]


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_matches(header_values: dict[str, int], name: str) -> None:
    assert ctypes.sizeof(STRUCTS[name]) == header_values[f"sizeof {name}"]


@pytest.mark.parametrize(("struct", "field"), OFFSETS)
def test_field_offset_matches(header_values: dict[str, int], struct: str, field: str) -> None:
    offset = getattr(STRUCTS[struct], field).offset
    assert offset == header_values[f"offsetof {struct}.{field}"]


def test_the_seed_is_not_in_mainline_and_its_number_is_taken(
    header_values: dict[str, int],
) -> None:
    # If a header ever gains the seed's ioctl, this module must be revisited.
    assert "VFIO_IOMMU_PASID_REQUEST" not in header_values
    if "VFIO_DEVICE_BIND_IOMMUFD" in header_values:
        assert header_values["VFIO_DEVICE_BIND_IOMMUFD"] == uapi.VFIO_IOMMU_PASID_REQUEST
    assert uapi.VFIO_IOMMU_PASID_REQUEST == uapi.VFIO_DEVICE_FEATURE + 1


def test_seed_layout_as_posted() -> None:
    """The v7 patches: {argsz, flags, {min, max}} = 16 bytes; iommu_nesting_info's fixed
    part 32 bytes with pasid_bits at 18; the VT-d vendor part 24; the cap id is 3."""
    assert ctypes.sizeof(uapi.vfio_iommu_type1_pasid_request) == 16
    assert uapi.vfio_iommu_type1_pasid_request.range.offset == 8
    assert ctypes.sizeof(uapi.iommu_nesting_info) == 32
    assert uapi.iommu_nesting_info.pasid_bits.offset == 18
    assert ctypes.sizeof(uapi.iommu_nesting_info_vtd) == 24
    assert uapi.vfio_iommu_type1_info_cap_nesting.info.offset == 8
    assert uapi.VFIO_IOMMU_PASID_REQUEST == (ord(";") << 8) | 118 == 0x3B76
    assert (uapi.VFIO_IOMMU_FLAG_ALLOC_PASID, uapi.VFIO_IOMMU_FLAG_FREE_PASID) == (1, 2)
    # The series' cap id collides with mainline's DMA_AVAIL, told apart by size.
    assert uapi.VFIO_IOMMU_TYPE1_INFO_CAP_NESTING == uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
    assert ctypes.sizeof(uapi.vfio_iommu_type1_info_dma_avail) < uapi.NESTING_CAP_MIN_SIZE


def test_pasid_request_bytes() -> None:
    req = uapi.pasid_request(uapi.VFIO_IOMMU_FLAG_ALLOC_PASID, 5, 9)
    assert bytes(req) == bytes.fromhex("10000000010000000500000009000000")
