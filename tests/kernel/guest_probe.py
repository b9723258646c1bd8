"""Runs INSIDE the QEMU guest (tests/kernel/vm.py boots it): the backend meets a real kernel.

Prints one `PBK {json}` line per finding on the console: the raw answers of the kernel as
the backend's probe recorded them, the backend's refusal, the daemon's refusal, and the
daemon serving on the documented fallback. The host-side test asserts on them.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tests.kernel.guest import SCRATCH, Result, emit, run_main


def edu_group() -> str:
    for dev in glob.glob("/sys/bus/pci/devices/*"):
        ids = (Path(dev, "vendor").read_text().strip(), Path(dev, "device").read_text().strip())
        if ids == ("0x1234", "0x11e8"):
            driver = (
                os.path.basename(os.readlink(f"{dev}/driver"))
                if os.path.exists(f"{dev}/driver")
                else ""
            )
            group = os.path.basename(os.readlink(f"{dev}/iommu_group"))
            emit("device", pci=os.path.basename(dev), driver=driver, iommu_group=group)
            return group
    emit("device", error="no edu device")
    return ""


def probe_backend(group: str) -> None:
    from broker.backends.vfio import VfioBackend, pasid_bits_from_ecap
    from broker.core.errors import PasidError

    ecaps = {}
    for path in sorted(glob.glob("/sys/class/iommu/*/intel-iommu/ecap")):
        value = int(Path(path).read_text(), 16)
        ecaps[path] = {"ecap": hex(value), "pasid_bits": pasid_bits_from_ecap(value)}
    emit("sysfs", ecap=ecaps, dev_vfio=sorted(os.listdir("/dev/vfio")))
    b = VfioBackend(groups=(group,))
    t0 = time.monotonic()
    try:
        caps = b.open()
        emit("backend open", ok=True, caps=caps.__dict__, probe=b.probe)
        b.close()
    except PasidError as exc:
        emit(
            "backend open",
            ok=False,
            error=type(exc).__name__,
            errno=exc.errno,
            message=exc.message,
            probe=b.probe,
            seconds=round(time.monotonic() - t0, 3),
        )


def daemon(*args: str, db: str) -> list[str]:
    return [
        sys.executable, "-m", "broker", "--db", f"{SCRATCH}/{db}.db",
        "--socket", f"{SCRATCH}/{db}.sock", "--log-format", "json", *args,
    ]  # fmt: skip


def run_refusal(group: str) -> None:
    """The daemon's own main() refusing the vfio backend this kernel cannot serve."""
    t0 = time.monotonic()
    status, stderr, _ = run_main(
        daemon("--backend", "vfio", "--vfio-group", group, db="refuse")[3:]
    )
    emit(
        "daemon refusal",
        status=status,
        stderr=stderr.strip().splitlines()[-1:],
        seconds=round(time.monotonic() - t0, 1),
    )


def run_fallback(group: str) -> None:
    """The daemon's main() asked for the documented fallback, serving a real client that
    allocates, then stops it with SIGTERM."""
    from pasid_client import Client

    t0 = time.monotonic()
    sock = f"{SCRATCH}/fallback.sock"

    def client(result: Result) -> None:
        with Client(f"unix:{sock}") as c:
            c.wait_ready(60)  # it listens before recovery is done
            info = c.info()
            with c.session("guest-vm") as s:
                result["pasids"] = list(s.alloc(1, 1023, count=2))
            result["backend"] = info.backend
            result["pasid_bits"] = info.pasid_bits

    argv = daemon("--backend", "vfio", "--vfio-group", group, "--vfio-fallback", "simulator",
                  db="fallback")[3:]  # fmt: skip
    status, stderr, result = run_main(argv, sock, client)
    lines = [line for line in stderr.splitlines() if "fallback" in line]
    emit(
        "daemon fallback",
        **result,
        status=status,
        log=lines[:3],
        seconds=round(time.monotonic() - t0, 1),
    )


def main() -> None:
    emit("guest start", kernel=os.uname().release, python=sys.version.split()[0])
    group = edu_group()
    if group:
        # One at a time: a VFIO group can be open in one place only (else EBUSY).
        probe_backend(group)
        run_refusal(group)
        run_fallback(group)


if __name__ == "__main__":
    main()
