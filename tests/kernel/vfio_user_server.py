"""A PASID-capable PCI device for QEMU's vfio-user-pci, written for the iommufd tier.

No device QEMU emulates has a PCIe PASID capability, so this process serves one over the
vfio-user protocol (QEMU's docs/interop/vfio-user.rst, written from the spec): a
root-complex-integrated endpoint whose DEVCAP2 says End-End TLP Prefix Supported (Linux
enables PASID only then) and a PASID extended capability (ID 0x1b) of width `pasid_bits`
at 0x100 (none at all for width 0). No BARs, no interrupts, DMA maps acknowledged and
otherwise ignored: the guest kernel only has to probe it, bind it to vfio-pci and let the
IOMMU program PASID entries.

Config-space writes are kept (the kernel sets the PASID enable bit), so the tier can read
back what the guest's IOMMU driver did. Run: `python3 vfio_user_server.py SOCKET [bits]`.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys

VERSION, DMA_MAP, DMA_UNMAP, GET_INFO, GET_REGION_INFO = 1, 2, 3, 4, 5
GET_IRQ_INFO, SET_IRQS, REGION_READ, REGION_WRITE, RESET = 7, 8, 9, 10, 13
REPLY, ERROR = 0x1, 0x20
CONFIG_REGION = 7  # VFIO_PCI_CONFIG_REGION_INDEX
NUM_REGIONS = 9  # BAR0-5, ROM, CONFIG, VGA
NUM_IRQS = 5  # INTx, MSI, MSI-X, ERR, REQ
VENDOR, DEVICE = 0x1B36, 0x00F0  # a QEMU-range id nothing else uses here
PASID_CAP = 0x100
PCIE_CAP = 0x40


def config_space(pasid_bits: int) -> bytearray:
    c = bytearray(4096)
    struct.pack_into("<HH", c, 0x00, VENDOR, DEVICE)
    struct.pack_into("<HH", c, 0x04, 0, 0x0010)  # status: capability list
    c[0x0B] = 0xFF  # class: unassigned (nothing in the guest claims it)
    c[0x34] = PCIE_CAP
    # PCI Express capability, version 2, type 9 = Root Complex Integrated Endpoint.
    struct.pack_into("<BBH", c, PCIE_CAP, 0x10, 0x00, 0x0092)
    struct.pack_into("<I", c, PCIE_CAP + 0x24, 1 << 21)  # DEVCAP2: End-End TLP Prefix
    if pasid_bits:  # PASID extended capability: id 0x1b, version 1, last in the list
        struct.pack_into("<I", c, PASID_CAP, 0x1B | (1 << 16))
        struct.pack_into("<HH", c, PASID_CAP + 4, (pasid_bits & 0x1F) << 8, 0)
    return c


WRITABLE = {0x04, 0x05, 0x0C, 0x0D, 0x3C, PCIE_CAP + 8, PCIE_CAP + 9, PASID_CAP + 6}


def serve(conn: socket.socket, pasid_bits: int, log: object = None) -> None:
    cfg = config_space(pasid_bits)

    def recv_exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    while True:
        try:
            hdr, anc, _flags, _ = conn.recvmsg(16, socket.CMSG_SPACE(64 * 4))
        except ConnectionResetError:
            return
        if not hdr:
            return
        for level, kind, data in anc:  # DMA map fds: acknowledged, never used
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        if len(hdr) < 16:
            hdr += recv_exact(16 - len(hdr))
        msg_id, cmd, size, flags, _err = struct.unpack("<HHIII", hdr)
        try:
            body = recv_exact(size - 16)
        except EOFError:
            return
        err = 0
        out = b""
        if cmd == VERSION:
            caps = {"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 1048576}}
            major, minor = struct.unpack_from("<HH", body)
            out = struct.pack("<HH", major, minor) + json.dumps(caps).encode() + b"\0"
        elif cmd == GET_INFO:
            out = struct.pack("<IIII", 16, 0x3, NUM_REGIONS, NUM_IRQS)  # RESET | PCI
        elif cmd == GET_REGION_INFO:
            (index,) = struct.unpack_from("<I", body, 8)
            if index == CONFIG_REGION:
                out = struct.pack("<IIIIQQ", 32, 0x3, index, 0, len(cfg), 0)
            else:
                out = struct.pack("<IIIIQQ", 32, 0, index, 0, 0, 0)
        elif cmd == GET_IRQ_INFO:
            (index,) = struct.unpack_from("<I", body, 8)
            out = struct.pack("<IIII", 16, 0, index, 0)
        elif cmd in (REGION_READ, REGION_WRITE):
            offset, region, count = struct.unpack_from("<QII", body)
            if region != CONFIG_REGION or offset + count > len(cfg):
                data = bytes(count)
            elif cmd == REGION_READ:
                data = bytes(cfg[offset : offset + count])
            else:
                data = body[16 : 16 + count]
                for i, b in enumerate(data):
                    if offset + i in WRITABLE:
                        cfg[offset + i] = b
                if log is not None and offset <= PASID_CAP + 6 < offset + count:
                    print(f"pasid control <- {cfg[PASID_CAP + 6]:#x}", file=log, flush=True)
            out = struct.pack("<QII", offset, region, count)
            if cmd == REGION_READ:
                out += data
        elif cmd in (DMA_MAP, SET_IRQS, RESET):
            out = b""
        elif cmd == DMA_UNMAP:
            out = body[:24]
        else:
            err = 95  # EOPNOTSUPP
        if flags & 0x10:  # no reply wanted
            continue
        rflags = REPLY | (ERROR if err else 0)
        reply = struct.pack("<HHIII", msg_id, cmd, 16 + len(out), rflags, err) + out
        conn.sendall(reply)


def main(argv: list[str]) -> int:
    path = argv[1]
    bits = int(argv[2]) if len(argv) > 2 else 20
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    serve(conn, bits, log=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
