"""What a peer may make the SCP hold, checked on the byte stream as it arrives (pure).

PS3.8 9.3: every PDU starts with its type and length; a P-DATA-TF PDU holds presentation
data value items, each a fragment of a message, the last fragment of a command or data set
flagged in its header. :class:`PduMeter` follows that structure over the bytes a peer
sends, in pieces of any size, and says why to refuse them as soon as a PDU header claims
more than its type may carry or a message's fragments pass their limit: before the bytes
are read, not after. The SCP's reader without the fast paths (``node.net.fast.sockopts``) feeds it
every piece it receives; the fast paths' reader (``node.net.fast.netopts``) checks the same limits
itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_ASSOCIATE_PDU = 64 * 1024
"""A-ASSOCIATE-RQ/AC/RJ PDUs longer than this are refused (real ones are a few KiB)."""
MAX_SMALL_PDU = 1024
"""A-RELEASE and A-ABORT PDUs are 10 bytes."""
P_DATA_TF_TYPE = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ .. A-ABORT
HEADER = 6  # a PDU's type, reserved byte and length; a PDV item's length, context and control
LAST_FRAGMENT = 0x02


def pdu_limit(pdu_type: int, max_pdu: int) -> int:
    """The longest PDU of this type that is read: A-ASSOCIATE near 64 KiB, P-DATA-TF our
    maximum PDU length ``max_pdu`` (0: unlimited, as negotiated), release and abort a few
    bytes."""
    if pdu_type == P_DATA_TF_TYPE:
        return max_pdu + HEADER if max_pdu else 2**32 - 1
    return MAX_ASSOCIATE_PDU if pdu_type <= 0x03 else MAX_SMALL_PDU


@dataclass
class PduMeter:
    """Follows the PDUs of one connection; :meth:`feed` says why to refuse them.

    ``max_pdu``: our maximum PDU length (``scp.max_pdu``); ``message_bytes``: the most
    fragment bytes of one command set or data set (None: no limit)."""

    max_pdu: int
    message_bytes: int | None = None
    _head: bytes = b""  # the part of a header (PDU or PDV item) received so far
    _pdu_left: int = 0  # bytes of the current P-DATA-TF PDU not yet received
    _skip: int = 0  # bytes to pass over: another PDU's body, or a fragment's data
    _in_p_data: bool = False
    _message: int = 0  # fragment bytes of the message part being received
    _refused: str = ""

    def feed(self, data: bytes | bytearray | memoryview) -> str:
        """Take the next bytes received; "" while they are within the limits, else why
        not (and the same for everything after: the connection is to be aborted)."""
        offset, end = 0, len(data)
        while offset < end and not self._refused:
            if self._skip:
                step = min(self._skip, end - offset)
                self._skip -= step
                offset += step
                continue
            if self._in_p_data and not self._pdu_left:
                self._in_p_data = False
            wanted = HEADER - len(self._head)
            self._head += bytes(data[offset : offset + wanted])
            offset += min(wanted, end - offset)
            if len(self._head) == HEADER:
                head, self._head = self._head, b""
                self._refused = self._item(head) if self._in_p_data else self._pdu(head)
        return self._refused

    def _pdu(self, head: bytes) -> str:
        pdu_type, _, length = struct.unpack(">BBI", head)
        if pdu_type not in PDU_TYPES:
            return f"unknown PDU type 0x{pdu_type:02X}"
        limit = pdu_limit(pdu_type, self.max_pdu)
        if length > limit:
            return f"PDU of type 0x{pdu_type:02X} and {length} bytes (limit {limit})"
        if pdu_type == P_DATA_TF_TYPE:
            self._in_p_data, self._pdu_left = length > 0, length
        else:
            self._skip = length
        return ""

    def _item(self, head: bytes) -> str:
        """A presentation data value item's header, inside a P-DATA-TF PDU."""
        length, _context, control = struct.unpack(">IBB", head)
        if length < 2 or length + 4 > self._pdu_left:
            return "a P-DATA-TF PDU whose items do not add up"
        self._pdu_left -= length + 4
        self._skip = length - 2
        self._message += length - 2
        if self.message_bytes is not None and self._message > self.message_bytes:
            return f"a message growing past {self.message_bytes} bytes (scp.max_dataset_mb)"
        if control & LAST_FRAGMENT:
            self._message = 0
        return ""
