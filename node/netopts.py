"""Socket options and pynetdicom tuning shared by the SCP and the SCU.

Three small workarounds of pynetdicom 3.0 internals (pinned <4), each applied per
association from the EVT_CONN_OPEN handler and covered by tests/test_wire.py and
tests/test_scp_network.py: whole-PDU socket reads, an event-driven acceptor reactor, and
the reactor's shorter idle nap. Plus a switch for its per-message logging handlers.
"""

from __future__ import annotations

import logging
import queue
import socket
from collections.abc import Callable
from types import MethodType
from typing import cast

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)


# pynetdicom's DUL reactor sleeps 1 ms whenever it finds nothing to do; a 1 MB image is
# ~64 P-DATA PDUs, so those naps dominate the transfer time. 0.2 ms keeps idle CPU low.
REACTOR_DELAY = 0.0002


def set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket,
    shorten the reactor's idle nap and read PDUs in one piece.

    DICOM sends a small PDV header then a large fragment; with Nagle on, the peer's
    delayed ACK stalls every message by ~40 ms.
    """
    dul = event.assoc.dul
    if hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = REACTOR_DELAY
    wrapper = getattr(dul, "socket", None)
    sock = getattr(wrapper, "socket", None)
    if isinstance(sock, socket.socket):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. a socket already closed by the peer
            log.debug("cannot set TCP_NODELAY: %s", exc)
        if isinstance(wrapper, AssociationSocket):
            wrapper.recv = _exact_reader(sock)  # type: ignore[method-assign,assignment]
    if event.assoc.is_acceptor:
        event.assoc._run_reactor = MethodType(acceptor_reactor, event.assoc)  # type: ignore[method-assign]


READ_STEP = 256 * 1024
"""The reader grows its buffer by at most this much ahead of the bytes that arrived."""


def _exact_reader(sock: socket.socket) -> Callable[[int], bytearray]:
    """A replacement for ``AssociationSocket.recv`` (pynetdicom 3.x): read ``nr_bytes``
    straight into one buffer.

    pynetdicom reads a PDU 4 KiB at a time and appends each piece to a bytearray: 32 calls
    and copies per 128 KiB P-DATA PDU. Same contract: blocks until ``nr_bytes`` have been
    read, returns fewer only when the peer closed the connection; socket errors propagate.
    The buffer grows only as data arrives (a PDU header may claim 4 GiB).
    """

    def recv(nr_bytes: int) -> bytearray:
        buf = bytearray(min(nr_bytes, READ_STEP))
        got = 0
        while got < nr_bytes:
            if got == len(buf):
                buf.extend(bytes(min(nr_bytes - got, READ_STEP)))
            with memoryview(buf) as view:
                n = sock.recv_into(view[got:])
            if n == 0:  # connection closed: return what arrived
                break
            got += n
        del buf[got:]
        return buf

    return recv


ACCEPTOR_WAIT = 0.001
"""Longest wait for a DIMSE message before the acceptor's reactor makes its other checks."""


def acceptor_reactor(assoc: Association) -> None:
    """``Association._run_reactor`` of pynetdicom 3.0 for an acceptor, made event-driven.

    pynetdicom's loop naps 1 ms, then looks for a decoded DIMSE message: every C-STORE
    waited 0.5 ms on average before its handler ran. This loop blocks on the message queue
    for up to :data:`ACCEPTOR_WAIT` instead, so a request is served as soon as its last
    fragment is decoded; the pause handshake, release, abort, dead-DUL and network-timeout
    handling are pynetdicom's, in the same order (the node keeps pynetdicom's default
    ``network_timeout_response``, A-ABORT, so its A-RELEASE variant is not carried over).
    """
    assoc._is_paused = False
    while not assoc._kill:
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        try:
            context_id, msg = assoc.dimse.msg_queue.get(timeout=ACCEPTOR_WAIT)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            assoc._serve_request(msg, cast(int, context_id))
        if _association_ended(assoc):
            return


def _association_ended(assoc: Association) -> bool:
    """The end-of-association checks of pynetdicom 3.0's reactor loop, one turn."""
    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        log.debug("association released by the peer")
        assoc.is_released, assoc.is_established = True, False
        evt.trigger(assoc, evt.EVT_RELEASED, {})
    elif assoc.acse.is_aborted():
        assoc.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for the A-ABORT
        assoc.is_aborted, assoc.is_established = True, False
        evt.trigger(assoc, evt.EVT_ABORTED, {})
    elif not assoc.dul.is_alive():
        log.debug("association ended: its DUL provider stopped (connection closed)")
    elif assoc.dul.idle_timer_expired():
        log.warning("network timeout reached: aborting the association")
        assoc.abort()
    else:
        return False
    assoc.kill()
    return True


NODELAY_HANDLER = (evt.EVT_CONN_OPEN, set_nodelay)


def quiet_pynetdicom() -> None:
    """Skip pynetdicom's standard logging handlers unless its logger shows INFO.

    They run on every PDU and DIMSE message, and decode and format each command set
    (~1.5 ms per received image) for INFO/DEBUG lines that the node's logging setup
    (``pynetdicom`` at WARNING or above) discards anyway. Warnings and errors are still
    logged. Takes effect for AEs and associations created afterwards.
    """
    verbose = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
    _config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"
