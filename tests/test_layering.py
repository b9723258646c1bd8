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
