"""The container images built and run (issue 21): `make image-test`.

Built with buildah from a local Debian base (mmdebstrap; no registry image can be pulled
here), in Docker format so that HEALTHCHECK is kept (the OCI format drops it). Run
without a container runtime (podman's runtimes cannot start containers on this kind of
machine: DEPLOY-NOTES.md): the image's root file system (`buildah mount`) in new mount,
network and (unless --pid host) pid namespaces, chrooted as the image's user with its
environment, the socket and state directories bind-mounted from the host as
docs/install.md's `docker run` does. That is a container as far as the broker can tell:
PID 1, its own /proc, no capabilities needed, the host's socket directory.

Caches, outside the checkout (/var/cache/pasid-broker/images/): the base's tarball keyed
by the mmdebstrap command, and buildah's storage (layers reused with --layers).
`make image-test` (PASID_IMAGE_TEST=1) builds everything, from nothing if need be (about
9 min). `make test` runs the tier once that base is cached (then about 25 s: only the
checkout's layers are rebuilt) and skips it, saying why, before: a cold base would take
more minutes than the suite's 10 may spend (docs/test-time.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import apt
from tests.harness import ROOT, db_holdings, wait_until

pytestmark = [
    pytest.mark.timeout(1800),  # a cold base and build: ~5 min here, under load more
    # Its containers are mount namespaces, which copy the host's mounts of the moment
    # (tests/conftest.py): with the other tests that make or mount them, on one worker.
    pytest.mark.xdist_group("blockdev"),
]
CACHE = Path("/var/cache/pasid-broker/images")
SUITE = "bookworm"
BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3"
MMDEBSTRAP = ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE]
# This machine reaches PyPI through a TLS proxy whose CA is in the host's bundle: the
# build's RUN steps see it read-only (Debian's pip reads that path); nothing of it stays
# in the image.
# As the python images have it (the Dockerfile's RUN steps call groupadd, in sbin).
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
BROKER_UID = 10001
CLIENT_UID = 10003
SOCKET_GID = 10002  # the clients' group, as in deploy/kubernetes


def _buildah(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    cmd = ["buildah", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "runroot")]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"`{shlex.join(r.args)}` exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout


def _base_key() -> str:
    return hashlib.sha256(" ".join(MMDEBSTRAP).encode()).hexdigest()[:16]


def _unavailable() -> str:
    if os.environ.get("PASID_IMAGE_TEST") != "1" and not (
        (CACHE / f"base-{_base_key()}.tar").exists() and shutil.which("buildah")
    ):
        return (
            "the image tier's Debian base is not built on this machine yet (mmdebstrap and"
            f" buildah, minutes from nothing; cached in {CACHE}): `make image-test` builds"
            " it, and make test runs the tier from then on"
        )
    if os.geteuid() != 0:
        return "not root: buildah's chroot isolation and the namespaces need root"
    missing = [t for t in ("buildah", "mmdebstrap") if shutil.which(t) is None]
    if missing:
        why = apt.install(*missing)
        if any(shutil.which(t) is None for t in missing):
            return f"{' and '.join(missing)} missing: {why or 'not on PATH after install'}"
    return ""


def base_image() -> tuple[str, float]:
    """localhost/pasid-base:KEY, a Debian minbase with Python made by mmdebstrap (its
    tarball cached, keyed by the command); (name, seconds spent)."""
    t0 = time.monotonic()
    key = _base_key()
    tag = hashlib.sha256(f"{key} {BASE_PATH}".encode()).hexdigest()[:16]
    name = f"localhost/pasid-base:{tag}"
    if _buildah("inspect", "--type", "image", name).returncode == 0:
        return name, time.monotonic() - t0
    tar = CACHE / f"base-{key}.tar"
    if not tar.exists():
        tmp = CACHE / f".base-{key}.{os.getpid()}.tar"  # mmdebstrap: the format by its suffix
        r = subprocess.run([*MMDEBSTRAP, str(tmp)], capture_output=True, text=True, timeout=1500)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            why = f"mmdebstrap could not make the base: {r.stderr.strip()[-300:]}"
            print(f"\nSKIP: {why}")
            pytest.skip(why)
        tmp.rename(tar)
    ctr = _ok(_buildah("from", "scratch")).strip()
    try:
        _ok(_buildah("add", ctr, str(tar), "/"))
        _ok(_buildah("config", "--env", f"PATH={BASE_PATH}", ctr))
        _ok(_buildah("commit", "--format", "docker", ctr, name))
    finally:
        _buildah("rm", ctr)
    return name, time.monotonic() - t0


def build(dockerfile: Path, tag: str, base: str) -> tuple[dict[str, Any], float]:
    """buildah bud of `dockerfile` (context: the checkout) on `base`; (its config, s)."""
    t0 = time.monotonic()
    args = ["bud", "--isolation", "chroot", "--format", "docker", "--layers", "--force-rm",
            "-v", f"{HOST_CA}:{HOST_CA}:ro", "--build-arg", f"PYTHON_IMAGE={base}",
            "-t", tag, "-f", str(dockerfile), str(ROOT)]  # fmt: skip
    _ok(_buildah(*args, timeout=1500))
    info = json.loads(_ok(_buildah("inspect", "--type", "image", tag)))["Docker"]["config"]
    return dict(info), time.monotonic() - t0


@dataclass
class Container:
    """An image's root file system run as a container: `start` runs its entrypoint (or a
    command) as PID 1 of new namespaces, the host's directories bind-mounted."""

    image: str
    config: dict[str, Any]
    binds: dict[str, Path]
    groups: list[int] = field(default_factory=list)
    host_pid: bool = False
    env: dict[str, str] = field(default_factory=dict)
    ctr: str = ""
    rootfs: str = ""
    proc: subprocess.Popen[str] | None = None
    log: Path | None = None

    def __enter__(self) -> Container:
        self.ctr = _ok(_buildah("from", self.image)).strip()
        self.rootfs = _ok(_buildah("mount", self.ctr)).strip()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGKILL)
        _buildah("umount", self.ctr)
        _buildah("rm", self.ctr)

    def _env(self) -> list[str]:
        env = dict(e.split("=", 1) for e in self.config.get("Env") or [])
        return [f"{k}={v}" for k, v in {**env, **self.env}.items()]

    def _exec(self, argv: list[str]) -> list[str]:
        """chroot into the image as its user, with its environment only."""
        user = str(self.config.get("User") or "0:0")
        groups = ",".join(map(str, self.groups))
        return [
            "chroot", f"--userspec={user}", *([f"--groups={groups}"] if groups else []),
            self.rootfs, "env", "-i", *self._env(), *argv,
        ]  # fmt: skip

    def _mounts(self) -> str:
        """The host's directories at their paths (mount points made as a runtime does),
        this pid namespace's /proc, the host's /dev."""
        lines = [
            f"mkdir -p {self.rootfs}{c} && mount --bind {shlex.quote(str(h))} {self.rootfs}{c}"
            for c, h in self.binds.items()
        ]
        lines += [f"mount -t proc proc {self.rootfs}/proc", f"mount --rbind /dev {self.rootfs}/dev"]
        return " && ".join(lines)

    def start(self, workdir: Path) -> None:
        """ENTRYPOINT + CMD as PID 1 (or, host_pid, in the host's pid namespace)."""
        argv = [*self.config["Entrypoint"], *self.config["Cmd"]]
        ns = ["-m", "-n", "--propagation", "private"] + ([] if self.host_pid else ["-p", "-f"])
        script = f"{self._mounts()} && exec {shlex.join(self._exec(argv))}"
        self.log = workdir / f"container-{int(time.monotonic() * 1000)}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["unshare", *ns, "sh", "-c", script],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def main_pid(self) -> int:
        """The entrypoint's pid on the host (the child of unshare -f, or unshare itself)."""
        assert self.proc is not None
        if self.host_pid:
            return self.proc.pid
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(kids[0]) if kids else 0

    def exec(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Like `docker exec`: in the container's namespaces and root, as its user."""
        pid = self.main_pid()
        user = str(self.config.get("User") or "0:0").split(":")
        cmd = ["nsenter", "-t", str(pid), "-m", "-n", "-p", "-r", "-w",
               "-S", user[0], "-G", user[-1], "env", "-i", *self._env(), *argv]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        test = self.config["Healthcheck"]["Test"]
        assert test[0] == "CMD", test
        return self.exec(list(test[1:]))

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        pid = self.main_pid()
        if pid:
            os.kill(pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            raise AssertionError(
                f"the container did not stop on signal {sig}:\n{self.output()}"
            ) from None


@dataclass
class Images:
    broker: str
    broker_config: dict[str, Any]
    client: str
    client_config: dict[str, Any]


@pytest.fixture(scope="module")
def images() -> Images:
    why = _unavailable()
    if why:
        print(f"\nSKIP: {why}")
        pytest.skip(why)
    CACHE.mkdir(parents=True, exist_ok=True)
    base, t_base = base_image()
    broker, t_broker = build(ROOT / "Dockerfile", "localhost/pasid-broker:test", base)
    client, t_client = build(ROOT / "clients/Dockerfile", "localhost/pasid-client:test", base)
    print(
        f"\nimages: base {t_base:.0f} s, pasid-broker {t_broker:.0f} s,"
        f" pasid-client {t_client:.0f} s (cache {CACHE})"
    )
    return Images("localhost/pasid-broker:test", broker, "localhost/pasid-client:test", client)


@pytest.fixture
def host_dirs() -> Iterator[dict[str, Path]]:
    """/run/pasid-broker and /var/lib/pasid-broker of a host, owned by the image's user
    (docs/install.md: `install -d -o 10001 -g 10001 ...`)."""
    d = Path(tempfile.mkdtemp(prefix="pb-img-", dir="/tmp"))
    d.chmod(0o755)
    dirs = {"/run/pasid-broker": d / "run", "/var/lib/pasid-broker": d / "state"}
    for p in dirs.values():
        p.mkdir()
        os.chown(p, BROKER_UID, BROKER_UID)
        p.chmod(0o755)
    yield dirs
    shutil.rmtree(d, ignore_errors=True)


def _serving(c: Container) -> bool:
    assert c.proc is not None and c.proc.poll() is None, f"the broker exited:\n{c.output()}"
    return c.healthcheck().returncode == 0


def test_images_keep_healthcheck_user_and_entrypoint(images: Images) -> None:
    cfg = images.broker_config
    assert cfg["Healthcheck"]["Test"] == ["CMD", "pasid-broker", "health", "--timeout", "4"]
    assert cfg["User"] == f"{BROKER_UID}:{BROKER_UID}"
    assert cfg["Entrypoint"] == ["pasid-broker"]
    assert images.client_config["User"] == f"{CLIENT_UID}:{CLIENT_UID}"


def test_broker_is_pid_1_and_a_client_container_allocates_through_the_socket(
    images: Images, host_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """`docker run` (own pid namespace): the broker is PID 1 as uid 10001, its HEALTHCHECK
    passes, the client image in the same pid namespace (a pod sharing it) allocates
    through the host's socket directory, and SIGTERM stops PID 1 with exit 0, the set kept
    in the host's state directory."""
    env = {"PASID_BROKER_SOCKET_GROUP": str(SOCKET_GID)}
    with Container(images.broker, images.broker_config, host_dirs, [SOCKET_GID], env=env) as b:
        b.start(tmp_path)
        wait_until(lambda: _serving(b), 120, 0.5, "the HEALTHCHECK to pass")
        ps = b.exec(["cat", "/proc/1/cmdline", "/proc/1/status"])
        assert ps.stdout.split("\0")[:2] == [
            "/opt/pasid-broker/bin/python",
            "/opt/pasid-broker/bin/pasid-broker",
        ], ps
        assert f"Uid:\t{BROKER_UID}\t" in ps.stdout, ps.stdout
        sock = host_dirs["/run/pasid-broker"] / "broker.sock"
        assert (sock.stat().st_gid, sock.stat().st_mode & 0o777) == (SOCKET_GID, 0o660)
        # Holds its set until its stdin closes: a live holder across the broker's stop.
        code = (
            "import json, os, sys\nfrom pasid_client import Client\n"
            "s = Client(socket='/run/pasid-broker/broker.sock').session('client-image')\n"
            "print(json.dumps([s.alloc(1, 1000, count=3), s.verified, s.set_id]), flush=True)\n"
            "sys.stdin.read()\nos._exit(0)\n"
        )
        with Container(
            images.client,
            images.client_config,
            {"/run/pasid-broker": host_dirs["/run/pasid-broker"]},
            [SOCKET_GID],
        ) as cl:
            # In the broker's pid namespace, with its own mounts and root.
            script = f"{cl._mounts()} && exec {shlex.join(cl._exec(['python', '-c', code]))}"
            argv = ["nsenter", "-t", str(b.main_pid()), "-p", "-n", "unshare", "-m", "-f",
                    "--propagation", "private", "sh", "-c", script]  # fmt: skip
            holder = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert holder.stdout is not None
                line = holder.stdout.readline()
                assert line, f"the client container: {holder.communicate(timeout=30)}\n{b.output()}"
                pasids, verified, set_id = json.loads(line)
                assert pasids == [1, 2, 3] and verified, line
                # SIGTERM to PID 1, the holder alive: exit 0, the set kept on the host.
                assert b.stop(signal.SIGTERM) == 0, b.output()
                assert '"msg": "stopped"' in b.output()
            finally:
                holder.kill()
                holder.wait(30)
            nodeps = subprocess.run(
                ["chroot", cl.rootfs, "python", "-c", "import sqlalchemy"],
                capture_output=True,
                text=True,
            )
            assert nodeps.returncode != 0, "the client image carries the server's dependencies"
    held = db_holdings(host_dirs["/var/lib/pasid-broker"] / "broker.db")
    assert held.get(set_id) == [1, 2, 3], held


def test_host_client_allocates_through_the_mounted_socket_with_pid_host(
    images: Images, host_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """docs/install.md's `docker run --pid host`: a VMM on the host (uid 65534, in the
    socket's group) allocates through the bind-mounted socket with a kernel-verified
    identity; a user outside the group is refused; SIGTERM exits 0."""
    env = {"PASID_BROKER_SOCKET_GROUP": str(SOCKET_GID)}
    with Container(
        images.broker, images.broker_config, host_dirs, [SOCKET_GID], host_pid=True, env=env
    ) as b:
        b.start(tmp_path)
        wait_until(lambda: _serving(b), 120, 0.5, "the HEALTHCHECK to pass")
        sock = str(host_dirs["/run/pasid-broker"] / "broker.sock")
        code = (
            "import sys\nfrom pasid_client import Client\n"
            "import json\n"
            "with Client(socket=sys.argv[1]) as c, c.session('host-vmm') as s:\n"
            "    print(json.dumps([s.alloc(1, 1000, count=2), s.verified]))\n"
        )
        base = ["setpriv", "--reuid", "65534", "--regid", "65534"]
        r = subprocess.run(
            [*base, "--groups", str(SOCKET_GID), sys.executable, "-c", code, sock],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert r.returncode == 0 and json.loads(r.stdout) == [[1, 2], True], (
            f"{r.stdout}{r.stderr}\n{b.output()}"
        )
        r = subprocess.run(
            [*base, "--clear-groups", sys.executable, "-c", code, sock],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        # Told at once which socket and why (the library's PermissionDenied, SOCKET_ACCESS).
        peer = host_dirs["/run/pasid-broker"] / "peer.sock"
        assert r.returncode != 0 and (
            f"PERMISSION_DENIED: permission denied connecting to {peer}: this user (uid 65534)"
            " is not in its group" in r.stderr
        ), r.stdout + r.stderr
        assert b.stop(signal.SIGTERM) == 0, b.output()
