"""One precedence for every setting: flag > environment > file > default, and
--print-config says where each effective value came from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker import config
from tests.harness import ROOT


def test_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text(
        "drain_seconds = 7\nrestart-grace = 8\nquota_per_set = 9\nsocket_mode = 0o600\n"
    )
    env = {
        "PASID_BROKER_CONFIG": str(toml),
        "PASID_BROKER_RESTART_GRACE": "18",
        "PASID_BROKER_QUOTA_PER_SET": "19",
    }
    got = config.load_full(["--quota-per-set", "29"], env)
    c, src = got.config, got.sources
    assert (c.quota_per_set, src["quota_per_set"]) == (29, "flag")
    assert (c.restart_grace, src["restart_grace"]) == (18, "env PASID_BROKER_RESTART_GRACE")
    assert (c.drain_seconds, src["drain_seconds"]) == (7.0, f"file {toml}")
    assert (c.socket_mode, src["socket_mode"]) == (0o600, f"file {toml}")
    assert (c.keepalive_seconds, src["keepalive_seconds"]) == (10.0, "default")
    assert c.quotas.per_set == 29
    # --config on the command line beats PASID_BROKER_CONFIG.
    other = tmp_path / "other.toml"
    other.write_text("drain_seconds = 1.5\n")
    assert config.load_full(["--config", str(other)], env).config.drain_seconds == 1.5


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        (o.name, bad)
        for o in config.OPTIONS
        for bad in ("-1", "nonsense")
        # free-form text settings: any text is a valid path or group name
        if o.name
        not in (
            *("db", "socket", "admin_socket", "peer_socket", "socket_group"),
            *("tls_cert", "tls_key", "tls_client_ca", "admin_group", "admin_subject"),
            *("metrics_tls_cert", "metrics_tls_key", "metrics_tls_client_ca"),
        )
    ],
)
def test_every_setting_refuses_nonsense_from_every_source(
    name: str, bad: str, tmp_path: Path
) -> None:
    """No setting takes a negative number or a word where a number or choice belongs."""
    opt = config.BY_NAME[name]
    if name in ("reserved", "vfio_group") and bad == "nonsense":
        bad = "x-y"
    toml = tmp_path / "b.toml"
    toml.write_text(f"{name} = {json.dumps(bad)}\n")
    for argv, env in (
        ([opt.flag, bad], {}),
        ([], {opt.env: bad}),
        (["--config", str(toml)], {}),
    ):
        with pytest.raises(config.ConfigError) as err:
            config.load_full(argv, env)
        assert repr(bad) in str(err.value) or bad in str(err.value)


def test_print_config_shows_values_and_sources(tmp_path: Path) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text('reserved = ["1-63", 4096]\nlog_level = "DEBUG"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASID_BROKER_")}
    r = subprocess.run(
        [sys.executable, "-m", "broker", "--config", str(toml), "--print-config", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "PASID_BROKER_MAX_GRACE": "60"},
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    s = out["settings"]
    assert out["config_file"] == str(toml)
    assert s["reserved"] == {"value": "1-63,4096", "source": f"file {toml}"}
    assert s["log_level"] == {"value": "DEBUG", "source": f"file {toml}"}
    assert s["max_grace"] == {"value": 60, "source": "env PASID_BROKER_MAX_GRACE"}
    assert s["socket_mode"] == {"value": "0660", "source": "default"}
    assert set(s) == {o.name for o in config.OPTIONS}
    text = subprocess.run(
        [sys.executable, "-m", "broker", "--print-config", "--drain-seconds", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=30,
    )
    assert text.returncode == 0, text.stderr
    assert any(
        line.split() == ["drain_seconds", "2.0", "flag"] for line in text.stdout.splitlines()
    )


def test_version() -> None:
    from broker import __version__

    r = subprocess.run(
        [sys.executable, "-m", "broker", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0 and r.stdout.strip() == f"pasid-broker {__version__}"


def test_socket_path_limit_counts_bytes_and_covers_the_derived_admin_socket() -> None:
    ok = "/tmp/" + "a" * (config.MAX_SOCKET_PATH - len("/tmp/"))
    assert config.load_full(["--socket", ok, "--admin-socket", "off"], {}).config.socket == ok
    with pytest.raises(config.ConfigError, match="108 bytes"):
        config.load_full(["--socket", ok + "b"], {})
    # Four bytes of UTF-8 per character: 27 characters are 108 bytes.
    with pytest.raises(config.ConfigError, match="bytes, over the 107"):
        config.load_full(["--socket", "/" + "\U0001f600" * 27], {})
    # A short --socket in a long directory whose admin.sock beside it is too long.
    deep = "/tmp/" + "d" * 92 + "/b.sock"
    with pytest.raises(config.ConfigError, match="admin"):
        config.load_full(["--socket", deep], {})


def test_old_names_switches_and_repeats() -> None:
    """--quota-per-client and PASID_BROKER_QUOTA_PER_CLIENT are the old names of
    --quota-per-identity; --insecure is a switch; --admin-subject repeats (its variable:
    one per line)."""
    c = config.load_full(["--quota-per-client", "7"], {}).config
    assert c.quotas.per_client == 7 and c.identity_share == 0
    got = config.load_full([], {"PASID_BROKER_QUOTA_PER_CLIENT": "10%"})
    assert got.config.identity_share == 0.1 and got.config.quotas.per_client == 0
    assert got.sources["quota_per_identity"] == "env PASID_BROKER_QUOTA_PER_CLIENT"
    assert config.load_full([], {}).config.identity_share == 0.25  # the default, 25%
    assert config.load_full(["--insecure"], {}).config.insecure is True
    assert config.load_full([], {"PASID_BROKER_INSECURE": "1"}).config.insecure is True
    subjects = ["CN=a,O=x", "CN=b,O=x"]
    flags = ["--admin-subject", subjects[0], "--admin-subject", subjects[1]]
    assert config.load_full(flags, {}).config.admin_subjects == tuple(subjects)
    env = {"PASID_BROKER_ADMIN_SUBJECT": "\n".join(subjects)}
    assert config.load_full([], env).config.admin_subjects == tuple(subjects)
