"""The VFIO backend: VFIO_IOMMU_PASID_REQUEST on a VFIO container.

Foundation state: probes for /dev/vfio/vfio and refuses to start with a clear reason when
it is absent. The ioctl layer, capability walk and real-kernel tests are issue 6.
"""

from __future__ import annotations

import errno
import os

from broker.backends.base import Capabilities
from broker.core.errors import Unsupported

VFIO_CONTAINER = "/dev/vfio/vfio"


class VfioBackend:
    name = "vfio"

    def __init__(self, container: str = VFIO_CONTAINER) -> None:
        self.container = container
        self._fd = -1

    def open(self) -> Capabilities:
        try:
            self._fd = os.open(self.container, os.O_RDWR)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "?")
            raise Unsupported(
                f"vfio backend: open({self.container}) failed: {name}"
                f" ({exc.strerror}); needs the vfio and vfio_iommu_type1 modules and a kernel"
                " with VFIO_IOMMU_PASID_REQUEST (the v7 series, never merged);"
                " use --backend simulator on other hosts"
            ) from exc
        os.close(self._fd)
        self._fd = -1
        raise Unsupported(
            "vfio backend: PASID requests are not implemented yet in this build (issue 6)"
        )

    def alloc(self, lo: int, hi: int) -> int:
        raise Unsupported("vfio backend is not open")

    def free(self, lo: int, hi: int) -> None:
        raise Unsupported("vfio backend is not open")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
