"""apt-get for the tests that install Debian packages: one place, one lock policy.

Tiers that need packages (QEMU, a kernel's build tools, Prometheus, systemd-container,
buildah) install them from the test command itself. Two installs at once (another tier,
unattended-upgrades, a developer's shell) used to fail at once on dpkg's lock and skip
the tier ("Could not get lock /var/lib/dpkg/lock-frontend"); every call here waits for
the lock instead (DPkg::Lock::Timeout), up to LOCK_WAIT seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess

LOCK_WAIT = 600


def apt_get(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run `apt-get ARGS` non-interactively, waiting for dpkg's lock; never raises."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_WAIT}", *args]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {exc.timeout:.0f} s")


def cannot_install() -> str:
    """Why this process cannot install packages; '' when it can."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install"
    return ""


def install(*packages: str) -> str:
    """Install `packages` (no recommends); '' on success, else why not. The package lists
    are refreshed once only if the first try fails: fresh lists save CI a good part of its
    budget."""
    why = cannot_install()
    if why:
        return why
    args = ("install", "-y", "-qq", "--no-install-recommends", *packages)
    r = apt_get(*args)
    if r.returncode != 0:
        apt_get("update", "-qq", timeout=600)
        r = apt_get(*args)
    if r.returncode == 0:
        return ""
    last = (r.stderr or r.stdout).strip()[-300:]
    return f"apt-get install {' '.join(packages)} failed ({r.returncode}): {last}"
