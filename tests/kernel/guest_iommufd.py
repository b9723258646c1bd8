"""Runs INSIDE the guest of the iommufd tier (tests/kernel/test_iommufd_kernel.py).

Three vfio-user devices sit on vfio-pci: two with a 20-bit PASID capability (A, B) and one
without (N). "Clients" are child processes that do what a VMM does (open the cdev, bind
it to their own iommufd, allocate a PASID-capable hwpt) and delegate the fds over a Unix
socket with SCM_RIGHTS; the parent plays the broker with the real IommufdBackend. Each
step is proven in the IOMMU's own state, the PASID table entries that the VT-d driver's
debugfs dumps (dmar_translation_struct), never by return codes alone. Results go to the
serial console as `PBK {json}` lines.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from broker.backends import iommufd_uapi as uapi
from broker.backends.iommufd import IommufdBackend
from broker.core.errors import PasidError
from tests.kernel.guest import SCRATCH, Result, emit, run_main

DEBUGFS = Path("/sys/kernel/debug/iommu/intel/dmar_translation_struct")
VENDOR, DEVICE = "0x1b36", "0x00f0"


def pasid_entries() -> dict[str, list[int]]:
    """bdf -> PASIDs with a present PASID-table entry, from the VT-d driver's debugfs."""
    out: dict[str, list[int]] = {}
    for line in DEBUGFS.read_text().splitlines():
        f = line.split("\t")
        if len(f) >= 5 and len(f[0]) == 7 and f[0][2] == ":":
            try:
                out.setdefault(f[0], []).append(int(f[3].strip()))
            except ValueError:
                continue
    return out


def devices() -> dict[str, dict[str, object]]:
    """Our vfio-user devices: name -> {bdf, cdev, pasid_bits (config space)}."""
    found = {}
    for d in sorted(Path("/sys/bus/pci/devices").iterdir()):
        if (d / "vendor").read_text().strip() != VENDOR:
            continue
        if (d / "device").read_text().strip() != DEVICE:
            continue
        cdevs = sorted((d / "vfio-dev").iterdir()) if (d / "vfio-dev").exists() else []
        cfg = (d / "config").read_bytes()
        from broker.backends.iommufd import pasid_bits_from_config

        found[d.name] = {
            "bdf": d.name[5:],
            "cdev": f"/dev/vfio/devices/{cdevs[0].name}" if cdevs else None,
            "driver": os.path.basename(os.readlink(d / "driver"))
            if (d / "driver").exists()
            else None,
            "config_pasid_bits": pasid_bits_from_config(cfg),
            "pasid_ctrl": cfg[0x106] if len(cfg) > 0x106 else None,
        }
    return found


def send_fds(sock: socket.socket, msg: dict[str, object], fds: list[int]) -> None:
    sock.sendmsg(
        [json.dumps(msg).encode()],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else [],
    )


def recv_fds(sock: socket.socket) -> tuple[dict[str, object], list[int]]:
    data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
    fds = array.array("i")
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
    return json.loads(data), list(fds)


def only(keep: int) -> None:
    """In a forked child: close every inherited fd above stderr but `keep` (a fork would
    otherwise hold the parent's device fds open, and kcmp would find them)."""
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)


def client(cdev: str, *, bind: bool = True, pasid_hwpt: bool = True) -> tuple[int, socket.socket]:
    """A child that acts as a VMM: open, bind, IOAS + hwpt; delegates; waits to be killed."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent.close()
        only(child.fileno())  # a VMM has its own fds, not the broker's
        try:
            dev = os.open(cdev, os.O_RDWR)
            ictx = os.open("/dev/iommu", os.O_RDWR)
            msg: dict[str, object] = {"pid": os.getpid()}
            if bind:
                dev_id = uapi.bind(dev, ictx)
                ioas = uapi.ioas_alloc(ictx)
                flags = uapi.IOMMU_HWPT_ALLOC_PASID if pasid_hwpt else 0
                hwpt = uapi.hwpt_alloc(ictx, dev_id, ioas, flags)
                plain = uapi.hwpt_alloc(ictx, dev_id, ioas, 0) if pasid_hwpt else hwpt
                msg.update(dev_id=dev_id, ioas=ioas, hwpt=hwpt, plain_hwpt=plain)
            send_fds(child, msg, [ictx, dev])
            child.recv(16)  # until the parent says go, or dies
        except BaseException as exc:
            send_fds(child, {"error": repr(exc)}, [])
        os._exit(0)
    child.close()
    return pid, parent


def main() -> int:
    emit("kernel", release=os.uname().release, dev_iommu=os.path.exists("/dev/iommu"))
    ecaps = {
        p.parent.parent.name: p.read_text().strip()
        for p in Path("/sys/class/iommu").glob("*/intel-iommu/ecap")
    }
    emit("ecap", ecaps=ecaps)
    devs = devices()
    emit("devices", devices=devs)
    if not DEBUGFS.exists():
        emit("error", error=f"{DEBUGFS} missing (INTEL_IOMMU_DEBUGFS?)")
        return 1
    pasid_devs = [n for n, d in devs.items() if d["config_pasid_bits"]]
    plain_devs = [n for n, d in devs.items() if not d["config_pasid_bits"]]
    if len(pasid_devs) < 2 or not plain_devs or any(not d["cdev"] for d in devs.values()):
        emit("error", error="expected 2 PASID devices and 1 without, all on vfio-pci")
        return 1
    a, b, n = pasid_devs[0], pasid_devs[1], plain_devs[0]
    bdf = {k: str(v["bdf"]) for k, v in devs.items()}
    emit("entries at start", entries=pasid_entries())

    be = IommufdBackend()
    caps = be.open()
    emit("backend open", pasid_bits=caps.pasid_bits, source=caps.pasid_bits_source,
        detail=caps.detail, widths=be.iommu_widths)  # fmt: skip

    # -- set 1 (client A on device a): adopt, alloc -> attach, free -> detach ------------
    pid_a, sock_a = client(str(devs[a]["cdev"]))
    msg_a, fds_a = recv_fds(sock_a)
    emit("client A", **msg_a)
    h1 = be.adopt_device(1, fds_a[0], fds_a[1], int(msg_a["dev_id"]), int(msg_a["hwpt"]),  # type: ignore[call-overload]
                         name="a", holder_pid=pid_a)  # fmt: skip
    emit("adopt A", **h1.describe())
    be.alloc(5, 5)
    be.attach(1, "a", 5)
    emit("attach A 5", entries=pasid_entries(), bdf=bdf[a])
    # Same again: the kernel answers 0 (idempotent); the broker's view stays one owner.
    be.attach(1, "a", 5)
    emit("attach A 5 again", attachments=be.attachments())
    be.release(1, [5])
    be.free(5, 5)
    emit("free A 5", entries=pasid_entries(), attachments=be.attachments())

    # -- set 2 (client B on device b): the same number, now for another set --------------
    pid_b, sock_b = client(str(devs[b]["cdev"]))
    msg_b, fds_b = recv_fds(sock_b)
    # As the handshake hands a ticket's fds over (docs/peer-identity.md roles, in order).
    be.adopt_delegated(
        2,
        [("iommufd", fds_b[0]), ("device", fds_b[1])],
        [{"name": "b", "dev_id": msg_b["dev_id"], "pt_id": msg_b["hwpt"]}],
        holder_pid=pid_b,
    )
    for fd in fds_b:
        os.close(fd)  # adopt_delegated keeps its own copies
    be.alloc(5, 5)
    be.attach(2, "b", 5)
    emit("attach B 5", entries=pasid_entries())
    # The invariant, enforced: set 1 cannot get 5 attached while set 2's attachment stands.
    try:
        be.attach(1, "a", 5)
        emit("invariant", refused=False)
    except PasidError as exc:
        emit("invariant", refused=True, error=type(exc).__name__, message=exc.message,
            entries=pasid_entries())  # fmt: skip

    # -- bad input ----------------------------------------------------------------------
    calls: list[tuple[int, int, int]] = []
    be_counting = IommufdBackend(attach=lambda fd, pt, p: calls.append((fd, pt, p)))
    be_counting.open()
    bad: dict[str, object] = {}

    def refuse(key: str, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
            bad[key] = {"refused": False}
        except PasidError as exc:
            bad[key] = {"refused": True, "error": type(exc).__name__, "message": exc.message}

    refuse("not a vfio device", lambda: be.adopt_device(
        3, os.open("/dev/iommu", os.O_RDWR), os.open("/dev/null", os.O_RDWR), 1, 1))  # fmt: skip
    pid_n0, sock_n0 = client(str(devs[n]["cdev"]), bind=False)
    _, fds_n0 = recv_fds(sock_n0)
    refuse("not bound", lambda: be.adopt_device(3, fds_n0[0], fds_n0[1], 1, 1))
    refuse("iommufd fd is not /dev/iommu", lambda: be.adopt_device(
        3, os.open("/dev/null", os.O_RDWR), os.dup(fds_a[1]), 1, 1))  # fmt: skip
    os.kill(pid_n0, signal.SIGKILL)
    os.waitpid(pid_n0, 0)
    pid_n, sock_n = client(str(devs[n]["cdev"]), pasid_hwpt=False)
    msg_n, fds_n = recv_fds(sock_n)
    emit("client N", **msg_n)
    refuse("no PASID support", lambda: be.adopt_device(
        3, fds_n[0], fds_n[1], int(msg_n["dev_id"]), int(msg_n["hwpt"]), holder_pid=pid_n))  # type: ignore[call-overload]  # fmt: skip
    refuse("wrong dev_id", lambda: be.adopt_device(
        3, os.dup(fds_a[0]), os.dup(fds_a[1]), int(msg_a["dev_id"]) + 7, 1, name="x"))  # type: ignore[call-overload]  # fmt: skip
    # A process that does not have the device open cannot be the one delegating it.
    # It says when its inherited fds are closed: checked before that, it would still hold
    # device a (the fork's copies), and the refusal raced the child (seen under load).
    ready_r, ready_w = os.pipe()
    stranger = os.fork()
    if stranger == 0:
        only(ready_w)
        os.write(ready_w, b"x")
        os.close(ready_w)
        time.sleep(60)
        os._exit(0)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    refuse("not the owner", lambda: be.adopt_device(
        3, os.dup(fds_a[0]), os.dup(fds_a[1]), int(msg_a["dev_id"]), int(msg_a["hwpt"]),  # type: ignore[call-overload]
        name="y", holder_pid=stranger))  # fmt: skip
    os.kill(stranger, signal.SIGKILL)
    os.waitpid(stranger, 0)
    # A page table allocated without IOMMU_HWPT_ALLOC_PASID: the kernel's EINVAL, named.
    be.adopt_device(4, os.dup(fds_a[0]), os.dup(fds_a[1]), int(msg_a["dev_id"]),  # type: ignore[call-overload]
                    int(msg_a["plain_hwpt"]), name="plain", holder_pid=pid_a)  # fmt: skip
    be.alloc(6, 6)
    refuse("page table without PASID", lambda: be.attach(4, "plain", 6))
    bad["page table without PASID"]["entries"] = pasid_entries()  # type: ignore[index]
    be.free(6, 6)
    be.drop_set(4)
    # Beyond the device's width: refused before any ioctl (the counting backend's attach).
    h_cnt = be_counting.adopt_device(9, os.dup(fds_a[0]), os.dup(fds_a[1]),
                                     int(msg_a["dev_id"]), int(msg_a["hwpt"]), name="a")  # type: ignore[call-overload]  # fmt: skip
    be_counting.alloc(1 << 20, 1 << 20)
    refuse("beyond width", lambda: be_counting.attach(9, "a", 1 << 20))
    bad["beyond width"]["ioctls"] = len(calls)  # type: ignore[index]
    bad["beyond width"]["device_bits"] = h_cnt.pasid_bits  # type: ignore[index]
    be_counting.close()
    emit("bad input", **bad)

    # -- a set destroyed (its holder died): detach, then the number is free again --------
    be.alloc(7, 7)
    be.attach(1, "a", 7)
    before = pasid_entries()
    os.kill(pid_a, signal.SIGKILL)
    os.waitpid(pid_a, 0)
    # The broker still holds its copy of A's device fd: the kernel keeps the attachment
    # until the broker detaches (what the engine does when the holder's pidfd fires).
    after_kill = pasid_entries()
    be.drop_set(1)
    be.free(7, 7)
    emit("holder died", before=before, after_kill=after_kill, after_drop=pasid_entries())

    # -- revoke of set 2: the same path as destruction -----------------------------------
    be.drop_set(2)
    be.free(5, 5)
    emit("revoke B", entries=pasid_entries(), attachments=be.attachments())

    # -- the broker dies while a client keeps its device open ----------------------------
    # Device a again: nothing holds it now (a cdev can be open for one bind at a time).
    for _ in range(20):
        pid_c, sock_c = client(str(devs[a]["cdev"]))
        msg_c, fds_c = recv_fds(sock_c)
        if fds_c:
            break
        os.kill(pid_c, signal.SIGKILL)  # device a not released yet: say so, try again
        os.waitpid(pid_c, 0)
        emit("client C retry", **msg_c)
        time.sleep(0.25)
    broker = os.fork()
    if broker == 0:
        try:
            be2 = IommufdBackend()
            be2.open()
            be2.adopt_device(1, fds_c[0], fds_c[1], int(msg_c["dev_id"]), int(msg_c["hwpt"]),  # type: ignore[call-overload]
                             name="c", holder_pid=pid_c)  # fmt: skip
            be2.alloc(9, 9)
            be2.attach(1, "c", 9)
        except BaseException as exc:
            emit("broker child failed", error=repr(exc))
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(broker, 0)
    for fd in fds_c:
        os.close(fd)
    after_broker_death = pasid_entries()
    os.kill(pid_c, signal.SIGKILL)
    os.waitpid(pid_c, 0)
    time.sleep(0.2)
    emit("broker died", after_broker_death=after_broker_death, after_client_exit=pasid_entries())

    for pid in (pid_b, pid_n):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    be.close()
    emit("entries at end", entries=pasid_entries())
    run_restart(str(devs[a]["cdev"]), bdf[a])
    run_daemon(str(devs[b]["cdev"]), bdf[b])
    return 0


def run_restart(cdev: str, bdf: str) -> None:
    """Issue 19, point 3 in a real kernel: the daemon (--backend iommufd) is kill -9'd
    while a holder's PASIDs are attached to its device, and started again on the same
    store. The kernel keeps the attachments (the holder's own fds); the restarted broker
    keeps the set, detached, for its live verified holder (--restart-grace 0: a grace
    would reclaim it at once), the holder re-attaches re-delegating its device (the
    broker counts what is still attached as its own: a free detaches it), and the
    holder's exit, with no release, detaches the rest in the IOMMU and ends the set.

    The brokers and the holder are forks of this process taken before it makes any gRPC
    channel (a fork after that is unsafe; a second Python start costs 20-30 s in TCG):
    everything is imported first, and this process talks gRPC only after the last fork."""
    from pasid_client import Client, Ticket, obtain_ticket

    from broker.__main__ import main as broker_main

    run = Path(SCRATCH) / "restart"
    run.mkdir(exist_ok=True)
    sock, admin, peer = (str(run / n) for n in ("broker.sock", "admin.sock", "peer.sock"))
    argv = ["--backend", "iommufd", "--db", str(run / "broker.db"), "--socket", sock,
            "--metrics-address", "off", "--restart-grace", "0", "--log-format", "json"]  # fmt: skip
    result: Result = {}

    def start_broker(log: str) -> int:
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                out = os.open(run / log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(out, 1)
                os.dup2(out, 2)
                code = broker_main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def holder(conn: socket.socket) -> None:
        """A VMM: binds its device, delegates it, allocates; after the restart it lists
        its sets, re-attaches the detached one re-delegating the device, frees one PASID."""
        for _ in range(40):  # device a is released asynchronously after its last user
            dev = ictx = -1
            try:
                dev = os.open(cdev, os.O_RDWR)
                ictx = os.open("/dev/iommu", os.O_RDWR)
                dev_id = uapi.bind(dev, ictx)
                break
            except OSError:
                for fd in (dev, ictx):
                    if fd >= 0:
                        os.close(fd)
                time.sleep(0.25)
        else:
            raise RuntimeError(f"{cdev} never became free")
        hwpt = uapi.hwpt_alloc(ictx, dev_id, uapi.ioas_alloc(ictx), uapi.IOMMU_HWPT_ALLOC_PASID)
        meta = {"devices": [{"name": "vf", "dev_id": dev_id, "pt_id": hwpt}]}

        def delegate() -> Ticket:
            return obtain_ticket(peer, fds=[("iommufd", ictx), ("device", dev)], meta=meta)

        c = Client(f"unix:{sock}", timeout=60)
        c.wait_ready(120)
        # No reconnect of its own (deadline 0): the restarted broker's listing must show
        # the set detached, and the re-attach below is the path under test.
        s = c.session("restart-vmm", ticket=delegate(), reconnect_deadline_seconds=0)
        got = s.alloc(11, 12, count=2, device="vf")
        conn.send(json.dumps({"pid": os.getpid(), "set_id": s.set_id, "pasids": got,
                              "verified": s.verified}).encode())  # fmt: skip
        conn.recv(16)  # the broker was killed and started again meanwhile; `s` is dead
        c2 = Client(f"unix:{sock}", timeout=60)
        c2.wait_ready(120)
        held = [[v.set_id, v.detached_unix > 0] for v in c2.held_sets()]
        s2 = c2.session("restart-vmm", ticket=delegate(), reattach_set_id=s.set_id)
        view = s2.list()
        freed = s2.free(11, 11)
        conn.send(json.dumps({"held": held, "resumed": s2.resumed, "set_id": s2.set_id,
                              "ranges": view.ranges, "freed": freed}).encode())  # fmt: skip
        conn.recv(16)  # holds its set (and its fds) until it is killed

    def ask(conn: socket.socket) -> dict[str, object]:
        reply: dict[str, object] = json.loads(conn.recv(65536) or b'{"error": "holder died"}')
        if "error" in reply:
            raise RuntimeError(f"holder: {reply['error']}")
        return reply

    def sets(adm: Client) -> list[dict[str, object]]:
        return [dataclasses.asdict(v) for v in adm.list_sets()]

    def wait_for(what: Callable[[], bool], seconds: float = 30.0) -> float:
        t0 = time.monotonic()
        while not what() and time.monotonic() - t0 < seconds:
            time.sleep(0.05)
        return round(time.monotonic() - t0, 3)

    def here() -> list[int]:
        return pasid_entries().get(bdf, [])

    b1 = start_broker("broker1.log")
    conn, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(150)  # below the boot's timeout: a hang is reported, not cut off
    h = os.fork()
    if h == 0:
        conn.close()
        try:
            holder(theirs)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                theirs.send(json.dumps({"error": repr(exc)}).encode())
        os._exit(0)
    theirs.close()
    b2 = 0
    try:
        result["holder"] = first = ask(conn)
        result["attached"] = here()
        os.kill(b1, signal.SIGKILL)
        os.waitpid(b1, 0)
        b1 = 0
        result["after broker kill"] = here()
        b2 = start_broker("broker2.log")  # the last fork: gRPC channels from here on
        with Client(f"unix:{sock}", timeout=60) as c, Client(f"unix:{admin}", timeout=60) as adm:
            c.wait_ready(120)
            result["after restart"] = here()
            result["sets after restart"] = sets(adm)
            conn.send(b"reattach")
            result["reattached"] = ask(conn)
            result["after reattach"] = here()
            result["sets after reattach"] = sets(adm)
            os.kill(h, signal.SIGKILL)  # the holder exits; it released nothing
            os.waitpid(h, 0)
            h = 0
            result["detached after s"] = wait_for(lambda: 12 not in here())
            result["after holder exit"] = here()
            result["set gone after s"] = wait_for(
                lambda: all(s["set_id"] != first["set_id"] for s in sets(adm))
            )
            result["sets after holder exit"] = sets(adm)
    except Exception as exc:
        result["error"] = repr(exc)
    finally:
        for pid, sig in ((h, signal.SIGKILL), (b1, signal.SIGKILL), (b2, signal.SIGTERM)):
            if pid:
                with contextlib.suppress(ChildProcessError, ProcessLookupError):
                    os.kill(pid, sig)  # not reaped yet: the pid is still ours
                    _, st = os.waitpid(pid, 0)
                    if pid == b2:
                        result["status"] = os.waitstatus_to_exitcode(st)
        conn.close()
    for log in ("broker1.log", "broker2.log"):
        text = (run / log).read_text(errors="replace") if (run / log).exists() else ""
        keep = ("recovered", "adopted", "resumed", "reclaimed", "detach", "Traceback", "rror")
        result[log] = [ln[:300] for ln in text.splitlines() if any(k in ln for k in keep)][-12:]
    emit("broker restart", **result)


def run_daemon(cdev: str, bdf: str) -> None:
    """The daemon's main() on --backend iommufd, in this process: a client reads GetInfo's
    widths and /metrics, delegates a device and allocates on it, then SIGTERMs it."""
    import urllib.request

    from pasid_client import Client, obtain_ticket

    sock = f"{SCRATCH}/iommufd.sock"

    def client(result: Result) -> None:
        with Client(f"unix:{sock}") as c:
            c.wait_ready(60)
            info = c.info()
            result["backend"] = info.backend
            result["pasid_bits"] = info.pasid_bits
            result["widths"] = [list(w) for w in info.widths]
            with c.session("guest-vm") as sess:
                result["pasids"] = list(sess.alloc(1, 1023, count=2))
                try:
                    sess.alloc(1, 1023, device="nope")
                except Exception as exc:
                    result["unknown device"] = f"{type(exc).__name__}: {exc}"
            # The whole path: a VMM binds its device, delegates it over the peer
            # handshake (SCM_RIGHTS), allocs naming it; the kernel shows each step.
            peer = os.path.join(os.path.dirname(sock), "peer.sock")
            dev = os.open(cdev, os.O_RDWR)
            ictx = os.open("/dev/iommu", os.O_RDWR)
            dev_id = uapi.bind(dev, ictx)
            hwpt = uapi.hwpt_alloc(ictx, dev_id, uapi.ioas_alloc(ictx), uapi.IOMMU_HWPT_ALLOC_PASID)
            try:
                with open("/dev/null", "rb") as null:
                    meta = {"devices": [{"name": "x", "dev_id": 1, "pt_id": 1}]}
                    obtain_ticket(peer, fds=[("device", null.fileno())], meta=meta)
            except Exception as exc:
                result["bad handshake"] = f"{type(exc).__name__}: {exc}"
            ticket = obtain_ticket(
                peer,
                fds=[("iommufd", ictx), ("device", dev)],
                meta={"devices": [{"name": "vf", "dev_id": dev_id, "pt_id": hwpt}]},
            )
            with c.session("vmm", ticket=ticket) as vmm:
                got = list(vmm.alloc(1, 1023, count=2, device="vf"))
                result["delegated alloc"] = got
                result["after alloc"] = pasid_entries().get(bdf, [])
                result["widths with device"] = [list(w) for w in c.info().widths]
                vmm.free(got[0], got[0])
                result["after free"] = pasid_entries().get(bdf, [])
                try:
                    vmm.alloc(1 << 20, (1 << 20) + 5, device="vf")
                except Exception as exc:
                    result["beyond width"] = f"{type(exc).__name__}: {exc}"
            deadline = time.monotonic() + 10
            while pasid_entries().get(bdf, []) and time.monotonic() < deadline:
                time.sleep(0.1)  # the set's end is committed after the stream closes
            result["after session end"] = pasid_entries().get(bdf, [])
            os.close(dev)
            os.close(ictx)
        body = urllib.request.urlopen("http://127.0.0.1:19464/metrics", timeout=10).read()
        result["metrics"] = [
            ln for ln in body.decode().splitlines() if ln.startswith("pasid_broker_pasid_width")
        ]

    argv = ["--backend", "iommufd", "--db", f"{SCRATCH}/iommufd.db", "--socket", sock,
            "--metrics-address", "127.0.0.1:19464", "--log-format", "json"]  # fmt: skip
    status, stderr, result = run_main(argv, sock, client)
    result["status"] = status
    result["log"] = [ln for ln in stderr.splitlines() if "iommufd" in ln][:3]
    emit("daemon", **result)


if __name__ == "__main__":
    try:
        code = main()
    except BaseException as exc:
        emit("error", error=repr(exc), trace=traceback.format_exc()[-3000:])
        code = 1
    emit("guest script done", status=code, errno=errno.errorcode.get(0, 0))
    sys.exit(code)
