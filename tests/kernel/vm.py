"""The kernel tiers' guests: a kernel under QEMU (TCG) with an emulated VT-d IOMMU, running
this host's own Python on this checkout over a read-only 9p share, so what it tests is
exactly the code here. The guest writes `PBK {json}` lines on its serial console; a boot
returns them.

Two guests share the /init, the initramfs packing and the boot:
- Debian's kernel (`ensure_packages`, `boot_debian`): the vfio backend, with QEMU's edu
  device on vfio-pci. Everything comes from Debian packages (PACKAGES).
- Linux 7.2 built from Debian's source, under sid's QEMU 11 (`prepare_iommufd`,
  `boot_iommufd`): the iommufd backend, with three vfio-user devices served by
  vfio_user_server.py (two with a 20-bit PASID capability, one without). The kernel and
  QEMU come from build_kernel.py's cache outside the checkout.
Either raises Unavailable with the reason when this machine cannot run it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests import apt
from tests.kernel import build_kernel
from tests.kernel.build_kernel import Unavailable

__all__ = ["Boot", "Prepared", "Unavailable", "boot_debian", "boot_iommufd", "prepare_iommufd"]

ROOT = Path(__file__).resolve().parent.parent.parent

# The guest's /init: mount what the script needs, load the initramfs's modules (if any),
# mount the host's root over 9p, bind the devices `pbk.bind=VENDOR:DEVICE` names to
# vfio-pci, then run `pbk.script` with `pbk.python` chrooted into the host's root.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t debugfs debugfs /sys/kernel/debug
ifconfig lo 127.0.0.1 up  # the daemon's /metrics is scraped over loopback
for x in $(cat /proc/cmdline); do
  case "$x" in
    pbk.python=*) PY="${x#pbk.python=}" ;;
    pbk.script=*) SCRIPT="${x#pbk.script=}" ;;
    pbk.scratch=*) SCRATCH="${x#pbk.scratch=}" ;;
    pbk.bind=*) BIND="${x#pbk.bind=}" ;;
  esac
done
for m in $(cat /modules.order 2>/dev/null); do
  insmod "/modules/$m" || echo "PBK {\"event\": \"insmod failed\", \"module\": \"$m\"}"
done
mkdir -p /host
# cache=loose: the share is read-only, and Python's imports over 9p are most of the time.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=524288 hostroot /host \
  || echo 'PBK {"event": "9p mount failed"}'
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor):$(cat $d/device)" = "$BIND" ]; then
    echo vfio-pci > "$d/driver_override"
    echo "${d##*/}" > /sys/bus/pci/drivers_probe
  fi
done
mount -t devtmpfs dev /host/dev
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t debugfs debugfs /host/sys/kernel/debug
mount -t tmpfs scratch "/host$SCRATCH"
chroot /host /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$SCRATCH" \
  TMPDIR="$SCRATCH" PYTHONDONTWRITEBYTECODE=1 PBK_SCRATCH="$SCRATCH" "$PY" "$SCRIPT"
echo "PBK {\"event\": \"guest done\", \"status\": $?}"
# The console's UART sends what the echo queued after the echo returns: powering off at
# once cut that line in two under load (the host then had no "guest done").
sleep 2
echo o > /proc/sysrq-trigger
sleep 30
"""


@dataclass
class Boot:
    seconds: float
    returncode: int | None
    console: str
    results: list[dict[str, object]]
    trace: str = ""  # QEMU's -trace output (the iommufd guest)
    server_logs: list[str] = field(default_factory=list)  # the vfio-user servers' stderr


def _check_host() -> None:
    if platform.machine() != "x86_64":
        raise Unavailable(f"needs an x86_64 host (this is {platform.machine()})")
    if os.environ.get("PBK_KERNEL_TIER") == "skip":
        raise Unavailable("PBK_KERNEL_TIER=skip")


def static_busybox() -> bool:
    """A dynamic busybox cannot run alone in the initramfs."""
    bb = Path("/bin/busybox")
    if not bb.exists() or b"ELF" not in bb.read_bytes()[:4]:
        return False
    r = subprocess.run(["ldd", str(bb)], capture_output=True, text=True, check=False)
    return r.returncode != 0 or "not a dynamic" in (r.stdout + r.stderr)


def pack_initramfs(out: Path, family: str, modules: Mapping[str, bytes] | None = None) -> Path:
    """busybox, /init and `modules` (name -> .ko, loaded in this order) into the newc cpio
    `out` (initramfs_path's), unless it is there already; then the family's stale files
    go (prune_initramfs)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tree = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules", "host"):
            (tree / d).mkdir()
        shutil.copy2("/bin/busybox", tree / "bin" / "busybox")
        modules = modules or {}
        for name, data in modules.items():
            (tree / "modules" / name).write_bytes(data)
        if modules:
            (tree / "modules.order").write_text("\n".join(modules) + "\n")
        (tree / "init").write_text(INIT)
        (tree / "init").chmod(0o755)
        files = subprocess.run(
            ["find", "."], cwd=tree, capture_output=True, text=True, check=True
        ).stdout
        tmp_out = out.with_suffix(".tmp")
        with tmp_out.open("wb") as f:
            subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet"],
                cwd=tree,
                input=files.encode(),
                stdout=f,
                check=True,
            )
        tmp_out.rename(out)
    prune_initramfs(out, family)
    return out


def _init_key(*parts: object) -> str:
    return hashlib.sha256("\n".join(map(str, (INIT, *parts))).encode()).hexdigest()[:16]


# A cached initramfs is `<family><_init_key>.cpio`; a new /init (or kernel) is a new key,
# and the old file is never read again by this checkout. Another checkout on this machine
# may still use it (/var/cache/pasid-broker is shared), so a file goes only once nobody
# has used it for this long: each use touches it (initramfs_path).
STALE_AFTER_S = 3600.0


def initramfs_path(directory: Path, family: str, *key_parts: object) -> Path:
    """The cached initramfs for this /init and `key_parts`, marked as in use."""
    out = directory / f"{family}{_init_key(*key_parts)}.cpio"
    with contextlib.suppress(OSError):  # not there yet, or another user's file
        os.utime(out)
    return out


def prune_initramfs(
    keep: Path, family: str, stale_after: float = STALE_AFTER_S, now: float | None = None
) -> list[Path]:
    """Delete the files of `keep`'s family beside it with another key, unused for
    `stale_after` seconds; returns them. Only names that are exactly
    `<family><16 hex>.cpio` are candidates: nothing else in the cache is touched."""
    pattern = re.compile(re.escape(family) + r"[0-9a-f]{16}\.cpio")
    if not pattern.fullmatch(keep.name):
        raise ValueError(f"{keep.name} is not of the family {family}<key>.cpio")
    cutoff = (time.time() if now is None else now) - stale_after
    removed = []
    for p in keep.parent.iterdir():
        if p.name == keep.name or not pattern.fullmatch(p.name):
            continue
        with contextlib.suppress(FileNotFoundError):  # another pruner was first
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                p.unlink()
                removed.append(p)
    return removed


def run_guest(
    qemu: Sequence[str],
    kernel: Path,
    initrd: Path,
    script: Path,
    *,
    iommu: str,
    bind: tuple[str, str],
    devices: Sequence[str],
    extra: Sequence[str] = (),
    timeout: float,
) -> Boot:
    """Boot, run `script` with this host's Python inside the guest, power off."""
    scratch = "/mnt" if str(ROOT).startswith("/tmp/") or str(ROOT) == "/tmp" else "/tmp"
    # no_timer_check: the IO-APIC timer check counts ticks within a fixed number of TSC
    # cycles, and a TCG guest on a loaded host can miss them ("timer doesn't work through
    # Interrupt-remapped IO-APIC", a panic; seen once with the iommufd tier's kernel at a
    # load of 7-15). KVM guests skip the check for the same reason (arch/x86/kernel/kvm.c).
    append = (
        "console=ttyS0 intel_iommu=on,sm_on panic=-1 quiet no_timer_check"
        f" pbk.python={sys.executable} pbk.script={script} pbk.scratch={scratch}"
        f" pbk.bind={bind[0]}:{bind[1]}"
    )
    cmd = [
        *qemu,
        "-accel", "tcg",
        "-machine", "q35,kernel-irqchip=split",
        "-m", "1024",
        "-smp", "2",
        "-device", iommu,
        *devices,
        "-vga", "none",
        "-nic", "none",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", append,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        *extra,
        "-nographic", "-no-reboot",
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace")
        code: int | None = r.returncode
        console = r.stdout + r.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        out = exc.stdout or b""
        console = out.decode(errors="replace") if isinstance(out, bytes) else out
    return Boot(time.monotonic() - t0, code, console, guest_events(console))


def guest_events(console: str) -> list[dict[str, object]]:
    """The guest's `PBK {json}` lines; the first may follow the firmware's escape codes."""
    results: list[dict[str, object]] = []
    for line in console.splitlines():
        at = line.find("PBK {")
        if at >= 0:
            line = line[at:]
            try:
                results.append(json.loads(line[4:]))
            except json.JSONDecodeError:
                results.append({"event": "unparsed", "line": line})
    return results


# -- Debian's kernel: the vfio backend ------------------------------------------------

CACHE = ROOT / ".cache" / "kernel-tier"
PACKAGES = ("qemu-system-x86", "linux-image-amd64", "busybox-static", "cpio", "kmod")
# What the guest loads (dependencies come from modules.dep).
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "vfio", "vfio_iommu_type1", "vfio-pci")
EDU = ("0x1234", "0x11e8")  # QEMU's educational PCI device: a harmless thing to bind


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path


def find_kernel() -> Kernel | None:
    """The newest installed kernel that has 9p and vfio-pci modules (not -cloud)."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        mods = Path("/usr/lib/modules") / version
        dep = mods / "modules.dep"
        if dep.exists() and "/vfio-pci.ko" in (text := dep.read_text()) and "/9p.ko" in text:
            found.append(Kernel(version, vmlinuz, mods))
    return max(found, key=lambda k: k.vmlinuz.stat().st_mtime) if found else None


def _missing() -> list[str]:
    need = []
    if not shutil.which("qemu-system-x86_64"):
        need.append("qemu-system-x86")
    if find_kernel() is None:
        need.append("linux-image-amd64")
    if not static_busybox():
        need.append("busybox-static")
    if not shutil.which("cpio"):
        need.append("cpio")
    return need


def ensure_packages() -> str:
    """Install what is missing from Debian; returns what was done. Raises Unavailable."""
    _check_host()
    need = _missing()
    if not need:
        return "packages present"
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise Unavailable(f"missing {', '.join(need)} and cannot apt-get install (not root/Debian)")
    t0 = time.monotonic()
    why = apt.install(*PACKAGES)
    if why:
        raise Unavailable(why)
    still = _missing()
    if still:
        raise Unavailable(f"still missing after apt-get install: {', '.join(still)}")
    return f"installed {', '.join(need)} in {time.monotonic() - t0:.0f} s"


def _load_order(kernel: Kernel) -> list[str]:
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(m: str) -> None:
        for d in deps[m]:
            visit(d)
        if m not in order:
            order.append(m)

    for name in MODULES:
        visit(by_name[name.replace("-", "_")])
    return order


def debian_initramfs(kernel: Kernel) -> Path:
    """busybox + the modules + /init, cached by kernel version and /init's text."""
    family = f"initramfs-{kernel.version}-"
    out = initramfs_path(CACHE, family, kernel.version, MODULES)
    if out.exists():
        return out
    modules: dict[str, bytes] = {}
    for rel in _load_order(kernel):
        src = kernel.modules / rel
        name = Path(rel).name
        if name.endswith(".ko.xz"):
            modules[name.removesuffix(".xz")] = lzma.decompress(src.read_bytes())
        elif name.endswith(".ko"):
            modules[name] = src.read_bytes()
        else:
            raise Unavailable(f"cannot unpack module {rel} (only .ko and .ko.xz)")
    return pack_initramfs(out, family, modules)


def boot_debian(script: Path, timeout: float = 420.0) -> Boot:
    """Boot Debian's kernel with the edu device on vfio-pci and run `script` in it. The
    bound is the iommufd tier's: TCG on a loaded 2-core machine (the suite's other
    workers, other checkouts) took over 150 s where a quiet one takes 45."""
    kernel = find_kernel()
    if kernel is None:
        raise Unavailable("no kernel with 9p and vfio-pci modules in /boot")
    return run_guest(
        ["qemu-system-x86_64"],
        kernel.vmlinuz,
        debian_initramfs(kernel),
        script,
        iommu="intel-iommu,intremap=on,caching-mode=on,x-scalable-mode=on,x-pasid-mode=on",
        bind=EDU,
        devices=["-device", "edu"],
        timeout=timeout,
    )


# -- Linux 7.2 from Debian's source: the iommufd backend ------------------------------

SERVER = Path(__file__).resolve().parent / "vfio_user_server.py"
DEVICE_BITS = (20, 20, 0)  # two PASID-capable devices and one without
VFIO_USER = ("0x1b36", "0x00f0")  # vendor:device of the vfio-user devices
IOMMUFD_INITRAMFS = "initramfs-iommufd-"  # the cache file's family (initramfs_path)


@dataclass
class Prepared:
    bzimage: Path
    qemu: list[str]
    initramfs: Path
    notes: str


def _busybox_for_iommufd() -> None:
    """busybox-static and cpio, installed if missing and we may (root)."""
    if (not static_busybox() or not shutil.which("cpio")) and os.geteuid() == 0:
        apt.install("busybox-static", "cpio")
    if not static_busybox():
        raise Unavailable("needs busybox-static (/bin/busybox, not dynamic)")
    if not shutil.which("cpio"):
        raise Unavailable("needs cpio")


def prepare_iommufd(*, build: bool = True) -> Prepared:
    """Kernel, QEMU and initramfs, from the cache (building/fetching them if `build`)."""
    _check_host()
    t0 = time.monotonic()
    cached = build_kernel.cached_kernel()
    if cached is None and not build:
        raise Unavailable("no cached kernel and building is off")
    bzimage = cached or build_kernel.build_kernel()
    root = build_kernel.qemu_root()
    initramfs = initramfs_path(build_kernel.CACHE, IOMMUFD_INITRAMFS)
    if not initramfs.exists():
        _busybox_for_iommufd()
        pack_initramfs(initramfs, IOMMUFD_INITRAMFS)
    took = time.monotonic() - t0
    how = "from cache" if cached else "built"
    return Prepared(
        bzimage, build_kernel.qemu_command(root), initramfs, f"kernel {how} ({took:.0f} s)"
    )


def boot_iommufd(p: Prepared, script: Path, timeout: float = 420.0) -> Boot:
    """Start the vfio-user device servers, boot, run `script` in the guest, power off."""
    with tempfile.TemporaryDirectory(prefix="pbk-iommufd-") as tmp:
        servers = []
        devices = []
        logs = []
        for i, bits in enumerate(DEVICE_BITS):
            sock = Path(tmp) / f"dev{i}.sock"
            log = (Path(tmp) / f"dev{i}.log").open("w")
            logs.append(log)
            srv = subprocess.Popen(
                [sys.executable, str(SERVER), str(sock), str(bits)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            assert srv.stdout is not None
            srv.stdout.readline()  # "listening"
            servers.append(srv)
            spec = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(sock)}}
            devices += ["-device", json.dumps(spec)]
        trace = Path(tmp) / "trace.log"
        try:
            b = run_guest(
                p.qemu,
                p.bzimage,
                p.initramfs,
                script,
                iommu="intel-iommu,intremap=on,caching-mode=on,scalable-mode=on,pasid-bits=20",
                bind=VFIO_USER,
                devices=devices,
                extra=["-trace", "vtd_inv_desc_pasid_cache*", "-D", str(trace)],
                timeout=timeout,
            )
        finally:
            for srv in servers:
                srv.kill()
                srv.wait()
            for log in logs:
                log.close()
        b.server_logs = [(Path(tmp) / f"dev{i}.log").read_text() for i in range(len(DEVICE_BITS))]
        b.trace = trace.read_text(errors="replace") if trace.exists() else ""
    return b


if __name__ == "__main__":
    prep = prepare_iommufd()
    b = boot_iommufd(prep, ROOT / "tests" / "kernel" / "guest_iommufd.py")
    print(b.console[-6000:])
    print("trace:", b.trace[-3000:])
    print("servers:", b.server_logs)
    print(f"{b.seconds:.1f} s, status {b.returncode}")
