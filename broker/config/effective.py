"""--print-config: the effective settings and where each came from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.config.options import OPTIONS
from broker.config.settings import Config


@dataclass(frozen=True)
class Loaded:
    """The effective settings and where each came from ('flag', 'env NAME', 'file PATH',
    'default')."""

    config: Config
    sources: Mapping[str, str]
    config_file: str
    print_config: str = ""  # '', 'text' or 'json'

    def describe(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for o in OPTIONS:
            v = getattr(self.config, o.name)
            shown: Any = o.show(v) if o.show else v
            out[o.name] = {"value": shown, "source": self.sources[o.name]}
        return out

    def render(self, fmt: str) -> str:
        rows = self.describe()
        if fmt == "json":
            return json.dumps({"config_file": self.config_file or None, "settings": rows})
        width = max(len(n) for n in rows)
        vwidth = max(len(str(r["value"])) for r in rows.values())
        head = f"# config file: {self.config_file or '(none)'}; precedence flag > env > file"
        lines = [head] + [
            f"{n:<{width}}  {r['value']!s:<{vwidth}}  {r['source']}" for n, r in rows.items()
        ]
        return "\n".join(lines)
