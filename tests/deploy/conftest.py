"""Debian's Prometheus for the deploy/ tests: installed on demand, like the kernel tier.

If `prometheus` / `promtool` are missing and we are root with apt-get, the package is
installed (no recommends, services are not started). Where that cannot happen the tests
skip, and the reason is printed so that a green run does not hide what was not tested.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class PrometheusTools:
    prometheus: str
    promtool: str


def _apt_install(package: str) -> str:
    """Install `package` with apt-get; '' on success, else why not."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    last = ""
    for attempt in range(2):
        if attempt == 1:  # stale or missing package lists: refresh once
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode == 0:
            return ""
        last = (r.stderr or r.stdout).strip()
    return f"apt-get install {package} failed: {last[-300:]}"


def find_or_install() -> PrometheusTools | str:
    """The tools, installing Debian's package if needed; else the reason they are missing."""
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if prom is None or tool is None:
        why = _apt_install("prometheus")
        prom, tool = shutil.which("prometheus"), shutil.which("promtool")
        if prom is None or tool is None:
            return f"Debian's prometheus is not available: {why or 'not on PATH after install'}"
    return PrometheusTools(prom, tool)


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    found = find_or_install()
    if isinstance(found, str):
        print(f"\nSKIP: {found}")
        pytest.skip(found)
    return found
