"""Received C-STORE requests assembled directly from P-DATA (pynetdicom 3.0, pinned <4).

pynetdicom passes every received P-DATA-TF PDU through its state machine (two queues and a
transition per PDU), gathers the fragments in a ``DIMSEMessage``, then decodes the command
set with pydicom and copies it, element by element, into a DIMSE primitive: about a
quarter of the SCP's CPU time per received image. Here a :class:`StoreAssembler` takes
the DIMSE provider's place for received P-DATA: a plain C-STORE request (the command
:func:`node.net.fast.cstore.parse_store_request` reads) becomes the same ``C_STORE`` primitive on
the same message queue, and :func:`dispatch_p_data` hands a P-DATA-TF PDU to it straight
from the socket reader when the state machine would only have passed it on (Sta6, nothing
else queued, nobody watching its transitions).

Everything else - other messages, odd commands, fragments out of order, and every message
while an EVT_DIMSE_RECV handler watches or pynetdicom stores data sets to files - is
replayed into pynetdicom's own ``receive_primitive``, which then decodes and reports it
as it always does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import TYPE_CHECKING

from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from node.net.fast.cstore import COMMAND, LAST, parse_store_request

if TYPE_CHECKING:
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dul import DULServiceProvider

PDV = tuple[int, bytes | memoryview]
"""A presentation data value: (presentation context ID, message header byte + fragment)."""


class StoreAssembler:
    """``DIMSEServiceProvider.receive_primitive`` for one association, with C-STORE
    requests assembled and decoded directly (see the module docstring)."""

    def __init__(self, dimse: DIMSEServiceProvider, pynetdicoms: Callable[[P_DATA], None]) -> None:
        self._dimse = dimse
        self._pynetdicoms = pynetdicoms
        self._command = bytearray()
        self._request: C_STORE | None = None
        self._data = BytesIO()
        self._context_id = 0

    @property
    def in_message(self) -> bool:
        """Whether fragments of a message have arrived and its last one has not."""
        return bool(self._command) or self._request is not None

    def receive_primitive(self, primitive: P_DATA) -> None:
        self.feed(primitive.presentation_data_value_list)

    def feed(self, pdvs: Sequence[PDV]) -> None:
        """Take the PDVs of one P-DATA-TF PDU, in order."""
        for i, (context_id, fragment) in enumerate(pdvs):
            if self._dimse.message is not None or self._watched():
                self._hand_over(pdvs[i:])  # pynetdicom is receiving this message
                return
            control = fragment[0]
            if self._request is None and control & COMMAND:
                self._command += fragment[1:]
                self._context_id = context_id
                if control & LAST and not self._start_request():
                    self._hand_over(pdvs[i + 1 :], command_complete=True)
                    return
            elif self._request is not None and not control & COMMAND:
                self._data.write(fragment[1:])
                if control & LAST:
                    self._finish_request()
            else:  # data before its command, or a command amid a data set
                self._hand_over(pdvs[i:])
                return

    def _watched(self) -> bool:
        return bool(
            _config.STORE_RECV_CHUNKED_DATASET or self._dimse.assoc.get_handlers(evt.EVT_DIMSE_RECV)
        )

    def _start_request(self) -> bool:
        """Decode the complete command set: True for a C-STORE request taken here."""
        fields = parse_store_request(self._command)
        if fields is None:
            return False
        request = C_STORE()
        try:  # pynetdicom's own checks, as its decoder applies them
            request.MessageID = fields.message_id
            request.Priority = fields.priority
            request.AffectedSOPClassUID = fields.sop_class
            request.AffectedSOPInstanceUID = fields.sop_instance
        except (TypeError, ValueError):
            return False
        self._request = request
        return True

    def _finish_request(self) -> None:
        request = self._request
        assert request is not None
        request.DataSet = self._data
        request._context_id = self._context_id
        self._dimse.msg_queue.put((self._context_id, request))
        self._reset()

    def _reset(self) -> None:
        self._command = bytearray()
        self._request = None
        self._data = BytesIO()

    def _hand_over(self, rest: Sequence[PDV], command_complete: bool = False) -> None:
        """Give pynetdicom the message received so far (as one command fragment and one
        data fragment), then ``rest``."""
        replay: list[tuple[int, bytes]] = []
        if self._command or command_complete:
            done = command_complete or self._request is not None
            header = bytes([COMMAND | LAST if done else COMMAND])
            replay.append((self._context_id, header + self._command))
        if self._request is not None and self._data.tell():
            replay.append((self._context_id, b"\x00" + self._data.getvalue()))
        self._reset()
        for pdvs in (replay, [(c, bytes(f)) for c, f in rest]):
            if pdvs:
                primitive = P_DATA()  # its setter wants lists: extend its own
                primitive.presentation_data_value_list.extend(pdvs)
                self._pynetdicoms(primitive)


def parse_pdvs(body: memoryview) -> list[PDV] | None:
    """The PDV items of a P-DATA-TF PDU's body as views into it; None where pynetdicom's
    decoder should see it (no items, an item too short for its header byte, or one that
    runs past the end)."""
    items: list[PDV] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            return None
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or length > end - offset - 4:
            return None
        items.append((body[offset + 4], body[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return items or None


def dispatch_p_data(dul: DULServiceProvider, assembler: StoreAssembler, body: memoryview) -> bool:
    """Hand a received P-DATA-TF PDU's items to ``assembler`` directly, as the state
    machine's DT-2 action would; False (nothing done) unless the association is in Sta6
    with no other event queued and no EVT_FSM_TRANSITION handler, and the PDU decodes."""
    if dul.state_machine.current_state != "Sta6" or not dul.event_queue.empty():
        return False
    if dul.assoc.get_handlers(evt.EVT_FSM_TRANSITION):
        return False
    pdvs = parse_pdvs(body)
    if pdvs is None:
        return False
    assembler.feed(pdvs)
    return True
