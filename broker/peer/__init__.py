"""Who is at the other end: kernel-verified peer identity for the Unix socket.

credentials.py reads what the kernel says (SO_PEERCRED, pidfds, /proc under a pidfd);
tickets.py keeps one-time tickets that carry a PeerIdentity to OpenSession; handshake.py
serves the peer socket. Design: docs/peer-identity.md.
"""

from broker.peer.handshake import PeerServer
from broker.peer.tickets import DelegatedFd, PeerIdentity, TicketBook, TicketError

__all__ = ["DelegatedFd", "PeerIdentity", "PeerServer", "TicketBook", "TicketError"]
