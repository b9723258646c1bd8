"""Regenerate the Python code for proto/pasid/v1/*.proto (grpcio-tools + mypy-protobuf).

Usage: python tools/genproto.py [OUTDIR]   (default: proto/, next to the .proto files)
The test tests/test_proto_fresh.py runs this into a temp dir and fails if the committed
code differs, so a stale checkout cannot pass.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out: Path) -> None:
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.glob("pasid/v1/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
    ]
    if shutil.which("protoc-gen-mypy", path=str(bindir)):
        args += [
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
        ]
    rc = protoc.main([*args, *sources])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR)
