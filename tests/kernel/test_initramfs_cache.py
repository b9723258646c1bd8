"""The kernel tiers' initramfs cache prunes only its own stale files (no QEMU here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.kernel.vm import STALE_AFTER_S, initramfs_path, prune_initramfs

NOW = 1_800_000_000.0
OLD = NOW - STALE_AFTER_S - 60  # unused for longer than the grace
RECENT = NOW - 60  # another checkout used it a minute ago


def _file(d: Path, name: str, mtime: float) -> Path:
    p = d / name
    p.write_bytes(b"x")
    os.utime(p, (mtime, mtime))
    return p


def test_prunes_the_familys_stale_keys_and_nothing_else(tmp_path: Path) -> None:
    fam = "initramfs-iommufd-"
    keep = _file(tmp_path, f"{fam}{'a' * 16}.cpio", NOW)
    stale = [_file(tmp_path, f"{fam}{k * 16}.cpio", OLD) for k in "0b"]
    kept = [
        _file(tmp_path, f"{fam}{'c' * 16}.cpio", RECENT),  # still in use elsewhere
        _file(tmp_path, f"{fam}{'d' * 16}.cpio.bak", OLD),  # not the exact pattern
        _file(tmp_path, f"{fam}{'e' * 16}.tmp", OLD),  # a pack in progress
        _file(tmp_path, f"{fam}{'F' * 16}.cpio", OLD),  # no key: keys are lowercase
        _file(tmp_path, f"{fam}{'1' * 15}.cpio", OLD),  # too short for a key
        _file(tmp_path, f"{fam}{'2' * 17}.cpio", OLD),  # too long
        _file(tmp_path, f"initramfs-6.1.0-18-amd64-{'3' * 16}.cpio", OLD),  # other family
        _file(tmp_path, "build-kernel.log", OLD),
    ]
    (tmp_path / f"{fam}{'4' * 16}.cpio").mkdir()  # not a regular file
    link = tmp_path / f"{fam}{'5' * 16}.cpio"
    link.symlink_to(kept[-1])
    os.utime(link, (OLD, OLD), follow_symlinks=False)

    removed = prune_initramfs(keep, fam, now=NOW)

    assert sorted(removed) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in (keep, *kept, link, tmp_path / f"{fam}{'4' * 16}.cpio"))


def test_a_kernel_versions_family_leaves_other_versions(tmp_path: Path) -> None:
    """`initramfs-<version>-`: a longer version with the same start is another family."""
    fam = "initramfs-6.1.0-18-"
    keep = _file(tmp_path, f"{fam}{'a' * 16}.cpio", NOW)
    stale = _file(tmp_path, f"{fam}{'b' * 16}.cpio", OLD)
    other = _file(tmp_path, f"initramfs-6.1.0-18-amd64-{'b' * 16}.cpio", OLD)
    assert prune_initramfs(keep, fam, now=NOW) == [stale]
    assert other.exists() and keep.exists()


def test_keep_must_be_of_the_family(tmp_path: Path) -> None:
    keep = _file(tmp_path, "initramfs-6.1.0-18-amd64-" + "a" * 16 + ".cpio", NOW)
    with pytest.raises(ValueError, match="not of the family"):
        prune_initramfs(keep, "initramfs-iommufd-", now=NOW)


def test_using_a_cached_file_marks_it_in_use(tmp_path: Path) -> None:
    """initramfs_path touches an existing file, so a pruner elsewhere leaves it be."""
    fam = "initramfs-iommufd-"
    out = initramfs_path(tmp_path, fam)
    assert not out.exists()  # naming a file that is not there creates nothing
    _file(tmp_path, out.name, 1000.0)  # last used in 1970
    assert initramfs_path(tmp_path, fam) == out
    assert out.stat().st_mtime > 1000.0 + STALE_AFTER_S
