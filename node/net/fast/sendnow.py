"""DIMSE messages written to the socket by the thread that sends them (pynetdicom 3.0,
pinned <4).

pynetdicom hands every outgoing P-DATA to its DUL thread: the sending thread (the
acceptor thread that ran a C-STORE handler, or a C-STORE client's thread) puts each PDU's
primitive on the DUL's send queue and wakes the reactor, which turns its state machine
once per PDU (Sta6 + Evt9: DT-1, back to Sta6), encodes the PDU and sends it: two thread
switches per answered image, and for a 1 MB request 64 turns and 64 socket writes into a
peer with 16 KB PDUs (measured in bench/RESULTS.md, fourth session, "Responses written by
the answering thread"; fifth session, "C-STORE requests written whole"). P-DATA sent in
Sta6 changes no state. So :func:`send_now` writes the whole message at once, in pieces of
~1 MB, holding the lock (:func:`guard`) that the DUL thread then holds for every state
machine action and every send; where anything else is queued, an A-ABORT went out, the
reactor is stopping, anybody watches PDUs, data or transitions (or binds a handler that
runs inside a state machine action), or the socket is TLS (one TLS connection must not
read and write from two threads at once), it does nothing and pynetdicom's way is taken.

Every write is bounded (:func:`write_within`): a peer that stops reading holds the lock,
and with it the DUL thread and ``kill()``, for at most the association's
``network_timeout`` (``scp.network_timeout``, ``destination.timeout``) without progress;
the connection is then treated as closed (Evt17), as a failed write is.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pynetdicom import evt

if TYPE_CHECKING:
    from pynetdicom.dul import DULServiceProvider

_WATCHERS = (
    evt.EVT_PDU_SENT,  # see what is sent
    evt.EVT_DATA_SENT,
    evt.EVT_FSM_TRANSITION,
    evt.EVT_DIMSE_RECV,  # run inside state machine actions, so under the lock: a handler
    evt.EVT_CONN_CLOSE,  # that waited for the answering thread would deadlock with it
)
A_ABORT_PDU = 0x07
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)

log = logging.getLogger(__name__)


class SendGuard:
    """The lock the DUL thread holds for each state machine action and each send, and
    whether an A-ABORT went out (pynetdicom's reactor sends one outside its state machine
    when an action fails, leaving the state as it was)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.aborted = False


def guard(dul: DULServiceProvider) -> SendGuard:
    """Make the DUL thread hold a new :class:`SendGuard`'s lock for each state machine
    action and each send on the association's socket; returns it, for :func:`send_now`."""
    sent = SendGuard()
    machine, wrapper = dul.state_machine, dul.socket
    do_action, send = machine.do_action, wrapper.send  # type: ignore[union-attr]

    def locked_action(event: str) -> None:
        with sent.lock:
            do_action(event)

    def locked_send(data: Any) -> None:
        with sent.lock:
            if data[:1] == bytes([A_ABORT_PDU]):
                sent.aborted = True
            send(data)

    machine.do_action = locked_action  # type: ignore[method-assign]
    wrapper.send = locked_send  # type: ignore[method-assign,union-attr]
    return sent


def _may_send_now(dul: DULServiceProvider) -> bool:
    """Whether :func:`send_now` could take this association's messages at all (not over
    TLS, not while anybody watches)."""
    wrapper = dul.socket
    if wrapper is None or isinstance(wrapper.socket, ssl.SSLSocket):
        return False
    return not any(dul.assoc.get_handlers(event) for event in _WATCHERS)


def send_now(dul: DULServiceProvider, sent: SendGuard, pdus: Iterable[bytes]) -> bool:
    """Send a message's encoded P-DATA-TF PDUs now, from this thread, as the DUL thread
    would in Sta6; False (nothing sent) where pynetdicom must send it (see the module
    docstring), and after an A-ABORT or once the reactor is being stopped."""
    wrapper = dul.socket
    if wrapper is None or not _may_send_now(dul):
        return False
    timeout = dul.assoc.network_timeout
    with sent.lock:
        sock = wrapper.socket  # closed only by state machine actions: under the lock
        if sock is None or sent.aborted or dul._kill_thread:
            return False
        if dul.state_machine.current_state != "Sta6":
            return False
        if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
            return False
        try:
            for piece in pdus:
                write_within(sock, piece, timeout)
        except (OSError, ValueError) as exc:  # as AssociationSocket.send when a write fails
            if isinstance(exc, TimeoutError):
                log.warning("%s: the peer stopped reading; closing the connection", exc)
            dul.event_queue.put("Evt17")
            failed = True
        else:
            failed = False
    if failed:  # wake the reactor to see it
        waker = getattr(wrapper, "waker", None)
        if waker is not None:
            waker.wake()
    return True


def write_within(sock: socket.socket, data: bytes, timeout: float | None) -> None:
    """Write all of ``data`` to ``sock``; raises ``TimeoutError`` once no byte could be
    written for ``timeout`` seconds (None: no limit), and what the socket raises.

    Each write waits in ``select`` and does not block (``MSG_DONTWAIT``): the socket's own
    timeout, which the DUL thread's reader changes as it reads, plays no part.
    """
    if timeout is None:
        sock.sendall(data)
        return
    with memoryview(data) as whole:
        view = whole
        deadline = time.monotonic() + timeout
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no byte written for {timeout:g} s ({len(view)} left)")
            _, writable, _ = select.select([], [sock], [], left)
            if not writable:
                continue
            try:
                n = sock.send(view, _DONTWAIT)
            except BlockingIOError:
                continue
            view = view[n:]
            deadline = time.monotonic() + timeout
