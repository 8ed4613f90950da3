"""Socket options and pynetdicom tuning shared by the SCP and the SCU.

Small workarounds of pynetdicom 3.0 internals (pinned 3.0.*), each applied per association
from the EVT_CONN_OPEN handler where ``network.fast_paths`` is on and :mod:`node.net.fast.fastpaths`
found the pynetdicom they were written for, and covered by tests/dicom/test_wire.py and
tests/net/test_scp_network.py: whole-PDU socket reads, an event-driven DUL reactor (it blocks
in ``select`` instead of napping and polling), an event-driven association reactor, C-STORE
requests and responses encoded directly (``node.net.fast.cstore``), received C-STORE requests
assembled directly (``node.net.fast.receive``), and a switch for pynetdicom's per-message logging
handlers.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from types import MethodType
from typing import Any, cast

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE, DimsePrimitiveType
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.transport import AssociationSocket

from node.net.fast.cstore import encoded_p_data, p_data, store_request, store_response
from node.net.fast.pdumeter import HEADER, P_DATA_TF_TYPE, PDU_TYPES, pdu_limit
from node.net.fast.receive import StoreAssembler, dispatch_p_data
from node.net.fast.sendnow import SendGuard, guard, send_now
from node.net.fast.sockopts import abort_peer, shut_and_close, tune

log = logging.getLogger(__name__)


IDLE_WAIT = 0.05
"""Longest the DUL reactor blocks in ``select`` while nothing arrives and nothing is queued
to send; it then makes its timer and stop checks."""


@dataclass(frozen=True)
class ReadLimits:
    """What a peer may make the reader hold (the SCP's; the SCU reads its peers' replies
    under the defaults): bytes of one message's fragments (checked as they stream in), and
    how long a new connection has to complete its association request (ARTIM)."""

    message_bytes: int | None = None
    request_timeout: float | None = None


def set_nodelay(event: Event, limits: ReadLimits | None = None) -> None:
    """EVT_CONN_OPEN handler: the socket options every association gets
    (:func:`node.net.fast.sockopts.tune`: TCP_NODELAY, a time limit), then the fast paths: make
    the DUL reactor event-driven, read PDUs in one piece and decode P-DATA without copies,
    assemble received C-STORE requests, encode C-STORE messages directly and send
    C-STORE messages whole from the sending thread; and the association's own reactor.
    Installed only where ``network.fast_paths`` is on and :mod:`node.net.fast.fastpaths` found the
    pynetdicom they were written for.
    """
    dul = event.assoc.dul
    sent = None
    wrapper = getattr(dul, "socket", None)
    if tune(event.assoc) is not None and type(wrapper) is AssociationSocket:
        _make_event_driven(dul, wrapper, limits or ReadLimits())
        sent = guard(dul)
    event.assoc._run_reactor = MethodType(association_reactor, event.assoc)  # type: ignore[method-assign]
    dimse = event.assoc.dimse
    dimse.send_msg = partial(send_msg, dimse, dimse.send_msg, sent)  # type: ignore[method-assign]


def send_msg(
    dimse: DIMSEServiceProvider,
    pynetdicoms: Callable[[DimsePrimitiveType, int], None],
    sent: SendGuard | None,
    primitive: DimsePrimitiveType,
    context_id: int,
) -> None:
    """``DIMSEServiceProvider.send_msg`` with plain C-STORE requests and responses encoded
    directly (:mod:`node.net.fast.cstore`, byte for byte pynetdicom's encoding) and written whole
    by this thread (:func:`node.net.fast.sendnow.send_now`, given the DUL's guard ``sent``);
    everything else, and every message while an EVT_DIMSE_SENT handler watches, goes
    pynetdicom's way."""
    encoded = None if dimse.assoc.get_handlers(evt.EVT_DIMSE_SENT) else _c_store(primitive)
    if encoded is None:
        pynetdicoms(primitive, context_id)
        return
    command, dataset = encoded
    max_pdu = dimse.maximum_pdu_size
    if sent is not None:  # the PDUs are encoded only as send_now writes them
        if send_now(dimse.dul, sent, encoded_p_data(context_id, command, dataset, max_pdu)):
            return
    for pdata in p_data(context_id, command, dataset, max_pdu):
        dimse.dul.send_pdu(pdata)


def _c_store(msg: DimsePrimitiveType) -> tuple[bytes, bytes | None] | None:
    """The command set and data set of a C-STORE request or response without optional
    elements, or None for any other message."""
    if type(msg) is not C_STORE or None in (msg.AffectedSOPClassUID, msg.AffectedSOPInstanceUID):
        return None
    sop_class, sop_uid = str(msg.AffectedSOPClassUID), str(msg.AffectedSOPInstanceUID)
    if msg.MessageIDBeingRespondedTo is not None:  # a response
        if msg.ErrorComment is not None or msg.OffendingElement is not None:
            return None
        if not isinstance(msg.Status, int):
            return None
        return store_response(msg.MessageIDBeingRespondedTo, sop_class, sop_uid, msg.Status), None
    if (
        msg.MessageID is None
        or msg.Priority is None
        or msg.MoveOriginatorApplicationEntityTitle is not None
        or msg.MoveOriginatorMessageID is not None
        or not isinstance(msg.DataSet, BytesIO)  # e.g. pynetdicom's send-from-file mode
    ):
        return None
    command = store_request(msg.MessageID, sop_class, sop_uid, msg.Priority)
    return command, msg.DataSet.getvalue()


class Waker:
    """A self-pipe: a byte written to it wakes a thread blocked in ``select`` on it.

    The waiting thread sets :attr:`waiting` before it makes its last check and blocks;
    :meth:`wake` writes only while it is set (a write per queued PDU would cost a system
    call and a thread switch each).
    """

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.waiting = False

    def wake(self) -> None:
        if not self.waiting:
            return  # the reactor is running: it checks the queue before it blocks again
        try:
            self.writer.send(b"\0")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending anyway
        except OSError as exc:  # closed: the reactor has stopped, nobody waits
            log.debug("wake-up after the reactor stopped: %s", exc)

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except BlockingIOError:
            return

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class EventDrivenSocket(AssociationSocket):
    """pynetdicom's ``AssociationSocket`` for an event-driven DUL reactor.

    pynetdicom 3.0's DUL reactor naps 1 ms whenever a turn found nothing to do, then polls
    the socket with a zero ``select`` timeout: up to 1 ms of latency per message and a
    thousand GIL-taking turns per second per idle association. Here :attr:`ready` blocks
    in ``select`` on the socket and on a :class:`Waker` that the DUL's send queue and its
    stop calls write to, so the reactor runs exactly when there is something to do (and
    every :data:`IDLE_WAIT` seconds for its timers). :meth:`recv` reads a whole PDU into
    one buffer (see :func:`read_exact`).
    """

    waker: Waker
    limits: ReadLimits
    opened: float  # monotonic time the connection was handed to the reactor
    message_bytes: int  # fragment bytes of the message being received so far

    @property
    def ready(self) -> bool:
        waker = self.waker
        waker.waiting = True  # before the checks: a later put() wakes the select below
        try:
            return self._wait_readable(waker)
        finally:
            waker.waiting = False

    def _wait_readable(self, waker: Waker) -> bool:
        dul = self.assoc.dul
        stopping = dul._kill_thread
        busy = stopping or not dul.event_queue.empty() or bool(dul.to_provider_queue.queue)
        timeout = 0.0 if busy else IDLE_WAIT
        sock = self.socket
        if sock is None or not self._is_connected:
            self._idle(waker, timeout)  # closed: wait for the stop call (or the timer checks)
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # TLS may hold decrypted bytes that select cannot see (pynetdicom #528)
        try:
            readable, _, _ = select.select([sock, waker.reader], [], [], timeout)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom: the connection is gone
            return False
        if waker.reader in readable:
            waker.drain()
        return sock in readable

    @staticmethod
    def _idle(waker: Waker, timeout: float) -> None:
        try:
            readable, _, _ = select.select([waker.reader], [], [], timeout)
        except (OSError, ValueError):  # the waker is closed: the reactor is being stopped
            return
        if readable:
            waker.drain()

    def recv(self, nr_bytes: int) -> bytearray:
        return read_exact(cast(socket.socket, self.socket), nr_bytes, self.read_deadline())

    def _shutdown_socket(self) -> None:
        shut_and_close(self)  # pynetdicom 3.0 skips the close where the shutdown fails

    def read_deadline(self) -> float | None:
        """Until when the next read may block: the ARTIM deadline while the association
        request is awaited (Sta2), else ``network_timeout`` from now."""
        timeout = self.limits.request_timeout
        if timeout is not None and self.assoc.dul.state_machine.current_state == "Sta2":
            return self.opened + timeout
        network = self.assoc.network_timeout
        return None if network is None else time.monotonic() + network


def _make_event_driven(
    dul: DULServiceProvider, wrapper: AssociationSocket, limits: ReadLimits
) -> None:
    """Swap in :class:`EventDrivenSocket` and wake the reactor on every send and stop."""
    waker = Waker()
    wrapper.__class__ = EventDrivenSocket
    driven = cast(EventDrivenSocket, wrapper)
    driven.waker, driven.limits, driven.opened = waker, limits, time.monotonic()
    driven.message_bytes = 0
    weakref.finalize(wrapper, waker.close)  # in case the reactor ends without stop_dul
    sends = dul.to_provider_queue
    put = sends.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        waker.wake()

    kill = dul.kill_dul

    def kill_and_wake() -> None:
        kill()
        _stopped(dul, waker)

    sends.put = put_and_wake  # type: ignore[method-assign]
    dul.kill_dul = kill_and_wake  # type: ignore[method-assign]
    dul.stop_dul = partial(_stop_dul, dul, waker)  # type: ignore[method-assign]
    dul._run_loop_delay = 0.0  # its naps: ``ready`` now blocks instead
    dimse = dul.assoc.dimse
    assembler = StoreAssembler(dimse, dimse.receive_primitive)
    dimse.receive_primitive = assembler.receive_primitive  # type: ignore[method-assign]
    dul._read_pdu_data = partial(read_pdu_data, dul, assembler)  # type: ignore[method-assign]


def read_pdu_data(dul: DULServiceProvider, assembler: StoreAssembler | None = None) -> None:
    """``DULServiceProvider._read_pdu_data`` of pynetdicom 3.0 with P-DATA-TF PDUs decoded
    over a memoryview of the received buffer, and handed straight to ``assembler``
    (:func:`node.net.fast.receive.dispatch_p_data`) where the state machine would only pass them on.

    pynetdicom copies every received fragment five times before the DIMSE layer stores it
    (``bytestream +=``, ``bytes()`` for EVT_DATA_RECV, the PDU's and the PDV's slices,
    ``data[1:]``), each a copy of the whole fragment, under the GIL (measured in
    bench/RESULTS.md, third session, "P-DATA decoded over a memoryview"). Here the PDV
    items are views into the one buffer the PDU was read into. Same events, same
    order, same endings (Evt17 when the connection fails, Evt19 for what cannot be
    decoded); other PDU types, and every PDU while an EVT_DATA_RECV or EVT_PDU_RECV handler
    watches, go through pynetdicom's own decoder.

    While the assembler is inside a message and the next PDU has already arrived, that
    one is read too, up to :data:`PDUS_PER_TURN`: a reactor turn per PDU (its timer, queue
    and stop checks) would cost more than the PDU's own handling. The idle timer restarts
    at every PDU, as pynetdicom's reactor restarts it (a long message must not time out
    while it streams in), and the turn comes when the message is complete, the socket has
    nothing waiting, something waits to be sent or the reactor is being stopped.
    """
    for _ in range(PDUS_PER_TURN):
        pdu = _read_pdu(dul)
        if pdu is None:
            return
        pdu_type, head, body = pdu
        if pdu_type == P_DATA_TF_TYPE and not _message_within_limit(dul, body):
            limit = cast(EventDrivenSocket, dul.socket).limits.message_bytes
            _refuse(dul, f"a message growing past {limit} bytes (scp.max_dataset_mb)")
            return
        p_data_unwatched = pdu_type == P_DATA_TF_TYPE and not _watched(dul.assoc)
        if p_data_unwatched and assembler and dispatch_p_data(dul, assembler, memoryview(body)):
            dul._idle_timer.restart()
            if assembler.in_message and not dul.to_provider_queue.queue and _arrived(dul):
                continue
            return
        _decode_and_queue(dul, pdu_type, head, body, p_data_unwatched)
        return


PDUS_PER_TURN = 64
"""PDUs of one message read in one reactor turn at most (8 MiB at 128 KiB PDUs)."""


def _read_pdu(dul: DULServiceProvider) -> tuple[int, bytearray, bytearray] | None:
    """(type, header, body) of the next PDU; None when it could not be read, after
    queueing the event that ends the association (Evt17 or Evt19)."""
    sock = cast(AssociationSocket, dul.socket)
    try:
        head = sock.recv(6)
        if len(head) < 6:
            dul.event_queue.put("Evt17")  # closed before a whole PDU header arrived
            return None
        pdu_type, _, length = struct.unpack(">BBL", head)
        if pdu_type not in PDU_TYPES:
            _refuse(dul, f"unknown PDU type 0x{pdu_type:02X}")
            return None
        limit = _pdu_limit(dul, pdu_type)
        if length > limit:
            _refuse(dul, f"PDU of type 0x{pdu_type:02X} and {length} bytes (limit {limit})")
            return None
        body = sock.recv(length)
    except (OSError, TimeoutError) as exc:
        log.error("connection closed before the entire PDU was received: %s", exc)
        dul.event_queue.put("Evt17")
        return None
    if len(body) != length:
        log.error("received PDU is shorter than its header says (%d of %d)", len(body), length)
        dul.event_queue.put("Evt17")
        return None
    return pdu_type, head, body


def _decode_and_queue(
    dul: DULServiceProvider, pdu_type: int, head: bytearray, body: bytearray, views: bool
) -> None:
    """Decode a PDU (P-DATA-TF over views of ``body`` where ``views``) and queue it and
    its event for the state machine."""
    try:
        if views:
            pdu: Any = P_DATA_TF()
            pdu.presentation_data_value_items = pdu._wrap_generate_items(memoryview(body))
            event = "Evt10"
        else:
            pdu, event = dul._decode_pdu(bytearray(head) + body)
    except Exception as exc:  # as pynetdicom: anything undecodable is an invalid PDU
        log.error("unable to decode the received PDU: %s", exc)
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def _arrived(dul: DULServiceProvider) -> bool:
    """Whether more bytes wait on the association's socket (without blocking)."""
    sock = getattr(dul.socket, "socket", None)
    if sock is None or dul._kill_thread:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False  # the reactor's own check reports it
    return bool(readable)


def _pdu_limit(dul: DULServiceProvider, pdu_type: int) -> int:
    """:func:`node.net.fast.pdumeter.pdu_limit`, with our own maximum PDU length as negotiated."""
    assoc = dul.assoc
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    return pdu_limit(pdu_type, int(local.maximum_length or 0))


def _refuse(dul: DULServiceProvider, what: str) -> None:
    """A-ABORT the peer (best effort), close the connection and end the association."""
    wrapper = cast(AssociationSocket, dul.socket)
    abort_peer(dul.assoc, wrapper.socket, what)
    wrapper.close()
    dul.event_queue.put("Evt17")


def _message_within_limit(dul: DULServiceProvider, body: bytearray) -> bool:
    """Count a P-DATA-TF PDU's fragment bytes towards the message it belongs to (a
    fragment with the last-fragment bit ends it); False once past ``message_bytes``."""
    wrapper = cast(EventDrivenSocket, dul.socket)
    limits = getattr(wrapper, "limits", None)  # a socket the reactor did not take over
    limit = limits.message_bytes if limits is not None else None
    if limit is None:
        return True
    offset, end, total = 0, len(body), wrapper.message_bytes
    while offset + HEADER <= end:
        (length,) = struct.unpack_from(">I", body, offset)
        total += length
        if total > limit:
            return False
        if body[offset + 5] & 0x02:  # the message's last fragment
            total = 0
        offset += 4 + length
    wrapper.message_bytes = total
    return True


def _watched(assoc: Association) -> bool:
    return bool(assoc.get_handlers(evt.EVT_DATA_RECV) or assoc.get_handlers(evt.EVT_PDU_RECV))


STOP_WAIT = 1.0
"""How long a stop call waits for the woken reactor thread before it leaves the self-pipe
to be closed by the garbage collector."""


def _stop_dul(dul: DULServiceProvider, waker: Waker) -> bool:
    """``DULServiceProvider.stop_dul`` of pynetdicom 3.0, woken instead of polled: stop
    the reactor if the state machine is idle (Sta1) and wait for its thread."""
    if dul.state_machine.current_state != "Sta1":
        return False
    dul._kill_thread = True  # set before the wake-up: the reactor checks it before blocking
    _stopped(dul, waker)
    if dul.is_alive() and dul is not threading.current_thread():
        dul.join()  # pynetdicom waits for it too (its loop has no time limit either)
    return True


def _stopped(dul: DULServiceProvider, waker: Waker) -> None:
    """After ``dul._kill_thread`` was set: wake the reactor and close its self-pipe once
    it has stopped. Called from the reactor itself (a state machine action), it stops at
    its next turn without blocking again, so the pipe closes at once."""
    if dul is not threading.current_thread():
        waker.wake()
        if dul.is_alive():
            dul.join(STOP_WAIT)
        if dul.is_alive():
            return
    waker.close()


READ_STEP = 256 * 1024
"""The reader grows its buffer by at most this much ahead of the bytes that arrived."""


def read_exact(sock: socket.socket, nr_bytes: int, deadline: float | None = None) -> bytearray:
    """``AssociationSocket.recv`` (pynetdicom 3.x) reading ``nr_bytes`` straight into one
    buffer.

    pynetdicom reads a PDU 4 KiB at a time and appends each piece to a bytearray: 32 calls
    and copies per 128 KiB P-DATA PDU. Same contract: blocks until ``nr_bytes`` have been
    read, returns fewer only when the peer closed the connection; socket errors propagate.
    The buffer grows only as data arrives (a PDU header may claim 4 GiB). With a
    ``deadline`` (``time.monotonic()``), a peer that sends too slowly, or stops mid-PDU,
    raises ``TimeoutError`` there; the socket's own timeout is restored afterwards.
    """
    buf = bytearray(min(nr_bytes, READ_STEP))
    got = 0
    base = sock.gettimeout() if deadline is not None else None
    try:
        while got < nr_bytes:
            if got == len(buf):
                buf.extend(bytes(min(nr_bytes - got, READ_STEP)))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"read of {nr_bytes} bytes timed out ({got} arrived)")
                sock.settimeout(left)
            with memoryview(buf) as view:
                n = sock.recv_into(view[got:])
            if n == 0:  # connection closed: return what arrived
                break
            got += n
    finally:
        if deadline is not None:
            sock.settimeout(base)
    del buf[got:]
    return buf


REACTOR_WAIT = 0.001
"""Longest wait for a DIMSE message before the association's reactor makes its other
checks: an idle association's loop wakes this often (it waits on its message queue, not in
``select``)."""


def association_reactor(assoc: Association) -> None:
    """``Association._run_reactor`` of pynetdicom 3.0, woken by each decoded message and safe
    to pause.

    pynetdicom's loop naps 1 ms, then looks for a decoded DIMSE message, so a C-STORE that
    is decoded during the nap waits for the rest of it before its handler runs. This loop
    waits on the message queue itself, for up to :data:`REACTOR_WAIT` per turn, so a request
    is served as soon as its last fragment is decoded. While idle it still wakes every
    :data:`REACTOR_WAIT` for its end-of-association checks (only the DUL reactor blocks in
    ``select``: :class:`EventDrivenSocket`). The pause handshake, release, abort, dead-DUL
    and network-timeout handling are pynetdicom's, in the same order (the node keeps
    pynetdicom's default ``network_timeout_response``, A-ABORT, so its A-RELEASE variant is
    not carried over).

    Pausing (``send_c_store``, :func:`node.net.scu.send_raw`, ``release``) clears
    ``_reactor_checkpoint`` and waits for ``_is_paused``; pynetdicom's loop could pass its
    checkpoint just before the clear, still show ``_is_paused``, and then take the
    response meant for the pausing thread off the queue. Here the loop looks at the
    checkpoint again after it has shown itself running, and takes nothing once a pause
    was asked for.
    """
    assoc._is_paused = False
    while not assoc._kill:
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        context_id, msg = None, None
        if assoc._reactor_checkpoint.is_set():  # no pause asked for meanwhile
            try:
                context_id, msg = assoc.dimse.msg_queue.get(timeout=REACTOR_WAIT)
            except queue.Empty:
                pass
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
    (measured in bench/RESULTS.md, "What changed, and what each change bought", Ingest:
    "per-message logging handlers") for INFO/DEBUG lines that the node's logging setup
    (``pynetdicom`` at WARNING or above) discards anyway. Warnings and errors are still
    logged. Takes effect for AEs and associations created afterwards.
    """
    verbose = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
    _config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"
