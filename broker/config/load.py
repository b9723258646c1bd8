"""Reading the settings: flags, PASID_BROKER_* variables and the --config TOML file, in
that precedence over the defaults; every value checked by its parser. A refusal is
`ConfigError`: one line naming the nearest valid spelling."""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from broker import __version__
from broker.config.effective import Loaded
from broker.config.options import ALIASES, BY_NAME, ENV_PREFIX, OPTIONS
from broker.config.settings import Config
from broker.config.values import socket_path

CONFIG_ENV = ENV_PREFIX + "CONFIG"
# PASID_BROKER_* variables that other programs read; the daemon leaves them alone. A
# program that runs the daemon's main in its own process may add its own (the tests'
# launcher does); any other unknown PASID_BROKER_* variable refuses the start.
FOREIGN_ENV: dict[str, str] = {
    ENV_PREFIX + "ADDRESS": "pasidctl's broker address",
}


class ConfigError(Exception):
    """A setting the daemon refuses; the message is the one line printed before exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the nearest flag, exit 2."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            known = [s for a in self._actions for s in a.option_strings]
            for u in unknown:
                near = difflib.get_close_matches(u.split("=")[0], known, n=1)
                if near:
                    message += f" (did you mean {near[0]}?)"
                    break
        raise ConfigError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pasid-broker",
        allow_abbrev=False,
        description=(
            "Arbitrate this host's system-wide PCIe PASID namespace over gRPC. Each client session "
            "owns one ioasid_set; PASIDs it did not free are freed when its holder process exits "
            "or releases it (set-destroy-on-exit); a kernel-verified holder's set outlives a "
            "broken connection and a broker restart. Every allocation is durable in SQLite before "
            "it is acknowledged. Every setting is a flag, a PASID_BROKER_* environment variable "
            "(shown in brackets) and a key of the --config TOML file; precedence: flag > "
            "environment > file > default. Subcommands: 'pasid-broker backup DEST' (online copy of "
            "the database), 'pasid-broker restore SOURCE' (while stopped), 'pasid-broker health' "
            "(exit 0 when SERVING)."
        ),
        epilog="Exit status: 0 after a clean stop, 2 if it cannot start (one line on stderr).",
    )
    p.add_argument("--version", action="version", version=f"pasid-broker {__version__}")
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML file of settings (keys as below, e.g. quota_per_set = 100) [{CONFIG_ENV}]",
    )
    p.add_argument(
        "--print-config",
        nargs="?",
        const="text",
        choices=("text", "json"),
        help="print the effective settings and where each came from, then exit",
    )
    for o in OPTIONS:
        shown = (o.show or str)(o.default) if o.default not in ("", ()) else "''"
        unit = f"; {o.unit}" if o.unit else ""
        flags = [o.flag] + (["--" + o.alias.replace("_", "-")] if o.alias else [])
        helptext = f"{o.help} (default {shown}{unit}) [{', '.join(o.envs)}]".replace("%", "%%")
        if o.kind == "switch":
            p.add_argument(
                *flags, dest=o.name, action="store_const", const=True, default=None, help=helptext
            )
        else:
            p.add_argument(
                *flags,
                dest=o.name,
                metavar=o.metavar or o.name.upper(),
                default=None,
                action="append" if o.kind == "repeat" else "store",
                help=helptext,
            )
    return p


def _nearest(name: str, known: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean {near[0]}?)" if near else ""


def _check_env(env: Mapping[str, str]) -> None:
    known = [e for o in OPTIONS for e in o.envs] + [CONFIG_ENV, *FOREIGN_ENV]
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            raise ConfigError(f"unknown environment variable {name}{_nearest(name, known)}")


def read_file(file: str) -> dict[str, object]:
    """The TOML file's settings by field name; unknown keys are refused."""
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file}: not TOML: {exc}") from None
    out: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in BY_NAME:
            raise ConfigError(
                f"config file {file}: unknown key {key!r}{_nearest(name, list(BY_NAME))}"
            )
        out[name] = value
    return out


def load_full(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Loaded:
    """Read flags, environment and file; check every value. Raises ConfigError."""
    env = os.environ if env is None else env
    # Flags first: --help and --version must work whatever the environment holds.
    ns = build_parser().parse_args(argv)
    _check_env(env)
    config_file = ns.config or env.get(CONFIG_ENV, "")
    from_file = read_file(config_file) if config_file else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for o in OPTIONS:
        flag_value = getattr(ns, o.name)
        named = [e for e in o.envs if e in env]
        if flag_value is not None:
            raw, where, label = flag_value, "flag", f"{o.flag} {flag_value!r}"
        elif named:
            raw, where = env[named[0]], f"env {named[0]}"
            label = f"{named[0]}={env[named[0]]!r}"
            if o.kind == "repeat":
                raw = [line for line in str(raw).splitlines() if line.strip()]
        elif o.name in from_file:
            raw, where = from_file[o.name], f"file {config_file}"
            label = f"{o.name} = {from_file[o.name]!r} in {config_file}"
        else:
            values[o.name], sources[o.name] = o.default, "default"
            continue
        try:
            values[o.name] = o.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        sources[o.name] = where
    cfg = Config(**values)
    for derived, given, what in (
        (cfg.admin_socket_path, cfg.admin_socket, "admin socket"),
        (cfg.peer_socket_path, cfg.peer_socket, "peer socket"),
    ):
        if derived and given != derived:  # the default beside --socket
            try:
                socket_path(derived)
            except ValueError as exc:
                raise ConfigError(f"{what} {derived} (beside --socket): {exc}") from None
    return Loaded(cfg, sources, config_file, ns.print_config or "")


def load(argv: Sequence[str] | None = None) -> Config:
    return load_full(argv).config
