"""The iommufd tier's guest: our kernel, sid's QEMU 11, VT-d in scalable mode, and three
vfio-user devices served by tests/kernel/vfio_user_server.py (two with a 20-bit PASID
capability, one without), all bound to vfio-pci by /init.

Like vm.py (whose busybox/9p/`PBK {json}` machinery this mirrors), the guest runs this
host's Python on this checkout over a read-only 9p share. The kernel and QEMU come from
build_kernel.py's cache outside the checkout; `prepare()` raises Unavailable with the
reason when they cannot be had (no cache and no network/root, or not x86_64).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.kernel import build_kernel
from tests.kernel.build_kernel import Unavailable

ROOT = Path(__file__).resolve().parent.parent.parent
SERVER = Path(__file__).resolve().parent / "vfio_user_server.py"
DEVICE_BITS = (20, 20, 0)  # two PASID-capable devices and one without

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
  esac
done
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = "0x1b36" ] && [ "$(cat $d/device)" = "0x00f0" ]; then
    echo vfio-pci > "$d/driver_override"
    echo "${d##*/}" > /sys/bus/pci/drivers_probe
  fi
done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=524288 hostroot /host \
  || echo 'PBK {"event": "9p mount failed"}'
mount -t devtmpfs dev /host/dev
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t debugfs debugfs /host/sys/kernel/debug
mount -t tmpfs scratch "/host$SCRATCH"
chroot /host /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$SCRATCH" \
  TMPDIR="$SCRATCH" PYTHONDONTWRITEBYTECODE=1 PBK_SCRATCH="$SCRATCH" "$PY" "$SCRIPT"
echo "PBK {\"event\": \"guest done\", \"status\": $?}"
echo o > /proc/sysrq-trigger
sleep 30
"""


@dataclass
class Prepared:
    bzimage: Path
    qemu: list[str]
    initramfs: Path
    notes: str


@dataclass
class Boot:
    seconds: float
    returncode: int | None
    console: str
    results: list[dict[str, object]]
    trace: str
    server_logs: list[str]


def _busybox() -> Path:
    bb = Path("/bin/busybox")
    if (not bb.exists() or not shutil.which("cpio")) and os.geteuid() == 0:
        subprocess.run(
            [
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "busybox-static",
                "cpio",
            ],
            capture_output=True,
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if not bb.exists():
        raise Unavailable("needs busybox-static (/bin/busybox)")
    r = subprocess.run(["ldd", str(bb)], capture_output=True, text=True, check=False)
    if r.returncode == 0 and "not a dynamic" not in (r.stdout + r.stderr):
        raise Unavailable("/bin/busybox is dynamic; needs busybox-static")
    return bb


def build_initramfs() -> Path:
    key = hashlib.sha256(INIT.encode()).hexdigest()[:16]
    out = build_kernel.CACHE / f"initramfs-iommufd-{key}.cpio"
    if out.exists():
        return out
    bb = _busybox()
    if not shutil.which("cpio"):
        raise Unavailable("needs cpio")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "host"):
            (tree / d).mkdir()
        shutil.copy2(bb, tree / "bin" / "busybox")
        (tree / "init").write_text(INIT)
        (tree / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=tree, capture_output=True, text=True).stdout
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
    return out


def prepare(*, build: bool = True) -> Prepared:
    """Kernel, QEMU and initramfs, from the cache (building/fetching them if `build`)."""
    if platform.machine() != "x86_64":
        raise Unavailable(f"needs an x86_64 host (this is {platform.machine()})")
    if os.environ.get("PBK_KERNEL_TIER") == "skip":
        raise Unavailable("PBK_KERNEL_TIER=skip")
    t0 = time.monotonic()
    cached = build_kernel.cached_kernel()
    if cached is None and not build:
        raise Unavailable("no cached kernel and building is off")
    bzimage = cached or build_kernel.build_kernel()
    root = build_kernel.qemu_root()
    initramfs = build_initramfs()
    took = time.monotonic() - t0
    how = "from cache" if cached else "built"
    return Prepared(
        bzimage, build_kernel.qemu_command(root), initramfs, f"kernel {how} ({took:.0f} s)"
    )


def boot(p: Prepared, script: Path, timeout: float = 240.0) -> Boot:
    """Start the device servers, boot, run `script` in the guest, power off."""
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
        scratch = "/mnt" if str(ROOT).startswith("/tmp/") else "/tmp"
        append = (
            "console=ttyS0 intel_iommu=on,sm_on panic=-1 quiet"
            f" pbk.python={sys.executable} pbk.script={script} pbk.scratch={scratch}"
        )
        cmd = [
            *p.qemu,
            "-accel", "tcg",
            "-machine", "q35,kernel-irqchip=split",
            "-m", "1024",
            "-smp", "2",
            "-device", "intel-iommu,intremap=on,caching-mode=on,scalable-mode=on,pasid-bits=20",
            *devices,
            "-vga", "none",
            "-nic", "none",
            "-kernel", str(p.bzimage),
            "-initrd", str(p.initramfs),
            "-append", append,
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-trace", "vtd_inv_desc_pasid_cache*",
            "-D", str(trace),
            "-nographic", "-no-reboot",
        ]  # fmt: skip
        t0 = time.monotonic()
        try:
            r = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, errors="replace"
            )
            code: int | None = r.returncode
            console = r.stdout + r.stderr
        except subprocess.TimeoutExpired as exc:
            code = None
            out = exc.stdout or b""
            console = out.decode(errors="replace") if isinstance(out, bytes) else out
        seconds = time.monotonic() - t0
        for srv in servers:
            srv.kill()
            srv.wait()
        for log in logs:
            log.close()
        server_logs = [(Path(tmp) / f"dev{i}.log").read_text() for i in range(len(DEVICE_BITS))]
        trace_text = trace.read_text(errors="replace") if trace.exists() else ""
    results = []
    for line in console.splitlines():
        at = line.find("PBK {")  # the first may follow the firmware's escape codes
        if at >= 0:
            line = line[at:]
            try:
                results.append(json.loads(line[4:]))
            except json.JSONDecodeError:
                results.append({"event": "unparsed", "line": line})
    return Boot(seconds, code, console, results, trace_text, server_logs)


if __name__ == "__main__":
    prep = prepare()
    b = boot(prep, ROOT / "tests" / "kernel" / "guest_iommufd.py")
    print(b.console[-6000:])
    print("trace:", b.trace[-3000:])
    print("servers:", b.server_logs)
    print(f"{b.seconds:.1f} s, status {b.returncode}")
