"""What every association's socket gets, with or without the fast paths (``node.netopts``):
Nagle's algorithm off, and a time limit on every read and write.

DICOM sends a small PDV header then a large fragment; with Nagle on, the peer's delayed
ACK stalls every message by ~40 ms. pynetdicom 3.0 clears the requestor's socket timeout
once it has connected: a peer that stops reading would then block the DUL thread's next
write (and everything waiting for that thread) for ever. The association's
``network_timeout`` bounds it instead: a write that makes no progress for that long fails,
and pynetdicom ends the association as for a closed connection.
"""

from __future__ import annotations

import logging
import socket

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

log = logging.getLogger(__name__)


def tune(assoc: Association) -> socket.socket | None:
    """TCP_NODELAY on the association's socket, and its ``network_timeout`` as the socket's
    timeout where it has none; returns the TCP socket (None where there is none)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, socket.socket):
        return None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock.gettimeout() is None and assoc.network_timeout is not None:
            sock.settimeout(assoc.network_timeout)
    except OSError as exc:  # e.g. a socket already closed by the peer
        log.debug("socket options not set: %s", exc)
    return sock


def plain_socket(event: Event) -> None:
    """EVT_CONN_OPEN handler without the fast paths: :func:`tune` only."""
    tune(event.assoc)


PLAIN_HANDLER = (evt.EVT_CONN_OPEN, plain_socket)
"""The SCU's EVT_CONN_OPEN handler without the fast paths (``network.fast_paths = false``)."""
