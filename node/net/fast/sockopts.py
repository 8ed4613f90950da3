"""What every association's socket gets, with or without the fast paths (``node.net.fast.netopts``):
Nagle's algorithm off, and a time limit on every read and write; and, without them, the
SCP's limits on what a peer may make it read (with them, their reader checks the same).

DICOM sends a small PDV header then a large fragment; with Nagle on, every message waits
for the peer's delayed ACK (a 40 ms timer on Linux). pynetdicom 3.0 clears the requestor's
socket timeout once it has connected: a peer that stops reading would then block the DUL
thread's next write (and everything waiting for that thread) for ever. The association's
``network_timeout`` bounds it instead: a write that makes no progress for that long fails,
and pynetdicom ends the association as for a closed connection.
"""

from __future__ import annotations

import logging
import socket
from typing import cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import AssociationSocket

from node.net.fast.pdumeter import PduMeter

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


A_ABORT_INVALID_PDU = bytes.fromhex("07000000000400000206")
"""A-ABORT from the service provider (2), reason: invalid PDU parameter value (6)."""


class MeteredSocket(AssociationSocket):
    """pynetdicom's association socket with every piece it receives fed to a
    :class:`node.net.fast.pdumeter.PduMeter`: a PDU header that claims more than its type may carry,
    or a message whose fragments pass ``scp.max_dataset_mb``, is refused before its bytes
    are read (pynetdicom would read them all into memory). A refusal sends an A-ABORT
    (best effort) and fails the read, which pynetdicom handles as a closed connection."""

    meter: PduMeter

    def recv(self, nr_bytes: int) -> bytearray:
        data = super().recv(nr_bytes)
        why = self.meter.feed(data)
        if why:
            self._refuse(why)
        return data

    def _refuse(self, why: str) -> None:
        abort_peer(self.assoc, self.socket, why)
        raise ConnectionAbortedError(why)

    def _shutdown_socket(self) -> None:
        shut_and_close(self)  # pynetdicom 3.0 skips the close where the shutdown fails


def shut_and_close(wrapper: AssociationSocket) -> None:
    """``AssociationSocket._shutdown_socket`` of pynetdicom 3.0, but the socket is closed
    even when its shutdown fails.

    pynetdicom closes it in the same ``try`` as the shutdown, which raises ENOTCONN once
    the connection is gone: after the gate hung up on a pending connection
    (:mod:`node.net.gate`) and the peer's FIN came back before the state machine got there
    (AA-5: connection closed before its A-ASSOCIATE-RQ). The descriptor then stayed open
    until the garbage collector found the association; a flood of idle connections left
    descriptors behind for as long. Both the SCP's socket classes (:class:`MeteredSocket`,
    and the fast paths' ``EventDrivenSocket``) use this."""
    sock = wrapper.socket
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:  # already shut down, or the peer is gone
        log.debug("shutdown of a closed connection: %s", exc)
    sock.close()


def abort_peer(assoc: Association, sock: socket.socket | None, why: str) -> None:
    """Log why the peer is refused, and send it an A-ABORT (best effort: within 1 s)."""
    peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    log.warning("%s from %s: aborting the association", why, peer.address)
    if sock is None:
        return
    try:
        sock.settimeout(1.0)
        sock.sendall(A_ABORT_INVALID_PDU)
    except OSError as exc:
        log.debug("A-ABORT not sent: %s", exc)


def metered_socket(event: Event, max_pdu: int, message_bytes: int | None) -> None:
    """The SCP's EVT_CONN_OPEN handler without the fast paths: :func:`tune`, and its reads
    metered (:class:`MeteredSocket`) against ``max_pdu`` and ``message_bytes``."""
    tune(event.assoc)
    wrapper = event.assoc.dul.socket
    if type(wrapper) is AssociationSocket:
        wrapper.__class__ = MeteredSocket
        cast(MeteredSocket, wrapper).meter = PduMeter(max_pdu, message_bytes)
