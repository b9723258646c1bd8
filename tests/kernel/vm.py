"""A Debian kernel under QEMU (TCG) with an emulated VT-d IOMMU and a device on vfio-pci.

Everything comes from Debian packages (PACKAGES): the guest runs this host's own Python
and this checkout, read-only over 9p, so what it tests is exactly the code here. The
guest writes `PBK {json}` lines on its serial console; `boot()` returns them.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = ROOT / ".cache" / "kernel-tier"
PACKAGES = ("qemu-system-x86", "linux-image-amd64", "busybox-static", "cpio", "kmod")
# What the guest loads (dependencies come from modules.dep).
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "vfio", "vfio_iommu_type1", "vfio-pci")
EDU = ("0x1234", "0x11e8")  # QEMU's educational PCI device: a harmless thing to bind

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for x in $(cat /proc/cmdline); do
  case "$x" in
    pbk.python=*) PY="${x#pbk.python=}" ;;
    pbk.script=*) SCRIPT="${x#pbk.script=}" ;;
    pbk.scratch=*) SCRATCH="${x#pbk.scratch=}" ;;
  esac
done
for m in $(cat /modules.order); do
  insmod "/modules/$m" || echo "PBK {\"event\": \"insmod failed\", \"module\": \"$m\"}"
done
mkdir -p /host
# cache=loose: the share is read-only, and Python's imports over 9p are most of the time.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=524288 hostroot /host \
  || echo 'PBK {"event": "9p mount failed"}'
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = "EDU_VENDOR" ] && [ "$(cat $d/device)" = "EDU_DEVICE" ]; then
    echo vfio-pci > "$d/driver_override"
    echo "${d##*/}" > /sys/bus/pci/drivers_probe
  fi
done
mount -t devtmpfs dev /host/dev
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t tmpfs scratch "/host$SCRATCH"
chroot /host /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$SCRATCH" \
  TMPDIR="$SCRATCH" PYTHONDONTWRITEBYTECODE=1 PBK_SCRATCH="$SCRATCH" "$PY" "$SCRIPT"
echo "PBK {\"event\": \"guest done\", \"status\": $?}"
echo o > /proc/sysrq-trigger
sleep 30
""".replace("EDU_VENDOR", EDU[0]).replace("EDU_DEVICE", EDU[1])


class Unavailable(Exception):
    """This machine cannot run the tier; the message says why (the test skips with it)."""


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


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
    if not Path("/bin/busybox").exists() or b"ELF" not in Path("/bin/busybox").read_bytes()[:4]:
        need.append("busybox-static")
    elif _run(["ldd", "/bin/busybox"], 10).returncode == 0:
        need.append("busybox-static")  # a dynamic busybox cannot run alone in the initramfs
    if not shutil.which("cpio"):
        need.append("cpio")
    return need


def ensure_packages() -> str:
    """Install what is missing from Debian; returns what was done. Raises Unavailable."""
    if platform.machine() != "x86_64":
        raise Unavailable(f"needs an x86_64 host (this is {platform.machine()})")
    if os.environ.get("PBK_KERNEL_TIER") == "skip":
        raise Unavailable("PBK_KERNEL_TIER=skip")
    need = _missing()
    if not need:
        return "packages present"
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise Unavailable(f"missing {', '.join(need)} and cannot apt-get install (not root/Debian)")
    t0 = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    # Try without `apt-get update` first: fresh lists save CI a good part of its budget.
    r = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        for cmd in (["apt-get", "update", "-qq"], install):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            if r.returncode != 0:
                err = r.stderr.strip()[-500:]
                raise Unavailable(f"{' '.join(cmd)} failed ({r.returncode}): {err}")
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


def build_initramfs(kernel: Kernel) -> Path:
    """busybox + the modules + /init, cached by kernel version and /init's text."""
    key = hashlib.sha256(f"{kernel.version}\n{INIT}\n{MODULES}".encode()).hexdigest()[:16]
    out = CACHE / f"initramfs-{kernel.version}-{key}.cpio"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tree = CACHE / f"tree-{key}"
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "proc", "sys", "dev", "modules", "host"):
        (tree / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", tree / "bin" / "busybox")
    names = []
    for rel in _load_order(kernel):
        src = kernel.modules / rel
        name = Path(rel).name
        if name.endswith(".ko.xz"):
            data = lzma.decompress(src.read_bytes())
            name = name.removesuffix(".xz")
        elif name.endswith(".ko"):
            data = src.read_bytes()
        else:
            raise Unavailable(f"cannot unpack module {rel} (only .ko and .ko.xz)")
        (tree / "modules" / name).write_bytes(data)
        names.append(name)
    (tree / "modules.order").write_text("\n".join(names) + "\n")
    init = tree / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    files = subprocess.run(
        ["find", "."], cwd=tree, capture_output=True, text=True, check=True
    ).stdout
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=tree,
            input=files.encode(),
            stdout=f,
            check=True,
        )
    tmp.rename(out)
    shutil.rmtree(tree, ignore_errors=True)
    return out


@dataclass
class Boot:
    seconds: float
    returncode: int | None
    console: str
    results: list[dict[str, object]]


def boot(script: Path, timeout: float = 150.0) -> Boot:
    """Boot the guest, run `script` with this host's Python inside it, power off."""
    kernel = find_kernel()
    if kernel is None:
        raise Unavailable("no kernel with 9p and vfio-pci modules in /boot")
    initrd = build_initramfs(kernel)
    scratch = "/mnt" if str(ROOT).startswith("/tmp/") or str(ROOT) == "/tmp" else "/tmp"
    append = (
        "console=ttyS0 intel_iommu=on,sm_on panic=-1 quiet"
        f" pbk.python={sys.executable} pbk.script={script} pbk.scratch={scratch}"
    )
    cmd = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-machine", "q35,kernel-irqchip=split",
        "-m", "1024",
        "-smp", "2",
        "-device", "intel-iommu,intremap=on,caching-mode=on,x-scalable-mode=on,x-pasid-mode=on",
        "-device", "edu",
        "-vga", "none",
        "-nic", "none",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initrd),
        "-append", append,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
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
    results = []
    for line in console.splitlines():
        if line.startswith("PBK "):
            try:
                results.append(json.loads(line[4:]))
            except json.JSONDecodeError:
                results.append({"event": "unparsed", "line": line})
    return Boot(time.monotonic() - t0, code, console, results)
