"""Debian's Prometheus for the deploy/ tests: installed on demand, like the kernel tier.

If `prometheus` / `promtool` are missing and we are root with apt-get, the package is
installed (no recommends, services are not started). Where that cannot happen the tests
skip, and the reason is printed so that a green run does not hide what was not tested.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest

from tests import apt


@dataclass(frozen=True)
class PrometheusTools:
    prometheus: str
    promtool: str


def _apt_install(package: str) -> str:
    """Install `package` with apt-get; '' on success, else why not."""
    return apt.install(package)


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
