"""A real systemd as PID 1, booted from this machine's own root, for the deploy tier.

`systemd-nspawn -D /` is refused, so the root is bind-mounted inside a private mount
namespace (`unshare -m`) and booted with `--volatile=overlay`: a tmpfs over it takes every
write, so nothing the test installs (/opt/pasid-broker, users, units) reaches the host.
The host may have no systemd or D-Bus of its own, hence `--register=no --keep-unit`.
Commands run inside through nsenter with a clean environment: a caller's venv on PATH
would otherwise end up in the unit (docs: /work/shared/reference/DEPLOY-NOTES.md).

`docs/install.md` is read here too (`doc_commands`): the tier runs the operator's
commands as the page prints them, so the page and the test cannot drift apart.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests import apt

CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    # This machine's pip.conf (local mirrors, a global constraint) is not a new operator's.
    "PIP_CONFIG_FILE": "/dev/null",
}


def unavailable() -> str:
    """'' if a machine can be booted here, else why not (installing systemd-nspawn from
    Debian's systemd-container when it is missing)."""
    if os.geteuid() != 0:
        return "not root: systemd-nspawn and unshare -m need root"
    for tool in ("unshare", "nsenter", "systemctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/lib/systemd/systemd").exists():
        return "no /lib/systemd/systemd to boot (Debian: apt-get install systemd)"
    if shutil.which("systemd-nspawn") is None:
        why = apt.install("systemd-container")
        if shutil.which("systemd-nspawn") is None:
            return f"systemd-nspawn is missing: {why or 'not on PATH after install'}"
    return ""


@dataclass
class Machine:
    """One booted container of the host's root; `run` executes a shell command inside."""

    workdir: Path
    proc: subprocess.Popen[bytes]
    leader: int = 0
    console: Path | None = None

    @classmethod
    def boot(cls, workdir: Path, timeout: float = 90.0) -> Machine:
        """Boot systemd; raise RuntimeError with the console's tail if it does not come up."""
        root = workdir / "root"
        root.mkdir()
        (workdir / "w").mkdir(exist_ok=True)
        console = workdir / "console.log"
        name = f"pb-{uuid.uuid4().hex[:8]}"  # never a fixed name: others boot too
        script = (
            f"mount --bind / {shlex.quote(str(root))} && exec systemd-nspawn"
            f" -D {shlex.quote(str(root))} --volatile=overlay -b --register=no --keep-unit"
            f" --private-network --bind={shlex.quote(str(workdir / 'w'))}:/w -M {name}"
        )
        with console.open("wb") as out:
            proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        m = cls(workdir, proc, console=console)
        deadline = time.monotonic() + timeout
        while not m.leader:
            if proc.poll() is not None or time.monotonic() > deadline:
                m.shutdown()
                raise RuntimeError(f"systemd-nspawn did not start a container: {m.console_tail()}")
            m.leader = m._init_pid()
            time.sleep(0.1)
        state = ""
        while state not in ("running", "degraded"):  # "starting", or no bus yet
            if proc.poll() is not None or time.monotonic() > deadline:
                m.shutdown()
                raise RuntimeError(f"systemd did not boot ({state}): {m.console_tail()}")
            time.sleep(0.2)
            r = m.run("systemctl is-system-running", timeout=30)
            state = r.stdout.strip() or r.stderr.strip()
        return m

    def _init_pid(self) -> int:
        """systemd's pid: the child of systemd-nspawn (the unshare process became it)."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return 0
        for pid in children.split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue
        return 0

    def console_tail(self, lines: int = 15) -> str:
        if self.console is None or not self.console.exists():
            return ""
        return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])

    def run(
        self, command: str, timeout: float = 120.0, cwd: str = "/w/src"
    ) -> subprocess.CompletedProcess[str]:
        """`command` by /bin/sh inside the container, as root, in a clean environment."""
        env = [f"{k}={v}" for k, v in CLEAN_ENV.items()]
        script = f"cd {shlex.quote(cwd)} 2>/dev/null || cd /; {command}"
        return subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *env, "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def check(self, command: str, timeout: float = 120.0) -> str:
        """Run `command`; its stdout, or AssertionError naming the command, its output and
        the service's status and journal."""
        r = self.run(command, timeout=timeout)
        assert r.returncode == 0, (
            f"`{command}` exited {r.returncode}\n{r.stdout}{r.stderr}\n{self.diagnose()}"
        )
        return r.stdout

    def show(self, unit: str, prop: str) -> str:
        return self.run(f"systemctl show -P {prop} {unit}").stdout.strip()

    def diagnose(self, unit: str = "pasid-broker") -> str:
        """What an operator would look at: the unit's status and its journal."""
        r = self.run(
            f"systemctl status --no-pager -l {unit}; journalctl --no-pager -n 40 -u {unit}"
        )
        return f"--- systemctl status / journalctl -u {unit} ---\n{r.stdout}{r.stderr}"

    def host_path(self, path: str) -> Path:
        """A file of the container, as the host reaches it (through its root)."""
        return Path(f"/proc/{self.leader}/root{path}")

    def shutdown(self, grace: float = 15.0) -> None:
        """Power off (SIGTERM to systemd-nspawn), then kill what is left. A bare machine
        powers off in under a second; after the systemd tier's tests it used the whole 60 s
        this wait had (a timed fresh-clone run) and was killed then. It is a throwaway
        overlay, so nothing is lost: the wait is short, and says when it gave up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(
                    f"\nsystemd-nspawn {self.proc.pid}: not powered off within {grace:g} s; killed"
                )
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


# --- docs/install.md, as the operator reads it ------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    """One command of a ```sh block: as printed, as run here, and its trailing comment."""

    printed: str
    command: str
    comment: str


def _split_comment(line: str) -> tuple[str, str]:
    """`cmd   # comment` -> (cmd, comment), leaving a # inside quotes alone."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def as_root(command: str) -> str:
    """The test runs as root: `sudo -u U CMD` is `runuser -u U -- CMD`, `sudo CMD` is CMD
    (sudo itself need not be installed)."""
    m = re.match(r"sudo -u (\S+) (.*)", command, re.S)
    if m:
        return f"runuser -u {m.group(1)} -- {m.group(2)}"
    return command[len("sudo ") :] if command.startswith("sudo ") else command


def doc_commands(doc: Path, heading: str) -> list[list[DocCommand]]:
    """The ```sh blocks under the `## heading` of `doc` (up to the next ## heading), one list
    of commands per block; continuation lines joined, comments kept apart."""
    text = doc.read_text()
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"{doc.name} has no section '## {heading}'"
    blocks: list[list[DocCommand]] = []
    for body in re.findall(r"^```sh\n(.*?)^```", m.group(1), re.M | re.S):
        cmds: list[DocCommand] = []
        pending = ""
        for raw in body.splitlines():
            line, comment = _split_comment(raw)
            if not line.strip() and not pending:
                continue
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            printed = " ".join((pending + line).split())
            pending = ""
            cmds.append(DocCommand(printed, as_root(printed), comment))
        blocks.append(cmds)
    assert blocks, f"{doc.name}, '## {heading}': no ```sh block"
    return blocks
