"""An ioasid_set: the PASIDs one client session holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from sortedcontainers import SortedList

# The identity keys a set's owner takes: per-identity quotas and limits count by them, so
# there is one spelling. Anyone who proved nothing (no ticket, plain TCP) shares one key.
ANONYMOUS = "anonymous"


def uid_identity(uid: int) -> str:
    """A kernel-verified uid (SO_PEERCRED through the peer handshake)."""
    return f"uid:{uid}"


def x509_identity(subject: str) -> str:
    """A TLS client certificate's subject."""
    return f"x509:{subject}"


@dataclass(eq=False)
class IoasidSet:
    """PASIDs held by one set, kept sorted so a range free costs what is owned in it."""

    set_id: int
    client: str
    quota: int
    pasids: SortedList = field(default_factory=SortedList)
    # Who the broker verified the holder to be ("uid:1000", "x509:CN=..", "anonymous"):
    # the key of the per-identity quota. `client` is a name the client chose.
    owner: str = ""

    @property
    def quota_key(self) -> str:
        """What the per-identity quota counts by: the owner, else the declared name."""
        return self.owner or self.client

    def __len__(self) -> int:
        return len(self.pasids)

    def owned_in(self, lo: int, hi: int) -> list[int]:
        """The set's PASIDs in [lo, hi], ascending; O(log n + owned)."""
        return list(self.pasids.irange(lo, hi))
