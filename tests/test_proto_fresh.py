"""The committed generated code must be what `make proto` would write now."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "proto" / "pasid" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "genproto.py"), str(tmp_path)], check=True, cwd=ROOT
    )
    fresh = sorted(p.name for p in (tmp_path / "pasid" / "v1").iterdir())
    committed = sorted(p.name for p in GEN.iterdir() if "_pb2" in p.name)
    assert fresh == committed
    stale = [
        n for n in fresh if not filecmp.cmp(tmp_path / "pasid" / "v1" / n, GEN / n, shallow=False)
    ]
    assert stale == [], f"stale generated code: {stale}; run `make proto`"
