"""Small filesystems the disk-fault tests fill up (tmpfs; ext4 on a loop device), and
the filler. Mounting needs root: NO_LOOP says why loop devices cannot be used here."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tmpfs(size_kb: int) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pbfs-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)


def _loop_tools() -> str:
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices here (/dev/loop-control)"
    return ""


NO_LOOP = _loop_tools()


@contextlib.contextmanager
def small_ext4(size_kb: int) -> Iterator[Path]:
    """ext4 with 1 KiB blocks on a loop device: a 4 KiB page of a sparse file mapped
    into memory then needs blocks the filesystem may not have (SIGBUS when it is full)."""
    d = Path(tempfile.mkdtemp(prefix="pbext4-", dir="/tmp"))
    img, mnt = d / "img", d / "mnt"
    mnt.mkdir()
    with img.open("wb") as f:
        f.truncate(size_kb * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-b", "1024", "-m", "0", str(img)], check=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
        shutil.rmtree(d, ignore_errors=True)


def fill(fs: Path) -> Path:
    """Write a file until the filesystem is full; returns it (shrink or delete it to make
    room). Written 1 KiB at a time, the smallest block size used here, so that no block
    is left free."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 1024)
    finally:
        os.close(fd)
    return filler
