"""Socket options shared by the SCP and the SCU."""

from __future__ import annotations

import logging
import socket

from pynetdicom import evt
from pynetdicom.events import Event

log = logging.getLogger(__name__)


# pynetdicom's DUL reactor sleeps 1 ms whenever it finds nothing to do; a 1 MB image is
# ~64 P-DATA PDUs, so those naps dominate the transfer time. 0.2 ms keeps idle CPU low.
REACTOR_DELAY = 0.0002


def set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket,
    and shorten the reactor's idle nap.

    DICOM sends a small PDV header then a large fragment; with Nagle on, the peer's
    delayed ACK stalls every message by ~40 ms.
    """
    dul = event.assoc.dul
    if hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = REACTOR_DELAY
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, socket.socket):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. a socket already closed by the peer
            log.debug("cannot set TCP_NODELAY: %s", exc)


NODELAY_HANDLER = (evt.EVT_CONN_OPEN, set_nodelay)
