"""Where Prometheus cannot be installed, the tests say why instead of passing silently."""

from __future__ import annotations

import pytest

from tests import apt
from tests.deploy import conftest


def test_missing_prometheus_without_apt_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apt.shutil, "which", lambda name: None)
    monkeypatch.setattr(apt.os, "geteuid", lambda: 1000)
    assert conftest.find_or_install() == (
        "Debian's prometheus is not available: no apt-get on this machine"
    )


def test_missing_prometheus_not_root_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = apt.shutil.which
    monkeypatch.setattr(
        apt.shutil, "which", lambda name: real_which(name) if name == "apt-get" else None
    )
    monkeypatch.setattr(apt.os, "geteuid", lambda: 1000)
    if real_which("apt-get") is None:
        pytest.skip("no apt-get here; the other test covers this machine")
    assert conftest.find_or_install() == (
        "Debian's prometheus is not available: not root, cannot apt-get install"
    )
