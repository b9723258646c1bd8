"""The two distributions, built and installed as a user would: a VMM sidecar that installs
pasid-client gets the library and pasidctl, and none of the server's dependencies.

The wheels are built from this checkout without build isolation (the dev venv's
setuptools); the clean venv resolves grpcio and protobuf through pip's own configuration
and cache, as `pip install pasid-client` would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.harness import ROOT

# What a sidecar must not get: the server's store, migrations, templates and metrics.
SERVER_ONLY = {"sqlalchemy", "alembic", "mako", "prometheus-client", "sortedcontainers"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _build_wheel(project: Path, out: Path) -> Path:
    r = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("-w", str(out), str(project)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def _metadata(wheel: Path) -> dict[str, list[str]]:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        msg = Parser().parsestr(z.read(name).decode())
    return {"Name": msg.get_all("Name") or [], "Requires-Dist": msg.get_all("Requires-Dist") or []}


@pytest.mark.timeout(300)
def test_pip_install_pasid_client_pulls_no_server_dependency(tmp_path: Path) -> None:
    wheel = _build_wheel(ROOT / "clients", tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/", 1)[0] for n in z.namelist() if not n.startswith("pasid_client-")}
        assert "pasid/v1/broker.proto" in z.namelist()
    assert tops == {"pasid", "pasid_client"}, tops
    requires = {
        _norm(r.split(">")[0].split("=")[0].split(";")[0].strip())
        for r in _metadata(wheel)["Requires-Dist"]
    }
    assert requires == {"grpcio", "protobuf", "grpcio-health-checking"}, requires

    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    py, bindir = env / "bin" / "python", env / "bin"
    r = subprocess.run(
        # The wheel file itself: never a same-named distribution from an index.
        [str(py), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    installed = {_norm(p["name"]) for p in json.loads(listed.stdout)}
    assert "pasid-client" in installed
    assert not installed & SERVER_ONLY, sorted(installed & SERVER_ONLY)

    # The command and the library work there; the server's package is not there at all.
    # (cwd is the temp dir, so the checkout's own packages cannot be imported by accident.)
    h = subprocess.run(
        [str(bindir / "pasidctl"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert h.returncode == 0 and "usage: pasidctl" in h.stdout, h.stderr
    probe = (
        "import importlib.util, pasid_client, pasid.v1.broker_pb2_grpc;"
        "from pasid_client import Client, AsyncClient;"
        "print(pasid_client.__file__, importlib.util.find_spec('broker'),"
        " importlib.util.find_spec('sqlalchemy'))"
    )
    i = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert i.returncode == 0, i.stderr
    where, broker_spec, sqlalchemy_spec = i.stdout.split()
    assert where.startswith(str(env)), where
    assert broker_spec == "None" and sqlalchemy_spec == "None", i.stdout


def test_pasid_broker_wheel_holds_the_server_only_and_requires_the_client(
    tmp_path: Path,
) -> None:
    wheel = _build_wheel(ROOT, tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/", 1)[0] for n in z.namelist() if ".dist-info/" not in n}
        entry_points = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
        scripts = z.read(entry_points).decode()
    # Two distributions never ship the same file: pip would let one clobber the other.
    assert tops == {"broker"}, tops
    # Every module of the server is in it (a package left out of pyproject is not).
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.endswith(".py")}
    sources = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "broker").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources - shipped == set()
    assert "pasid-broker =" in scripts and "pasidctl" not in scripts
    meta = _metadata(wheel)
    assert meta["Name"] == ["pasid-broker"]
    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    assert f"pasid-client=={client['version']}" in meta["Requires-Dist"]
