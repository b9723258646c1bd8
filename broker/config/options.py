"""Each setting as the outside world spells it, derived from its Config field's name: the
flag (--quota-per-set), the variable (PASID_BROKER_QUOTA_PER_SET), the file key
(quota_per_set), and an older alias of all three."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from broker.config.settings import Config
from broker.config.values import Parse

ENV_PREFIX = "PASID_BROKER_"


@dataclass(frozen=True)
class Option:
    """One setting as the outside world spells it, derived from a Config field."""

    name: str  # the Config field, also the file key
    parse: Parse
    help: str
    unit: str
    metavar: str | None
    show: Callable[[Any], str] | None
    default: Any
    alias: str = ""
    kind: str = "value"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def envs(self) -> tuple[str, ...]:
        """Its variable, then its old name's."""
        return (self.env, *((ENV_PREFIX + self.alias.upper(),) if self.alias else ()))


OPTIONS: tuple[Option, ...] = tuple(
    Option(
        f.name,
        f.metadata["parse"],
        f.metadata["help"],
        f.metadata["unit"],
        f.metadata["metavar"],
        f.metadata["show"],
        f.default,
        f.metadata["alias"],
        f.metadata["kind"],
    )
    for f in fields(Config)
)
BY_NAME = {o.name: o for o in OPTIONS}
ALIASES = {o.alias: o.name for o in OPTIONS if o.alias}
