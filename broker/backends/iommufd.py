"""The iommufd backend: the kernel's PASID attachments follow the broker's sets.

On today's kernels (6.15+) userspace picks a PASID number and attaches it through iommufd
(VFIO_DEVICE_ATTACH_IOMMUFD_PT with VFIO_DEVICE_ATTACH_PASID); nothing in the kernel
arbitrates that number across processes. Here the broker does: a client delegates its VFIO
device cdev fd (bound to its iommufd), that iommufd fd, the dev_id BIND returned and the
page table (pt_id) it wants PASIDs attached to. `adopt_device()` checks all of it against
the kernel; `attach()` attaches a PASID the broker has granted to that set;
`release()` detaches before the numbers return to the pool (free, set destruction, revoke).

The invariant this module keeps, and refuses to break: a PASID is attached, on any device,
for at most one set, and never for a set that does not hold it (`_owner`).

Numbers alone (alloc/free, the Backend protocol) are bookkeeping: the kernel has no
userspace PASID allocator. The broker's restart drops every attachment with the fds (the
kernel detaches when the last reference to a device fd closes); recovered sets hold their
numbers, and their clients re-delegate their devices when they resume (docs/vfio.md).

The kernel's word on a delegated fd (VFIO cdev? /dev/iommu? open in the holder? widths)
is read in iommufd_checks.py; the ioctls are in iommufd_uapi.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.backends import iommufd_uapi as uapi
from broker.backends.base import Capabilities
from broker.backends.iommufd_checks import (
    check_iommufd,
    config_pasid_bits,
    device_key,
    holder_has,
    open_elsewhere,
    pasid_bits_from_config,
    pasid_bits_from_ecap,
    vfio_device_path,
)
from broker.core.errors import (
    Conflict,
    DetachFailed,
    InvalidArgument,
    InvalidRange,
    NotFound,
    PasidError,
    PermissionDenied,
    Unsupported,
)

__all__ = ["DeviceHandle", "IommufdBackend", "pasid_bits_from_config", "pasid_bits_from_ecap"]

log = logging.getLogger("pasid_broker.iommufd")

DEV_IOMMU = "/dev/iommu"
SYSFS_IOMMU = "/sys/class/iommu"


@dataclass(eq=False)
class DeviceHandle:
    """One delegated device: the broker's own copies of the fds, and what the kernel said."""

    name: str
    set_id: int
    iommufd: int
    device_fd: int
    dev_id: int
    pt_id: int
    pasid_bits: int  # IOMMU_GET_HW_INFO out_max_pasid_log2
    hw_type: str
    capabilities: int
    syspath: str
    attached: set[int] = field(default_factory=set)
    # The device's name across a restart (iommufd_checks.device_key): stored with a
    # PASID whose DETACH failed, so that a restarted broker can tell whether any
    # process still has the device open.
    key: str = ""

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "set_id": self.set_id,
            "dev_id": self.dev_id,
            "pt_id": self.pt_id,
            "pasid_bits": self.pasid_bits,
            "iommu": self.hw_type,
            "capabilities": self.capabilities,
            "device": self.syspath,
            "attached": sorted(self.attached),
        }


class IommufdBackend:
    """Numbers as bookkeeping, attachments as the kernel's state; one thread at a time."""

    def __init__(
        self,
        *,
        dev_iommu: str = DEV_IOMMU,
        sysfs_iommu: str = SYSFS_IOMMU,
        name: str = "iommufd",
        attach: Callable[[int, int, int], None] = uapi.attach_pasid,
        detach: Callable[[int, int], None] = uapi.detach_pasid,
    ) -> None:
        self.name = name
        self.dev_iommu = dev_iommu
        self.sysfs_iommu = sysfs_iommu
        self._attach = attach
        self._detach = detach
        self.pasid_bits = 0
        self.iommu_widths: dict[str, int] = {}
        self.held: set[int] = set()
        self._devices: dict[int, dict[str, DeviceHandle]] = {}
        self._owner: dict[int, int] = {}  # pasid -> set_id it is attached for
        # Devices of gone sets whose DETACH failed, kept open for retry_detach().
        self._stuck: dict[int, list[DeviceHandle]] = {}

    # -- discovery -----------------------------------------------------------------------

    def open(self) -> Capabilities:
        if not os.path.exists(self.dev_iommu):
            raise Unsupported(
                f"iommufd backend: this kernel has no {self.dev_iommu} (built without"
                " CONFIG_IOMMUFD, as Debian's are); use a kernel with IOMMUFD and"
                " VFIO_DEVICE_CDEV, or --backend vfio/simulator"
            )
        widths: dict[str, int] = {}
        for unit in sorted(os.listdir(self.sysfs_iommu)) if os.path.isdir(self.sysfs_iommu) else []:
            path = os.path.join(self.sysfs_iommu, unit, "intel-iommu", "ecap")
            try:
                with open(path) as f:
                    widths[unit] = pasid_bits_from_ecap(int(f.read().strip(), 16))
            except (OSError, ValueError):
                continue
        self.iommu_widths = widths
        if not widths:
            raise Unsupported(
                f"iommufd backend: no VT-d unit in {self.sysfs_iommu}/*/intel-iommu/ecap (the"
                " broker reads the PASID width from ECAP.PSS; boot with intel_iommu=on,sm_on)"
            )
        bits = min(widths.values())
        if bits == 0:
            off = sorted(u for u, b in widths.items() if b == 0)
            raise Unsupported(
                f"iommufd backend: IOMMU {', '.join(off)} has no PASID support (ECAP.PASID 0;"
                " scalable mode off? boot with intel_iommu=on,sm_on)"
            )
        self.pasid_bits = bits
        detail = ", ".join(f"{u}: {b} bits" for u, b in sorted(widths.items()))
        log.info("iommufd backend: PASID width %d from VT-d ECAP.PSS (%s)", bits, detail)
        return Capabilities(
            self.name, bits, f"sysfs ecap PSS+1 ({self.sysfs_iommu})", f"iommus: {detail}"
        )

    # -- numbers (the Backend protocol) -------------------------------------------------

    def alloc(self, lo: int, hi: int) -> int:
        for p in range(lo, hi + 1):
            if p not in self.held:
                self.held.add(p)
                return p
        raise Conflict(f"iommufd backend: [{lo}, {hi}] already held")

    def free(self, lo: int, hi: int) -> None:
        """Numbers go back; any attachment still on them is detached first."""
        for p in [p for p in self._owner if lo <= p <= hi]:
            self._detach_everywhere(p)
        if hi - lo < 4096:
            self.held.difference_update(range(lo, hi + 1))
        else:
            self.held.difference_update([p for p in self.held if lo <= p <= hi])

    def replay(self, pasids: Iterable[int]) -> int:
        n = 0
        for p in pasids:
            self.held.add(p)
            n += 1
        return n

    def close(self) -> None:
        for set_id in list(self._devices):
            with contextlib.suppress(DetachFailed):
                self.drop_set(set_id)
        for handles in self._stuck.values():
            for h in handles:
                self._close(h)  # the kernel detaches at the last close
        self._stuck.clear()
        self.held.clear()

    # -- devices -------------------------------------------------------------------------

    def adopt_device(
        self,
        set_id: int,
        iommufd_fd: int,
        device_fd: int,
        dev_id: int,
        pt_id: int,
        *,
        name: str = "",
        holder_pid: int | None = None,
        held: Iterable[int] = (),
    ) -> DeviceHandle:
        """Take over the (broker-owned) fds of a delegated device, after checking them.

        The fds are closed here on refusal, and by drop_set() otherwise. `holder_pid`, the
        set's verified holder, must have the device open itself (kcmp KCMP_FILE). `held`:
        PASIDs the set already holds (a set recovered after a restart); they may still be
        attached on this device from before, so they count as attached here and are
        detached on release (DETACH of a PASID never attached is a no-op: 0)."""
        try:
            handle = self._adopt(set_id, iommufd_fd, device_fd, dev_id, pt_id, name, holder_pid)
        except BaseException:
            for fd in (iommufd_fd, device_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        self.assume_attached(handle, held)
        return handle

    def assume_attached(self, handle: DeviceHandle, pasids: Iterable[int]) -> None:
        """Count the set's `pasids` as attached on `handle` (they may be, from before a
        restart), so that release() detaches them; another set's attachment is kept."""
        for p in pasids:
            if self._owner.get(p, handle.set_id) == handle.set_id and 0 < p < (
                1 << handle.pasid_bits
            ):
                handle.attached.add(p)
                self._owner[p] = handle.set_id

    def _adopt(
        self,
        set_id: int,
        iommufd_fd: int,
        device_fd: int,
        dev_id: int,
        pt_id: int,
        name: str,
        holder_pid: int | None,
    ) -> DeviceHandle:
        if not (0 <= dev_id < 2**32 and 0 <= pt_id < 2**32):
            raise InvalidArgument(f"iommufd adopt: dev_id {dev_id} / pt_id {pt_id} out of range")
        syspath = vfio_device_path(device_fd)
        check_iommufd(iommufd_fd, self.dev_iommu)
        name = name or os.path.basename(syspath)
        if name in self._devices.get(set_id, {}):
            raise Conflict(f"iommufd adopt: set {set_id} already has a device named {name!r}")
        if holder_pid is not None and not holder_has(holder_pid, device_fd):
            raise PermissionDenied(
                f"iommufd adopt: device {name} is not open in the set's holder (pid"
                f" {holder_pid}); only the process that owns a device can delegate it"
            )
        try:
            uapi.device_info(device_fd)
        except PasidError as exc:
            if exc.errno == errno.EINVAL:
                raise InvalidArgument(
                    f"iommufd bind: device {name} is not bound to an iommufd"
                    " (VFIO_DEVICE_BIND_IOMMUFD it first, then delegate it)"
                ) from None
            raise
        info = uapi.hw_info(iommufd_fd, dev_id)
        bits = int(info.out_max_pasid_log2)
        hw_type = uapi.HW_INFO_TYPES.get(int(info.out_data_type), str(info.out_data_type))
        cfg_bits = config_pasid_bits(syspath)
        if cfg_bits is not None and (bits > cfg_bits or (bits == 0) != (cfg_bits == 0)):
            raise InvalidArgument(
                f"iommufd hw_info: dev_id {dev_id} is not device {name} (the kernel reports"
                f" {bits} PASID bits for it, the device's config space {cfg_bits})"
            )
        if bits == 0:
            raise Unsupported(
                f"iommufd hw_info: device {name} has no PASID support"
                " (IOMMU_GET_HW_INFO out_max_pasid_log2 = 0: no PCIe PASID capability, or"
                " its IOMMU runs without PASIDs)"
            )
        handle = DeviceHandle(
            name=name,
            set_id=set_id,
            iommufd=iommufd_fd,
            device_fd=device_fd,
            dev_id=dev_id,
            pt_id=pt_id,
            pasid_bits=bits,
            hw_type=hw_type,
            capabilities=int(info.out_capabilities),
            syspath=syspath,
            key=device_key(device_fd),
        )
        self._devices.setdefault(set_id, {})[name] = handle
        log.info(
            "iommufd: set %d adopted device %s (dev_id %d, pt_id %d, %d PASID bits, %s)",
            set_id,
            name,
            dev_id,
            pt_id,
            bits,
            hw_type,
        )
        return handle

    def adopt_delegated(
        self,
        set_id: int,
        fds: Sequence[tuple[str, int]],
        devices: Sequence[Mapping[str, Any]],
        *,
        holder_pid: int | None,
        held: Iterable[int] = (),
    ) -> list[DeviceHandle]:
        """What a ticket delegated (docs/peer-identity.md roles, in order): one "iommufd" fd and
        one "device" fd per entry of `devices` ({"name", "dev_id", "pt_id"}). All or none:
        on any refusal the devices adopted so far are dropped. The caller keeps its fds
        (they are dup'ed here)."""
        iommufds = [fd for role, fd in fds if role == "iommufd"]
        device_fds = [fd for role, fd in fds if role == "device"]
        if len(iommufds) != 1 or len(device_fds) != len(devices):
            raise InvalidArgument(
                f"iommufd delegation: needs one 'iommufd' fd and one 'device' fd per entry of"
                f" devices; got {len(iommufds)} iommufd, {len(device_fds)} device fds for"
                f" {len(devices)} devices"
            )
        names = [str(d.get("name", "")) for d in devices]
        if len(set(names)) != len(names) or any(n in self._devices.get(set_id, {}) for n in names):
            raise InvalidArgument(f"iommufd delegation: device names must be unique: {names}")
        held = list(held)
        adopted: list[DeviceHandle] = []
        try:
            for d, fd in zip(devices, device_fds, strict=True):
                adopted.append(
                    self.adopt_device(
                        set_id,
                        os.dup(iommufds[0]),
                        os.dup(fd),
                        int(d["dev_id"]),
                        int(d["pt_id"]),
                        name=str(d["name"]),
                        holder_pid=holder_pid,
                        held=held,
                    )
                )
        except BaseException:
            for h in adopted:
                self._forget_device(h)
            raise
        return adopted

    def _forget_device(self, handle: DeviceHandle) -> None:
        """Undo an adopt that attached nothing yet (all-or-none delegation)."""
        self._devices.get(handle.set_id, {}).pop(handle.name, None)
        for p in list(handle.attached):
            if self._owner.get(p) == handle.set_id:
                del self._owner[p]
        for fd in (handle.device_fd, handle.iommufd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def check_fd(self, role: str, fd: int) -> None:
        """The handshake's early check of a delegated fd's kind (full checks at adopt)."""
        if role == "iommufd":
            check_iommufd(fd, self.dev_iommu)
        elif role == "device":
            vfio_device_path(fd)
        else:
            raise InvalidArgument(f"iommufd: unknown fd role {role!r}")

    def devices(self, set_id: int | None = None) -> list[DeviceHandle]:
        sets = [set_id] if set_id is not None else sorted(self._devices)
        return [h for s in sets for h in self._devices.get(s, {}).values()]

    def device(self, set_id: int, name: str) -> DeviceHandle:
        handle = self._devices.get(set_id, {}).get(name)
        if handle is None:
            have = ", ".join(sorted(self._devices.get(set_id, {}))) or "none"
            raise NotFound(f"iommufd: set {set_id} has no device {name!r} (delegated: {have})")
        return handle

    def check_width(self, handle: DeviceHandle, pasid: int) -> None:
        """Refuse a PASID beyond the device's width before any ioctl."""
        if not 0 < pasid < (1 << handle.pasid_bits):
            raise InvalidRange(
                f"iommufd attach: PASID {pasid} is beyond device {handle.name}'s width"
                f" ({handle.pasid_bits} bits: 1..{(1 << handle.pasid_bits) - 1})"
            )

    # -- attachments ---------------------------------------------------------------------

    def attach(self, set_id: int, name: str, pasid: int) -> None:
        """Attach a PASID the broker granted to `set_id` on its device `name`."""
        handle = self.device(set_id, name)
        self.check_width(handle, pasid)
        owner = self._owner.get(pasid)
        if owner is not None and owner != set_id:
            # The invariant: never two sets on one PASID in the kernel. The engine's order
            # (detach before the number returns to the pool) makes this unreachable.
            raise Conflict(f"iommufd attach: PASID {pasid} is still attached for set {owner}")
        if pasid not in self.held:
            raise Conflict(f"iommufd attach: PASID {pasid} is not held by the broker")
        self._attach(handle.device_fd, handle.pt_id, pasid)
        handle.attached.add(pasid)
        self._owner[pasid] = set_id

    def detach(self, set_id: int, pasid: int) -> None:
        """Detach `pasid` from every device of `set_id` (DETACH never fails in 7.2)."""
        for handle in self._devices.get(set_id, {}).values():
            if pasid in handle.attached:
                self._detach(handle.device_fd, pasid)
                handle.attached.discard(pasid)
        if self._owner.get(pasid) == set_id:
            del self._owner[pasid]

    def _detach_everywhere(self, pasid: int) -> None:
        owner = self._owner.get(pasid)
        if owner is not None:
            self.detach(owner, pasid)

    def release(self, set_id: int, pasids: Iterable[int]) -> None:
        """The set gives these up (free, destroy, revoke): detach before they are reused."""
        for p in pasids:
            if self._owner.get(p) == set_id:
                self.detach(set_id, p)

    def drop_set(self, set_id: int) -> None:
        """The set is gone: detach everything attached for it and close its device fds.

        A DETACH the kernel refuses leaves that PASID attached for the set (`_owner`
        keeps it: no other set can attach it) and its device's fds open, so that
        retry_detach() can try again; DetachFailed names those PASIDs, which the engine
        withholds from the pool (docs/quarantine.md, "A failed kernel call at a set's end")."""
        errors: list[str] = []
        failed: set[int] = set()
        for handle in self._devices.pop(set_id, {}).values():
            for p in sorted(handle.attached):
                try:
                    self._detach(handle.device_fd, p)
                except PasidError as exc:
                    errors.append(exc.message)
                    failed.add(p)
                    continue
                handle.attached.discard(p)
            if handle.attached:
                self._stuck.setdefault(set_id, []).append(handle)
            else:
                self._close(handle)  # the kernel detaches what is left at the LAST close
        for p in [p for p, s in self._owner.items() if s == set_id and p not in failed]:
            del self._owner[p]
        if errors:
            raise DetachFailed(errno.EIO, "; ".join(errors), tuple(sorted(failed)))

    @staticmethod
    def _close(handle: DeviceHandle) -> None:
        for fd in (handle.device_fd, handle.iommufd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def stuck(self) -> dict[int, list[int]]:
        """set_id -> PASIDs a gone set left attached (a failed DETACH), ascending."""
        return {
            sid: sorted({p for h in handles for p in h.attached})
            for sid, handles in self._stuck.items()
        }

    def stuck_devices(self, set_id: int) -> list[str]:
        """The keys (DeviceHandle.key) of the gone set's devices with a PASID still
        attached, for the store: what a restarted broker looks for (open_elsewhere)."""
        return sorted({h.key for h in self._stuck.get(set_id, []) if h.key and h.attached})

    def still_delegated(self, keys: Sequence[str]) -> str | None:
        """Why these devices may still be bound, as far as the broker's own state says
        (on the event loop): no keys (nothing to look for, no proof), or a live set of
        ours has one delegated (its fd may be the same bound file). None: only a look
        through /proc (open_elsewhere) can tell."""
        if not keys:
            return "no device was recorded for them"
        live = sorted({h.set_id for h in self.devices() if h.key in keys})
        if live:
            return f"device delegated to set {', '.join(map(str, live))}"
        return None

    def open_elsewhere(self, keys: Sequence[str], give_up_after: float) -> str | None:
        """None if no other process has any of these devices open: then no binding of
        them is left, and nothing is attached through one; else why not
        (iommufd_checks.open_elsewhere). Reads /proc and nothing of the broker's state,
        so it may run on a thread of its own; a look longer than `give_up_after`
        seconds proves nothing."""
        return open_elsewhere(keys, give_up_after=give_up_after)

    def detach_on(self, key: str, pasids: Sequence[int]) -> bool:
        """After a restart: DETACH `pasids` through a device a live set delegated that is
        the device `key` names; True if every DETACH succeeded. That device's fd is its
        one bound file (a VFIO cdev is bound through one open file at a time), so a
        success means none of them is attached on it any more (a DETACH of one never
        attached there is a no-op). False when no such device is delegated now, or the
        kernel refused; a PASID some set has attached is never touched (none should be:
        they are withheld)."""
        handle = next((h for h in self.devices() if h.key == key), None)
        if handle is None or any(p in self._owner for p in pasids):
            return False
        for p in pasids:
            try:
                self._detach(handle.device_fd, p)
            except PasidError as exc:
                log.debug("iommufd: retried DETACH of %d on %s failed: %s", p, key, exc)
                return False
        return True

    def retry_detach(self) -> list[int]:
        """Try the failed DETACHes again; returns the PASIDs now detached everywhere (a
        device with nothing left attached has its fds closed)."""
        done: list[int] = []
        for sid in list(self._stuck):
            before = set(self.stuck()[sid])
            for handle in self._stuck[sid]:
                for p in sorted(handle.attached):
                    try:
                        self._detach(handle.device_fd, p)
                    except PasidError:
                        continue
                    handle.attached.discard(p)
            done += self._settle(sid, before)
        return sorted(done)

    def let_go(self, set_id: int) -> list[int]:
        """The gone set's holder has exited and no other process has its devices open
        (open_elsewhere): close the broker's copies of its device fds, the last ones (the
        kernel detaches at a device fd's last close); returns the PASIDs."""
        before = set(self.stuck().get(set_id, ()))
        for handle in self._stuck.get(set_id, []):
            handle.attached.clear()
        return self._settle(set_id, before)

    def _settle(self, set_id: int, before: set[int]) -> list[int]:
        """Close the fds of the set's stuck devices with nothing attached; forget the
        owner of each PASID no device of it has attached any more; return those."""
        keep: list[DeviceHandle] = []
        for handle in self._stuck.pop(set_id, []):
            if handle.attached:
                keep.append(handle)
            else:
                self._close(handle)
        if keep:
            self._stuck[set_id] = keep
        still = {p for h in keep for p in h.attached}
        freed = sorted(before - still)
        for p in freed:
            if self._owner.get(p) == set_id:
                del self._owner[p]
        return freed

    def widths(self) -> list[tuple[str, str, int, int]]:
        out = [("iommu", unit, bits, 0) for unit, bits in sorted(self.iommu_widths.items())]
        out += [("device", h.name, h.pasid_bits, h.set_id) for h in self.devices()]
        return out

    def attachments(self) -> dict[int, int]:
        """pasid -> set_id, as the broker believes the kernel has it."""
        return dict(self._owner)
