"""broker/peer reads the kernel and keeps tickets; it knows no gRPC (docs/peer-identity.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PEER = Path(__file__).resolve().parents[2] / "broker" / "peer"


def test_peer_package_imports_no_grpc() -> None:
    offenders = []
    for path in sorted(PEER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("grpc",)]
    assert offenders == []
    assert {p.name for p in PEER.glob("*.py")} >= {"credentials.py", "tickets.py", "handshake.py"}
