"""The allocator core: ioasid_sets in one PASID namespace, with the seed's checks.

Knows nothing of gRPC, SQL or time (a time-based quarantine is handed a clock).
Start at allocator.Allocator.
"""

from broker.core.allocator import (
    DEFAULT_SET_QUOTA,
    WIRE_PASID_BITS,
    Allocator,
    Quarantine,
    Quotas,
    check_alloc_range,
    check_free_range,
)
from broker.core.errors import (
    BackendError,
    Compacted,
    Conflict,
    Exhausted,
    InvalidArgument,
    InvalidRange,
    LimitExceeded,
    NotFound,
    NotReady,
    PasidError,
    PermissionDenied,
    QuotaExceeded,
    Revoked,
    StoreError,
    StoreFailed,
    Unauthenticated,
    Unsupported,
    describe_error,
)
from broker.core.ioasid_set import ANONYMOUS, IoasidSet, uid_identity, x509_identity
from broker.core.namespace import Namespace, runs

__all__ = [
    "ANONYMOUS",
    "DEFAULT_SET_QUOTA",
    "WIRE_PASID_BITS",
    "Allocator",
    "BackendError",
    "Compacted",
    "Conflict",
    "Exhausted",
    "InvalidArgument",
    "InvalidRange",
    "IoasidSet",
    "LimitExceeded",
    "Namespace",
    "NotFound",
    "NotReady",
    "PasidError",
    "PermissionDenied",
    "Quarantine",
    "QuotaExceeded",
    "Quotas",
    "Revoked",
    "StoreError",
    "StoreFailed",
    "Unauthenticated",
    "Unsupported",
    "check_alloc_range",
    "check_free_range",
    "describe_error",
    "runs",
    "uid_identity",
    "x509_identity",
]
