"""The core must not know its transport or its store (STYLE.md: a core that knows no transport)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "broker" / "core"
FORBIDDEN = ("grpc", "sqlalchemy", "sqlite3", "asyncio", "pasid")


def test_core_imports_neither_grpc_nor_sqlalchemy() -> None:
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
    assert list(CORE.rglob("*.py")), "core has no modules?"


def _imports(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_engine_and_core_import_no_metrics() -> None:
    # Metrics observe the engine (broker/engine/observers.py); the engine never calls them.
    broker = CORE.parent
    offenders = [
        f"{p.relative_to(broker)}: {m}"
        for d in ("core", "engine")
        for p in sorted((broker / d).rglob("*.py"))
        for m in _imports(p)
        if m.split(".")[:2] == ["broker", "metrics"] or m.startswith("prometheus_client")
    ]
    assert offenders == []


def test_production_code_carries_no_test_faults() -> None:
    # Test faults reach a daemon only through tests/faults/launch.py.
    broker = CORE.parent
    offenders = [
        str(p.relative_to(broker))
        for p in sorted(broker.rglob("*.py"))
        for word in ("ack_before_commit", "TEST_FAULTS", "vfio-fake", "tests.")
        if word in p.read_text()
    ]
    assert offenders == []
