"""Small filesystems the disk-fault tests fill up (tmpfs; ext4 on a loop device), and
the filler. Mounting needs root: NO_LOOP says why loop devices cannot be used here."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@contextlib.contextmanager
def tmpfs(size_kb: int, options: str = "") -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pbfs-", dir="/tmp"))
    opts = f"size={size_kb}k" + (f",{options}" if options else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], check=True)
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


# -- a device that fails its writes ----------------------------------------------------
# A block device that fails for real, for test_device_faults (issue 22, point 8).
#
# ext4 on a loop device whose backing file lives on a small tmpfs of its own. The file is
# sparse: once the tmpfs is full (`Device.fill`), every write of the loop device to a block
# the file has not backed yet fails (ENOSPC from the tmpfs, "critical space allocation
# error" in the kernel log), so ext4's writeback and its journal get I/O errors, as on a
# device that fails its writes; overwriting a block already backed still works, as on a
# partly failing disk (fill() trims first, so blocks ext4 freed are unbacked too).
# Freeing the tmpfs (`Device.unfill`) repairs the device; `repair`
# then unmounts (dropping the page cache of everything on it), runs e2fsck and mounts
# again. `trigger_fs_error` makes ext4 report an error itself (its sysfs test hook), which
# with `errors=remount-ro` turns the filesystem read-only under its writers.
#
# Every name is unique (a mkdtemp directory, the loop device losetup hands out), so tests
# of other engineers may run beside these; the context manager always unmounts and
# detaches. Needs root, util-linux, e2fsprogs and loop devices:
# `failing_device_unavailable()` says why not, for a skip.


def failing_device_unavailable() -> str:
    """Why this machine cannot make a failing device ("" when it can): tried once."""
    if NO_LOOP:
        return NO_LOOP
    if shutil.which("e2fsck") is None:
        return "e2fsck is not installed (e2fsprogs)"
    try:
        with ext4_on_tmpfs(tmpfs_mb=4, image_mb=16):
            pass
    except (OSError, subprocess.CalledProcessError) as exc:
        err = getattr(exc, "stderr", "") or ""
        return f"cannot make ext4 on a loop device on a tmpfs here: {exc} {err}".strip()
    return ""


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)


@dataclass
class Device:
    tmpfs: Path  # the tmpfs holding the image: fill it and the device fails its writes
    image: Path
    loop: str  # /dev/loopN
    mnt: Path  # where the ext4 is mounted
    mount_opts: str

    @property
    def name(self) -> str:
        """The device's name under /sys/fs/ext4/ (loopN)."""
        return os.path.basename(self.loop)

    def fill(self) -> None:
        """Fill the tmpfs: from now on the loop device fails writes to unbacked blocks.
        fstrim first: the loop device punches every free block of the filesystem out of
        the image, so that whatever ext4 allocates from now on (a growing WAL, or one
        regrown after a checkpoint truncated it) fails at writeback, not only blocks never
        written before; blocks in use (overwritten in place) still work."""
        subprocess.run(["fstrim", str(self.mnt)], check=False, capture_output=True)
        fill(self.tmpfs)

    def unfill(self) -> None:
        """The device's backing store has room again."""
        with contextlib.suppress(FileNotFoundError):
            (self.tmpfs / "filler").unlink()

    def trigger_fs_error(self) -> None:
        """ext4 reports an error on this filesystem (with errors=remount-ro: read-only)."""
        Path(f"/sys/fs/ext4/{self.name}/trigger_fs_error").write_text("1\n")

    def _mounted(self) -> bool:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == str(self.mnt) for line in f)

    def _who_holds(self) -> str:
        """What may keep the device busy, for a failure's message."""
        name = self.name
        holders = (
            os.listdir(f"/sys/block/{name}/holders")
            if os.path.isdir(f"/sys/block/{name}/holders")
            else []
        )
        mounted = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/mountinfo") as f:
                if any(f" {self.loop} " in line for line in f):
                    mounted.append(pid)
        return f"\nholders {holders}; mounted in the mount namespaces of pids {mounted[:10]}"

    def read_only(self) -> bool:
        with open("/proc/mounts") as f:
            for line in f:
                _dev, mnt, _fs, opts, *_ = line.split()
                if mnt == str(self.mnt):
                    # ext4 turned read-only by an error shows "emergency_ro" (Linux 6.x).
                    return bool({"ro", "emergency_ro"} & set(opts.split(",")))
        return False

    def sync(self) -> None:
        """Everything written so far to the filesystem onto the device (syncfs)."""
        _run("sync", "-f", str(self.mnt))

    def unmount(self) -> None:
        _run("umount", str(self.mnt))

    def repair(self, lose_unwritten: bool = False) -> str:
        """Room again, unmount (the page cache of the filesystem goes with it), e2fsck,
        mount again. Returns e2fsck's report. `lose_unwritten`: unmount while the device
        still fails its writes, so that what only the page cache held is lost (the
        writeback at unmount fails and the kernel drops those pages), as when a failing
        device's pages are evicted; else room comes first and the unmount writes it all."""
        if not lose_unwritten:
            self.unfill()
        if self._mounted():
            self.unmount()
        self.unfill()
        # e2fsck: 0 clean, 1 errors corrected; anything else is a failed repair. 8 with
        # "in use": something still has the device (udev's probe after the unmount; once,
        # under load, for more than 5 s): again, for up to 30 s.
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(
                ["e2fsck", "-fy", self.loop], capture_output=True, text=True, timeout=120
            )
            if r.returncode != 8 or "in use" not in r.stdout + r.stderr:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.returncode in (0, 1), (
            f"e2fsck exit {r.returncode}: {r.stdout}{r.stderr}{self._who_holds()}"
        )
        _run("mount", "-o", self.mount_opts, self.loop, str(self.mnt))
        return r.stdout


@contextlib.contextmanager
def ext4_on_tmpfs(
    tmpfs_mb: int = 32, image_mb: int = 256, mount_opts: str = "errors=remount-ro"
) -> Iterator[Device]:
    """ext4 (4 KiB blocks) on a loop device backed by a sparse `image_mb` file on a tmpfs
    of `tmpfs_mb`. mkfs initializes lazily, so the image starts almost unbacked."""
    with tmpfs(tmpfs_mb << 10) as backing:
        mnt = Path(tempfile.mkdtemp(prefix="pbdev-", dir="/tmp"))
        image = backing / "image"
        with image.open("wb") as f:
            f.truncate(image_mb << 20)
        loop = ""
        try:
            _run(
                "mkfs.ext4", "-q", "-m", "0",
                "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", str(image),
            )  # fmt: skip
            loop = _run("losetup", "-f", "--show", str(image)).stdout.strip()
            _run("mount", "-o", mount_opts, loop, str(mnt))
            yield Device(backing, image, loop, mnt, mount_opts)
        finally:
            # Lazy: a process the test failed to stop may still hold a file there.
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
            if loop:
                subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)
            shutil.rmtree(mnt, ignore_errors=True)
