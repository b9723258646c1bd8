"""Configuration, in one place: flags, PASID_BROKER_* variables and an optional TOML file.

Precedence, for every setting: flag > environment > file (--config) > default.

Each setting is ONE declaration: a field of `Config` made with `setting(...)`, which names
its default, how a value is read and checked (unit and range), and its help. The flag
(--quota-per-set), the variable (PASID_BROKER_QUOTA_PER_SET) and the file key
(quota_per_set, or quota-per-set) all derive from the field's name. A value that fails
its check, an unknown file key or an unknown PASID_BROKER_* variable is a refusal to
start: one line on stderr, exit 2 (`ConfigError`), naming the nearest valid spelling.

Where each part lives:
  settings.py   the declarations: `Config` and its `setting(...)` fields (add one here)
  values.py     parsers: a raw value -> the checked value, or ValueError in plain words
  options.py    how each setting is spelled outside: flag, variable, file key, alias
  load.py       reading flags, environment and the TOML file; `load_full`, `ConfigError`
  effective.py  --print-config: the effective settings and where each came from
"""

from broker.config.effective import Loaded
from broker.config.load import (
    CONFIG_ENV,
    FOREIGN_ENV,
    ConfigError,
    build_parser,
    load,
    load_full,
    read_file,
)
from broker.config.options import ALIASES, BY_NAME, ENV_PREFIX, OPTIONS, Option
from broker.config.settings import (
    DEFAULT_DB,
    DEFAULT_SOCKET,
    Config,
    admin_socket_path,
    peer_socket_path,
    setting,
)
from broker.config.values import MAX_SOCKET_PATH, Parse

__all__ = [
    "ALIASES",
    "BY_NAME",
    "CONFIG_ENV",
    "DEFAULT_DB",
    "DEFAULT_SOCKET",
    "ENV_PREFIX",
    "FOREIGN_ENV",
    "MAX_SOCKET_PATH",
    "OPTIONS",
    "Config",
    "ConfigError",
    "Loaded",
    "Option",
    "Parse",
    "admin_socket_path",
    "build_parser",
    "load",
    "load_full",
    "peer_socket_path",
    "read_file",
    "setting",
]
