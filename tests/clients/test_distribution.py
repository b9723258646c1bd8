"""The two distributions, built and installed as a user would: a VMM sidecar that installs
pasid-client gets the library and pasidctl, and none of the server's dependencies.

The wheels are built from this checkout without build isolation (the dev venv's
setuptools); the clean venv resolves grpcio and protobuf through pip's own configuration
and cache, as `pip install pasid-client` would.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import subprocess
import sys
import tempfile
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

from tests.harness import ROOT

# What a sidecar must not get: the server's store, migrations, templates and metrics.
SERVER_ONLY = {"sqlalchemy", "alembic", "mako", "prometheus-client", "sortedcontainers"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# setuptools builds in the project's own build/ and *.egg-info: two builds of this
# checkout at once (these tests run on several workers) collided there once, "[Errno 17]
# File exists: 'build/bdist.linux-x86_64/wheel/pasid_broker-0.1.0.dist-info'".
_BUILD_LOCK = Path(tempfile.gettempdir()) / (
    f"pasid-checkout-build-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}.lock"
)


@contextlib.contextmanager
def _building_in_checkout() -> Iterator[None]:
    """One build (or metadata preparation) in this checkout at a time."""
    with open(_BUILD_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_wheel(project: Path, out: Path) -> Path:
    with _building_in_checkout():
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


# -- installing the two together, never a same-named client from an index (issue 21) ---

CONSTRAINTS = ROOT / "constraints.txt"


def _stub_wheel(into: Path, name: str, version: str, module: str = "") -> Path:
    """A wheel with metadata only (plus one module, when named): what an index would offer
    under that name. The tests run offline (--no-index), with these standing in for the
    public index: the server's dependencies at their pinned versions, and a squatter."""
    dist = f"{name.replace('-', '_')}-{version}"
    wheel = into / f"{dist}-py3-none-any.whl"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    if module:
        files[f"{module}.py"] = "SQUATTER = True\n"
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{dist}.dist-info/RECORD", "".join(f"{p},,\n" for p in [*files, "RECORD"]))
    return wheel


def _fake_index(into: Path) -> Path:
    """Every runtime dependency of pasid-broker at its constraints.txt pin, and a
    `pasid-client 0.1.0` that is not ours (it carries a `squatter` module)."""
    for line in CONSTRAINTS.read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if version and _norm(name) != "setuptools":
            _stub_wheel(into, name, version)
    _stub_wheel(into, "pasid-client", "0.1.0", module="squatter")
    return into


def _pip(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """pip in the checkout; one naming its projects ("." or "./clients") builds their
    metadata there, so it takes the build lock."""
    local = {".", "./clients"}.intersection(args)
    with _building_in_checkout() if local else contextlib.nullcontext():
        return subprocess.run(
            [python, "-m", "pip", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
        )


def _resolved(report: Path) -> dict[str, dict[str, str]]:
    """pip --report's choices: name -> version and where it came from."""
    out = {}
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        out[_norm(meta["name"])] = {"version": meta["version"], "url": item["download_info"]["url"]}
    return out


@pytest.mark.timeout(300)
def test_pip_install_dot_alone_never_takes_a_same_named_client_from_an_index(
    tmp_path: Path,
) -> None:
    index = _fake_index(tmp_path / "index")
    # The threat is real here: a requirement without the local label takes the squatter.
    r = _pip("install", "--dry-run", "--ignore-installed", "--no-index", "--find-links",
             str(index), "--report", str(tmp_path / "r0.json"), "pasid-client==0.1.0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _resolved(tmp_path / "r0.json")["pasid-client"]["version"] == "0.1.0"
    # pasid-broker alone: its exact pin (0.1.0+local) is one no public index can hold
    # (PyPI refuses local versions), so the install fails instead of taking the squatter.
    r = _pip("install", "--dry-run", "--ignore-installed", "--no-index", "--find-links",
             str(index), "--no-build-isolation", "--constraint", str(CONSTRAINTS), ".")  # fmt: skip
    assert r.returncode != 0, r.stdout
    assert "pasid-client==0.1.0+local" in r.stderr, r.stderr
    assert "No matching distribution found" in r.stderr, r.stderr


@pytest.mark.timeout(300)
def test_the_documented_installs_take_the_client_from_this_checkout(tmp_path: Path) -> None:
    """docs/install.md's two ways, offline, beside the squatter: from source in one
    command (`pip install ./clients .`), and from the wheels (--no-index --find-links)."""
    index = _fake_index(tmp_path / "index")
    report = tmp_path / "source.json"
    r = _pip("install", "--dry-run", "--ignore-installed", "--no-index", "--find-links",
             str(index), "--no-build-isolation", "--constraint", str(CONSTRAINTS),
             "--report", str(report), "./clients", ".")  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = _resolved(report)
    assert got["pasid-client"]["version"] == "0.1.0+local"
    assert got["pasid-client"]["url"] == (ROOT / "clients").as_uri(), got["pasid-client"]

    # The wheels, as step 1 builds them, installed as step 2 does, into a clean venv.
    dist = tmp_path / "dist"
    client = _build_wheel(ROOT / "clients", tmp_path / "w1")
    server = _build_wheel(ROOT, tmp_path / "w2")
    dist.mkdir()
    for w in (*index.iterdir(), client, server):
        (dist / w.name).write_bytes(w.read_bytes())
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    py = str(env / "bin" / "python")
    wheels = [str(dist / client.name), str(dist / server.name)]
    r = _pip("install", "-q", "--no-index", "--find-links", str(dist), "--constraint",
             str(CONSTRAINTS), *wheels, python=py)  # fmt: skip
    assert r.returncode == 0, r.stderr
    listed = _pip("list", "--format=json", python=py)
    versions = {_norm(p["name"]): p["version"] for p in json.loads(listed.stdout)}
    assert versions["pasid-client"] == "0.1.0+local"
    assert (
        versions["pasid-broker"]
        == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    )
    probe = subprocess.run(
        [py, "-c", "import importlib.util; print(importlib.util.find_spec('squatter'))"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert probe.stdout.strip() == "None", "the squatting pasid-client was installed"
