"""The dashboard against Grafana's own schema: @grafana/schema's `Dashboard` type.

No Grafana server can be installed here (not in Debian, and PyPI's "grafana" is a
placeholder), but Grafana publishes its dashboard model as TypeScript types on npm. The
dashboard is written out as an object literal that `satisfies` that type, so tsc checks
every field's type, every enum value and every unknown property, as Grafana's model
defines them. npm, @grafana/schema and typescript are installed by this test into
.cache/; where that is impossible it skips and says why.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT

CACHE = ROOT / ".cache" / "grafana-schema"
PACKAGES = ("@grafana/schema@13.2.3", "typescript@5.9.3")
DASHBOARD = ROOT / "deploy" / "grafana" / "pasid-broker.json"

# JSON carries a string enum's value ("absolute"), which TypeScript's enum types refuse as
# a literal: check against the same type with each string enum as its literal values.
PRELUDE = """import type { Dashboard } from "@grafana/schema";

type Json<T> = T extends string
  ? `${T}`
  : T extends (infer U)[]
    ? Json<U>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

export const dashboard = """


@pytest.fixture(scope="module")
def tsc() -> Path:
    """tsc with @grafana/schema beside it, installed once into .cache/. Under a lock:
    pytest-xdist workers may ask at once, and a half-done install looks installed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE.parent / "grafana-schema.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _install_tsc()


def _install_tsc() -> Path:
    binary = CACHE / "node_modules" / ".bin" / "tsc"
    done = CACHE / ".installed"
    if binary.exists() and done.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        reason = "npm is not installed: cannot fetch @grafana/schema to check the dashboard"
        print(f"[grafana schema] SKIP: {reason}")
        pytest.skip(reason)
    r = subprocess.run(
        [npm, "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", *PACKAGES],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if r.returncode != 0 or not binary.exists():
        reason = f"npm install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-300:]}"
        print(f"[grafana schema] SKIP: {reason}")
        pytest.skip(reason)
    done.touch()
    return binary


def check(tsc: Path, dashboard: dict[str, Any], name: str) -> subprocess.CompletedProcess[str]:
    """tsc's verdict on `dashboard` as Grafana's Dashboard. `__inputs`/`__requires` are the
    export format's import prompts, outside the dashboard model, so they are left out."""
    model = {k: v for k, v in dashboard.items() if not k.startswith("__")}
    src = CACHE / f"{name}.ts"
    src.write_text(PRELUDE + json.dumps(model, indent=2) + " satisfies Json<Dashboard>;\n")
    return subprocess.run(
        [str(tsc), "--noEmit", "--strict", "--skipLibCheck", "--module", "esnext",
         "--moduleResolution", "bundler", "--target", "es2020", str(src)],
        capture_output=True, text=True, cwd=CACHE, timeout=120,
    )  # fmt: skip


def test_dashboard_satisfies_grafanas_dashboard_model(tsc: Path) -> None:
    r = check(tsc, json.loads(DASHBOARD.read_text()), "pasid-broker")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_check_catches_a_broken_dashboard(tsc: Path) -> None:
    """A misspelled panel field and an enum value Grafana does not have must fail."""
    d = json.loads(DASHBOARD.read_text())
    d["panels"][0]["titel"] = d["panels"][0].pop("title")
    r = check(tsc, d, "broken-field")
    assert r.returncode != 0 and "titel" in r.stdout, r.stdout
    d = json.loads(DASHBOARD.read_text())
    d["graphTooltip"] = "sometimes"
    r = check(tsc, d, "broken-value")
    assert r.returncode != 0 and "DashboardCursorSync" in r.stdout, r.stdout  # graphTooltip
