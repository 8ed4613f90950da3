"""C-STORE messages encoded and decoded directly: command sets and P-DATA fragments (pure).

pynetdicom encodes each command set through a pydicom Dataset, once per message (measured
in bench/RESULTS.md, third session, "C-STORE messages encoded directly"), and builds the
P-DATA primitives after it. A C-STORE request or response without optional elements is six
elements of fixed shape; these functions give byte for byte what pynetdicom's
``DIMSEMessage.encode_msg`` gives (the unit tests compare them), for
``node.net.fast.netopts.send_msg``. :func:`parse_store_request` reads such a request back,
for ``node.net.fast.receive``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

from pynetdicom.pdu_primitives import P_DATA

STORE_RQ = 0x0001  # Command Field
STORE_RSP = 0x8001
DATASET_PRESENT = 0x0001  # Command Data Set Type, as pynetdicom sends it
NO_DATASET = 0x0101
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
LAST_COMMAND = bytes([COMMAND | LAST])  # the header of a command's last fragment
PDU_HEADER = 6  # a PDV item's length (4) and context ID (1), and the message header (1)


def _element(tag: int, value: bytes) -> bytes:
    """One command element, Implicit VR Little Endian."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _store_command(sop_class: str, sop_instance: str, *fields: tuple[int, int]) -> bytes:
    """A C-STORE command set: the SOP Class UID, ``fields`` (tag, US value) in tag order,
    the SOP Instance UID, all behind their group length."""
    body = b"".join(
        [
            _element(0x00000002, _uid(sop_class)),
            *(_element(tag, _us(value)) for tag, value in fields),
            _element(0x00001000, _uid(sop_instance)),
        ]
    )
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def store_request(message_id: int, sop_class: str, sop_instance: str, priority: int) -> bytes:
    """The command set of a C-STORE-RQ with a data set and no Move Originator."""
    return _store_command(
        sop_class,
        sop_instance,
        (0x00000100, STORE_RQ),  # Command Field
        (0x00000110, message_id),
        (0x00000700, priority),  # 0 medium, 1 high, 2 low
        (0x00000800, DATASET_PRESENT),  # Command Data Set Type
    )


def store_response(message_id: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    """The command set of a C-STORE-RSP without Error Comment or Offending Element."""
    return _store_command(
        sop_class,
        sop_instance,
        (0x00000100, STORE_RSP),
        (0x00000120, message_id),  # Message ID Being Responded To
        (0x00000800, NO_DATASET),
        (0x00000900, status),
    )


def p_data(
    context_id: int, command: bytes, dataset: bytes | None, max_pdu: int
) -> Iterator[P_DATA]:
    """The message as P-DATA primitives, one PDV each: the command's fragments, then the
    data set's; ``max_pdu`` is the peer's maximum PDU length (0: unlimited)."""
    for data, more, last in _parts(command, dataset):
        with memoryview(data) as view:  # one copy per fragment: the header's concatenation
            for start, end, final in _spans(len(data), max_pdu):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append(
                    (context_id, (last if final else more) + view[start:end])
                )
                yield pdata


def encoded_p_data(
    context_id: int, command: bytes, dataset: bytes | None, max_pdu: int, chunk: int = 1 << 20
) -> Iterator[bytes]:
    """The P-DATA-TF PDUs that :func:`p_data`'s primitives encode to, byte for byte,
    joined into pieces of about ``chunk`` bytes (one socket write each)."""
    pieces: list[bytes | memoryview] = []
    size = 0
    for data, more, last in _parts(command, dataset):
        view = memoryview(data)
        for start, end, final in _spans(len(data), max_pdu):
            n = end - start  # PDU length: PDV item length (4) + its value (context, header, data)
            pieces.append(struct.pack(">BBIIB", 0x04, 0, n + 6, n + 2, context_id))
            pieces += [last if final else more, view[start:end]]
            size += n + 12
            if size >= chunk:
                yield b"".join(pieces)
                pieces, size = [], 0
    if pieces:
        yield b"".join(pieces)


def _parts(command: bytes, dataset: bytes | None) -> list[tuple[bytes, bytes, bytes]]:
    """(data, header of a fragment that is not the last, header of the last fragment)."""
    parts = [(command, b"\x01", LAST_COMMAND)]
    return [*parts, (dataset, b"\x00", b"\x02")] if dataset else parts


def _spans(size: int, max_pdu: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, whether last) of each fragment of ``size`` bytes that fits a PDU."""
    if 0 < max_pdu <= PDU_HEADER:
        raise ValueError(f"maximum PDU length {max_pdu} leaves no room for data")
    step = max_pdu - PDU_HEADER if max_pdu else size
    for start in range(0, size, step):
        yield start, min(start + step, size), start + step >= size


class StoreRequest(NamedTuple):
    message_id: int
    priority: int
    sop_class: str
    sop_instance: str


_REQUEST_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
"""Group 0000 elements of a C-STORE-RQ without Move Originator: group length, Affected
SOP Class UID, Command Field, Message ID, Priority, Command Data Set Type, Affected SOP
Instance UID."""
_UID_CHARS = frozenset(b"0123456789.")


def parse_store_request(command: bytes | bytearray | memoryview) -> StoreRequest | None:
    """The fields of an encoded C-STORE-RQ command set that announces a data set and has
    no Move Originator, or None for anything else: another command, a request without a
    data set, optional or unknown elements, a UID that is not digits and dots (after
    pydicom's removal of trailing NULs and spaces) or longer than 64, a wrong length,
    truncated bytes. What gives None is left to pynetdicom's decoder, which knows (and
    reports) every other case."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if group or element in elements or element not in _REQUEST_ELEMENTS:
            return None
        if length > end - offset:
            return None
        elements[element] = bytes(command[offset : offset + length])
        offset += length
    if len(elements) != len(_REQUEST_ELEMENTS) or len(elements[0x0000]) != 4:
        return None
    try:
        field, message_id, priority, dataset = (
            struct.unpack("<H", elements[tag])[0] for tag in (0x0100, 0x0110, 0x0700, 0x0800)
        )
    except struct.error:  # not 2 bytes long
        return None
    if field != STORE_RQ or dataset == NO_DATASET:
        return None
    sop_class, sop_instance = (_plain_uid(elements[tag]) for tag in (0x0002, 0x1000))
    if sop_class is None or sop_instance is None:
        return None
    return StoreRequest(message_id, priority, sop_class, sop_instance)


def _plain_uid(value: bytes) -> str | None:
    uid = value.rstrip(b"\0 ")
    if not uid or len(uid) > 64 or not _UID_CHARS.issuperset(uid):
        return None
    return uid.decode("ascii")
