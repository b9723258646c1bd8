"""The real-systemd tier (issue 21): docs/install.md followed step by step, as a new
operator would, on a real systemd 252 booted from this machine's root (tests/deploy/
machine.py), then the service's life: READY, group access, the watchdog, a restart that
keeps the socket directory and the live holders' sets, stop, backup, restore, upgrade.

The commands are read from docs/install.md (`doc_commands`), not copied: `sudo` becomes
root or runuser, and nothing else is rewritten but what each step says. One boot serves
the whole module; the tests run in order on it. The wheels of step 1 are cached in
/var/cache/pasid-broker/systemd-tier/, keyed by the sources they are built from.
Every failure prints the unit's status and journal.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.machine import Machine, doc_commands, unavailable
from tests.harness import ROOT, db_holdings, wait_until

# The first test also waits for the module's set-up: the wheels (cold: ~1 min), the boot
# and the install steps (~1 min).
pytestmark = [
    pytest.mark.timeout(1200),
    # One boot, the tests in order on it: one worker (tests/conftest.py). `blockdev`: its
    # container's mount namespace copies the host's mounts at boot, and would keep a loop
    # device mounted then busy for its whole life.
    pytest.mark.xdist_group("blockdev"),
]
DOC = ROOT / "docs/install.md"
CACHE = Path("/var/cache/pasid-broker/systemd-tier")
UNIT = "pasid-broker"
VENV = "/opt/pasid-broker"
SOCKET = "/run/pasid-broker/broker.sock"
MAX_EXPOSURE = 2.5
# Short enough for a test, long enough for a loaded 2-core machine: a drop-in, not the
# shipped WatchdogSec=30 and restart_grace 10.
WATCHDOG_SEC = 3
RESTART_GRACE = 3
TEST_DROPIN = f"""[Service]
Environment=PASID_BROKER_RESTART_GRACE={RESTART_GRACE}
"""
# Changes when _build_wheels builds differently (its part of the cache key).
BUILD_RECIPE = "dist and dist-new (pyproject and __version__ +upgrade) v2"


def _sources() -> list[str]:
    """The checkout's files as git knows them (tracked and new, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return sorted(p for p in out.decode().split("\0") if p and (ROOT / p).exists())


# What the wheels are built from (the Dockerfile's builder copies the same): the key of
# the cached build. Docs, tests and deploy/ are copied but do not change the wheels.
WHEEL_INPUTS = ("broker/", "clients/", "proto/", "pyproject.toml", "README.md", "constraints.txt")


def _copy_sources(dest: Path) -> str:
    """Copy the sources to `dest`; the key of the wheels' inputs (paths and contents)."""
    h = hashlib.sha256(BUILD_RECIPE.encode())
    for rel in _sources():
        src, dst = ROOT / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        keyed = rel.startswith(WHEEL_INPUTS)
        if src.is_symlink():
            dst.symlink_to(src.readlink())
            if keyed:
                h.update(f"{rel} -> {src.readlink()}\0".encode())
        elif src.is_file():
            shutil.copy2(src, dst)
            if keyed:
                h.update(f"{rel}\0".encode() + src.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _prune_cache(keep: Path) -> None:
    """Drop other keys' builds unused for an hour (another checkout may be using its own)."""
    for old in CACHE.glob("dist-*"):
        if old.name != keep.name and time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)


def _build_wheels(src: Path, key: str) -> tuple[Path, float]:
    """Step 1 of docs/install.md in `src` (a copy of the checkout), run on this host as
    printed; its dist/ cached under the sources' key. (dist, seconds spent)."""
    cached = CACHE / f"dist-{key}"
    t0 = time.monotonic()
    if not (cached / "dist").is_dir():
        ((step1,),) = [doc_commands(DOC, "1. Build the wheel (on any machine with the source)")]
        assert [c.printed for c in step1] == [
            "python3 -m pip wheel --wheel-dir dist --constraint constraints.txt ./clients ."
        ], "step 1 changed: check what this test runs"
        for c in step1:
            r = subprocess.run(
                c.command, shell=True, cwd=src, capture_output=True, text=True, timeout=900
            )
            assert r.returncode == 0, f"step 1, `{c.printed}`:\n{r.stderr[-3000:]}"
        # dist-new for the upgrade: the same wheels, pasid-broker at a higher version.
        new = src.parent / "src-new"
        shutil.copytree(src, new, symlinks=True, ignore=shutil.ignore_patterns("dist", "build"))
        pyproject = new / "pyproject.toml"
        text = pyproject.read_text()
        version = re.search(r'^version = "([^"]+)"', text, re.M)
        assert version
        pyproject.write_text(text.replace(version.group(0), f'version = "{version[1]}+upgrade"'))
        init = new / "broker/__init__.py"
        init.write_text(
            init.read_text().replace(
                f'__version__ = "{version[1]}"', f'__version__ = "{version[1]}+upgrade"'
            )
        )
        r = subprocess.run(
            ["python3", "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", "dist-new", "."],
            cwd=new,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        for whl in (src / "dist").glob("*.whl"):
            if not whl.name.startswith("pasid_broker-"):
                shutil.copy(whl, new / "dist-new")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=CACHE))
        shutil.copytree(src / "dist", tmp / "dist")
        shutil.copytree(new / "dist-new", tmp / "dist-new")
        tmp.rename(cached) if not cached.exists() else shutil.rmtree(tmp)
    cached.touch()
    _prune_cache(cached)
    for name in ("dist", "dist-new"):
        shutil.rmtree(src / name, ignore_errors=True)
        shutil.copytree(cached / name, src / name)
    return cached, time.monotonic() - t0


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    why = unavailable()
    if why:
        print(f"\nSKIP: {why}")
        pytest.skip(why)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pb-systemd-", dir="/var/tmp"))
    m: Machine | None = None
    try:
        src = work / "w/src"
        src.mkdir(parents=True)
        key = _copy_sources(src)
        cached, built = _build_wheels(src, key)
        t1 = time.monotonic()
        try:
            m = Machine.boot(work)
        except RuntimeError as exc:
            print(f"\nSKIP: cannot boot systemd here: {exc}")
            pytest.skip(f"cannot boot systemd here: {exc}")
        t2 = time.monotonic()
        # Steps 2 and 3, as printed.
        for heading in ("2. Install into its own venv",
                        "3. The user, the clients' group, the settings, the unit"):  # fmt: skip
            for block in doc_commands(DOC, heading):
                for c in block:
                    out = m.check(c.command, timeout=600)
                    quoted = re.match(r'"(.*?)(?: \.\.\.)?"$', c.comment)
                    if quoted:  # the page says what the operator sees: they must see it
                        assert quoted[1] in out, f"`{c.printed}` did not show {quoted[0]}:\n{out}"
        t3 = time.monotonic()
        print(
            f"\nsystemd tier set-up: wheels {built:.0f} s ({cached.name}), boot {t2 - t1:.1f} s,"
            f" install steps 2-3 {t3 - t2:.0f} s"
        )
        yield m
    finally:
        if m is not None:
            m.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def _sets(m: Machine) -> list[dict[str, Any]]:
    """Every set, from the admin socket, as the broker's user (docs/install.md)."""
    out = m.check(f"runuser -u pasid-broker -- {VENV}/bin/pasidctl sets --json")
    return list(json.loads(out)["sets"])


def _client_alloc(
    m: Machine, user: str, count: int = 2, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """A one-shot client as `user`: open a session on the socket, allocate, print, with
    the library's own reconnect deadline (60 s)."""
    code = (
        "from pasid_client import Client\n"
        f"with Client(socket={SOCKET!r}) as c, c.session('probe') as s:\n"
        f"    print(s.alloc(1, 1000, count={count}))\n"
    )
    return m.run(f"runuser -u {user} -- {VENV}/bin/python -c {shlex.quote(code)}", timeout)


def _start_holder(
    m: Machine, unit: str, user: str, count: int, pasidctl: bool = True
) -> dict[str, Any]:
    """A holder as `user`, running on in a transient unit of its own; its set.
    `pasidctl hold`, or (pasidctl=False) a VMM-like process that allocates through the
    library and then only lives, whatever becomes of its stream."""
    code = (
        "import time\nfrom pasid_client import Client\n"
        # reconnect_deadline_seconds=0: it never resumes by itself, it only lives.
        f"s = Client(socket={SOCKET!r}, reconnect_deadline_seconds=0).session({unit!r})\n"
        f"print(s.alloc(1, 1000, count={count}), flush=True)\ntime.sleep(86400)\n"
    )
    argv = (
        f"{VENV}/bin/pasidctl hold --count {count} --client {unit}"
        if pasidctl
        else f"{VENV}/bin/python -c {shlex.quote(code)}"
    )
    m.check(f"systemd-run --unit={unit} --uid={user} --collect {argv}")

    def its_set() -> dict[str, Any] | None:  # once allocated: the set exists before
        return next((s for s in _sets(m) if s["client"] == unit and s["count"] == count), None)

    try:
        found = wait_until(its_set, 30, 0.5, f"the set of {unit}")
    except AssertionError:
        raise AssertionError(
            f"{unit} holds no set: {m.run(f'journalctl -u {unit} -o cat').stdout}\n" + m.diagnose()
        ) from None
    assert found is not None and found["count"] == count and found["verified"], found
    return found


def _dropin(m: Machine, name: str, body: str) -> str:
    """Write a drop-in for the unit (as `systemctl edit` would) and reload; its path."""
    path = f"/etc/systemd/system/{UNIT}.service.d/{name}.conf"
    m.check(f"mkdir -p {Path(path).parent} && printf {shlex.quote(body)} > {path}")
    m.check("systemctl daemon-reload")
    return path


def _active(m: Machine) -> bool:
    return m.show(UNIT, "ActiveState") == "active"


def test_install_reaches_active_through_ready(machine: Machine) -> None:
    """`systemctl enable --now` returned (Type=notify: after READY=1), and the STATUS= line
    is the broker's "serving"."""
    m = machine
    assert m.show(UNIT, "Type") == "notify"
    assert m.show(UNIT, "ActiveState") == "active", m.diagnose()
    assert m.show(UNIT, "SubState") == "running", m.diagnose()
    status = m.show(UNIT, "StatusText")
    assert status.startswith(f"serving on unix:{SOCKET}"), status + m.diagnose()
    assert m.show(UNIT, "NRestarts") == "0", m.diagnose()
    journal = m.check(f"journalctl -u {UNIT} -o cat --no-pager")
    assert '"msg": "serving"' in journal, journal
    # The socket: mode 0660, group pasid (docs/install.md, "Who may allocate").
    st = m.check(f"stat -c '%a %U %G' {SOCKET}").split()
    assert st == ["660", "pasid-broker", "pasid"], st


def test_security_exposure_of_the_running_unit(machine: Machine) -> None:
    out = machine.check(f"systemd-analyze security --no-pager {UNIT}")
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", out)
    assert m, out
    print(f"\nsystemd-analyze security (running unit): {m[1]} {m[2]}")
    assert float(m[1]) <= MAX_EXPOSURE, out


def test_a_member_of_the_group_allocates_and_an_outsider_is_refused(machine: Machine) -> None:
    m = machine
    # The page's own example: `usermod -aG pasid qemu` (a VMM's user).
    doc = DOC.read_text()
    usermod = re.search(r"`(usermod -aG pasid (\w+))`", doc)
    assert usermod, "docs/install.md no longer shows how to add a client to the group"
    user = usermod[2]
    m.check(f"id {user} >/dev/null 2>&1 || useradd --system --no-create-home {user}")
    m.check(usermod[1])
    m.check("useradd --system --no-create-home pb-outsider")
    r = _client_alloc(m, user)
    assert r.returncode == 0, f"{user} (in group pasid) could not allocate: {r.stderr}"
    assert len(json.loads(r.stdout.strip())) == 2, r.stdout
    # Refused at once (within half the 60 s reconnect deadline, or m.run times out),
    # naming the socket and the cause, not retried as if the broker were starting.
    r = _client_alloc(m, "pb-outsider", timeout=30)
    assert r.returncode != 0, f"a user outside group pasid allocated: {r.stdout}"
    assert "PermissionDenied: PERMISSION_DENIED: permission denied connecting to" in r.stderr
    assert (
        "/run/pasid-broker/peer.sock: this user (uid " in r.stderr
        and ") is not in its group 'pasid' (mode 0660)" in r.stderr
    ), r.stderr


def test_a_filter_that_denies_chown_is_named_as_the_cause(machine: Machine) -> None:
    """The shipped unit's first bug (issue 21): with chown denied, the broker exits 2 and
    says that a system-call filter denied it, not "add SupplementaryGroups="."""
    m = machine
    dropin = _dropin(m, "zz-deny-chown", "[Service]\nSystemCallFilter=~@chown\n")
    try:
        r = m.run(f"systemctl restart {UNIT}")
        assert r.returncode != 0, "the broker started with chown denied\n" + m.diagnose()
        assert m.show(UNIT, "ExecMainStatus") == "2", m.diagnose()
        status = m.show(UNIT, "StatusText")
        assert "system-call filter denied chown" in status, status + m.diagnose()
        assert "SupplementaryGroups" not in status, status
    finally:
        m.check(f"rm -f {dropin} && systemctl daemon-reload && systemctl reset-failed {UNIT}")
    m.check(f"systemctl start {UNIT}")
    assert _active(m), m.diagnose()


def test_watchdog_leaves_a_healthy_broker_alone_and_restarts_a_frozen_one(
    machine: Machine,
) -> None:
    m = machine
    dropin = _dropin(m, "zz-watchdog", f"[Service]\nWatchdogSec={WATCHDOG_SEC}\n")
    try:
        m.check(f"systemctl restart {UNIT}")
        pid, restarts = m.show(UNIT, "MainPID"), int(m.show(UNIT, "NRestarts"))
        time.sleep(3 * WATCHDOG_SEC)  # three intervals: the pings keep it alive
        assert m.show(UNIT, "MainPID") == pid, (
            "the watchdog restarted a healthy broker\n" + m.diagnose()
        )
        m.check(f"kill -STOP {pid}")

        def replaced() -> bool:
            return m.show(UNIT, "MainPID") not in ("0", pid) and _active(m)

        try:
            wait_until(replaced, 20 * WATCHDOG_SEC, 0.5, "a new broker after the watchdog")
        except AssertionError:
            m.run(f"kill -CONT {pid}")
            raise AssertionError("a frozen broker was not restarted\n" + m.diagnose()) from None
        assert int(m.show(UNIT, "NRestarts")) == restarts + 1, m.diagnose()
        journal = m.check(f"journalctl -u {UNIT} -o cat --no-pager")
        assert "Watchdog timeout" in journal, journal[-2000:]
    finally:
        m.check(f"rm -f {dropin} && systemctl daemon-reload")
    m.check(f"systemctl restart {UNIT}")


def test_restart_keeps_the_socket_directory(machine: Machine) -> None:
    """A container that bind-mounts /run/pasid-broker keeps reaching the socket across
    `systemctl restart` and stop/start: the directory is the same (inode), so the bind
    mount does not point at a removed one (RuntimeDirectoryPreserve=yes)."""
    m = machine
    m.check("mkdir -p /mnt/pb && mount --bind /run/pasid-broker /mnt/pb")
    try:
        inode = m.check("stat -c %i /run/pasid-broker").strip()
        for how in (
            f"systemctl restart {UNIT}",
            f"systemctl stop {UNIT} && systemctl start {UNIT}",
        ):
            pid = m.show(UNIT, "MainPID")
            m.check(how)
            assert m.show(UNIT, "MainPID") != pid and _active(m), m.diagnose()
            assert m.check("stat -c %i /run/pasid-broker").strip() == inode, (
                f"`{how}` replaced /run/pasid-broker (RuntimeDirectoryPreserve=)"
            )
            r = m.run(f"{VENV}/bin/pasid-broker health --socket /mnt/pb/broker.sock")
            assert r.returncode == 0, f"after `{how}`, through the bind mount: {r.stdout}{r.stderr}"
    finally:
        m.run("umount /mnt/pb")


def test_restart_keeps_live_holders_sets(machine: Machine) -> None:
    """A live kernel-verified holder keeps its set across `systemctl restart`, past
    --restart-grace, whether or not its client comes back (issue 19: no restart grace for
    live verified holders). The holder here never resumes: it only lives."""
    m = machine
    _dropin(m, "zz-restart-grace", TEST_DROPIN)
    m.check(f"systemctl restart {UNIT}")
    held = _start_holder(m, "pb-vmm-restart", "qemu", 3, pasidctl=False)
    m.check(f"systemctl restart {UNIT}")
    assert _active(m), m.diagnose()
    time.sleep(RESTART_GRACE + 2)  # past the restart grace
    after = [s for s in _sets(m) if s["client"] == "pb-vmm-restart"]
    assert m.show("pb-vmm-restart", "ActiveState") == "active", "the holder itself died"
    assert after and after[0]["ranges"] == held["ranges"], (
        f"the live holder's set {held['set_id']} ({held['ranges']}) is gone"
        f" {RESTART_GRACE + 2} s after `systemctl restart` (restart_grace {RESTART_GRACE}):"
        f" sets now {after}\n{m.diagnose()}"
    )
    m.check("systemctl stop pb-vmm-restart")


def test_pasidctl_hold_survives_a_restart(machine: Machine) -> None:
    """`pasidctl hold` reconnects and re-attaches by itself after `systemctl restart`
    (issue 19, point 4): still running, its set the same and attached again."""
    m = machine
    held = _start_holder(m, "pb-holder-restart", "qemu", 3)
    m.check(f"systemctl restart {UNIT}")
    assert _active(m), m.diagnose()
    time.sleep(RESTART_GRACE + 2)  # past the restart grace
    after = [s for s in _sets(m) if s["client"] == "pb-holder-restart"]
    hold_log = m.run("journalctl -u pb-holder-restart -o cat --no-pager").stdout
    assert m.show("pb-holder-restart", "ActiveState") == "active", (
        f"`pasidctl hold` did not survive the restart:\n{hold_log}"
    )
    assert after and after[0]["ranges"] == held["ranges"], (
        f"`pasidctl hold`'s set {held['set_id']} ({held['ranges']}) is gone after"
        f" `systemctl restart`: sets now {after}; it said:\n{hold_log}\n{m.diagnose()}"
    )
    assert after[0]["state"] == "attached", f"not re-attached: {after[0]}\n{hold_log}"
    m.check("systemctl stop pb-holder-restart")


def test_stop_backup_restore_after_stop(machine: Machine, tmp_path: Path) -> None:
    """The "Backup and restore" section as printed: backup while serving, then stop,
    restore and start. The restored database holds the backup's moment."""
    m = machine
    backup_block, restore_block = doc_commands(DOC, "Backup and restore")
    before = _start_holder(m, "pb-holder-backup", "qemu", 2)
    for c in backup_block:
        m.check(c.command)
    later = _start_holder(m, "pb-holder-later", "qemu", 4)  # after the backup: not in it
    today = m.check("date +%F").strip()
    for c in restore_block:
        # The page's example date is whichever backup the operator chose: ours, today's.
        cmd = re.sub(r"broker-\d{4}-\d{2}-\d{2}\.db", f"broker-{today}.db", c.command)
        if "restore" in cmd:
            # Restore runs with the broker stopped: the set of the backup's moment is in
            # the file, the later one is not, read before the broker touches it again.
            assert not _active(m), m.diagnose()
            m.check(cmd)
            copy = tmp_path / "restored.db"
            shutil.copy(m.host_path("/var/lib/pasid-broker/broker.db"), copy)
            holdings = db_holdings(copy)
            assert before["set_id"] in holdings and later["set_id"] not in holdings, holdings
            assert len(holdings[before["set_id"]]) == 2
            with sqlite3.connect(copy) as con:
                assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        else:
            m.check(cmd)
    assert _active(m), m.diagnose()
    assert m.check("stat -c %a /var/lib/pasid-broker/broker.db").strip() == "600"
    assert later["set_id"] not in {s["set_id"] for s in _sets(m)}


def test_upgrade_as_documented(machine: Machine) -> None:
    """The "Upgrade" section as printed, to dist-new (these sources, pasid-broker at a
    higher version): the new version serves, and the backup before it is a database."""
    m = machine
    (block,) = doc_commands(DOC, "Upgrade")
    old = m.check(f"{VENV}/bin/pasid-broker --version").strip()
    pid = m.show(UNIT, "MainPID")
    for c in block:
        m.check(c.command, timeout=600)
    new = m.check(f"{VENV}/bin/pasid-broker --version").strip()
    assert new == f"{old}+upgrade", (old, new)
    assert m.show(UNIT, "MainPID") != pid and _active(m), m.diagnose()
    health = f"{VENV}/bin/pasid-broker health --config /etc/pasid-broker/broker.toml"
    m.check(f"runuser -u pasid-broker -- {health}")
    integrity = m.check(
        f'{VENV}/bin/python -c "import sqlite3; print(sqlite3.connect('
        f"'file:/var/lib/pasid-broker/before-upgrade.db?mode=ro', uri=True)"
        f".execute('PRAGMA integrity_check').fetchone()[0])\""
    )
    assert integrity.strip() == "ok"


def test_stop_is_clean(machine: Machine) -> None:
    m = machine
    m.check(f"systemctl stop {UNIT}")
    assert m.show(UNIT, "ActiveState") == "inactive", m.diagnose()
    assert m.show(UNIT, "ExecMainStatus") == "0", m.diagnose()
    journal = m.check(f"journalctl -u {UNIT} -o cat --no-pager -n 30")
    assert "draining" in journal, journal
