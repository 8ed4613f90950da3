"""Socket options shared by the SCP and the SCU."""

from __future__ import annotations

import logging
import socket

from pynetdicom import evt
from pynetdicom.events import Event

log = logging.getLogger(__name__)


def set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket.

    DICOM sends a small PDV header then a large fragment; with Nagle on, the peer's
    delayed ACK stalls every message by ~40 ms.
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, socket.socket):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. a socket already closed by the peer
            log.debug("cannot set TCP_NODELAY: %s", exc)


NODELAY_HANDLER = (evt.EVT_CONN_OPEN, set_nodelay)
