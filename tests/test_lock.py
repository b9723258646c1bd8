"""constraints-dev.txt (`make lock`) must agree with what the project declares.

Every dependency that pyproject.toml (with its dev extras) and clients/pyproject.toml
declare is pinned in the lock at a version its specifier admits, and every runtime pin of
constraints.txt (the image's and host installs') is the lock's too: CI tests what ships.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def pins(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = version
    return out


def declared() -> list[tuple[str, Requirement]]:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    reqs = [("pyproject.toml", r) for r in root["dependencies"]]
    reqs += [("pyproject.toml [dev]", r) for r in root["optional-dependencies"]["dev"]]
    reqs += [("clients/pyproject.toml", r) for r in client["dependencies"]]
    return [(where, Requirement(r)) for where, r in reqs]


def test_every_declared_dependency_is_pinned_within_its_specifier() -> None:
    lock = pins(ROOT / "constraints-dev.txt")
    own = {"pasid-client", "pasid-broker"}
    wrong = []
    for where, req in declared():
        name = canonicalize_name(req.name)
        if name in own:
            continue
        if name not in lock:
            wrong.append(f"{where}: {req} is not in constraints-dev.txt")
        elif not req.specifier.contains(lock[name], prereleases=True):
            wrong.append(f"{where}: {req} does not admit the lock's {name}=={lock[name]}")
    assert wrong == [], "run `make lock`:\n" + "\n".join(wrong)


def test_runtime_pins_are_the_locks() -> None:
    lock = pins(ROOT / "constraints-dev.txt")
    runtime = pins(ROOT / "constraints.txt")
    runtime.pop("setuptools", None)  # the wheel's build backend: not in a venv's freeze
    differ = {n: (v, lock.get(n)) for n, v in runtime.items() if lock.get(n) != v}
    assert differ == {}, f"constraints.txt vs constraints-dev.txt (name: (runtime, lock)): {differ}"


def test_the_environment_is_the_lock() -> None:
    """The venv running this suite was installed from the lock (`make test` does)."""
    from importlib.metadata import version

    lock = pins(ROOT / "constraints-dev.txt")
    for name in ("grpcio", "grpcio-tools", "protobuf", "sqlalchemy", "pytest"):
        assert version(name) == lock[name], f"{name} {version(name)} is not the lock's"
