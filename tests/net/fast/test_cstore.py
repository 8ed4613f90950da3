"""Unit: C-STORE command sets and P-DATA fragments equal pynetdicom's own encoding."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from node.net.fast.cstore import (
    StoreRequest,
    p_data,
    parse_store_request,
    store_request,
    store_response,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _pynetdicom(primitive: C_STORE, context_id: int, max_pdu: int) -> list[list[tuple[int, bytes]]]:
    message = C_STORE_RQ() if primitive.MessageIDBeingRespondedTo is None else C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [p.presentation_data_value_list for p in message.encode_msg(context_id, max_pdu)]


def _ours(command: bytes, dataset: bytes | None, context_id: int, max_pdu: int):
    return [p.presentation_data_value_list for p in p_data(context_id, command, dataset, max_pdu)]


@pytest.mark.parametrize("max_pdu", [0, 16384, 131072, 100])
@pytest.mark.parametrize("size", [1, 2, 99, 16378, 16379, 300_001])
@pytest.mark.parametrize(("sop_class", "sop_uid"), [(CT, "1.2.3"), (DX, "1.2.34.5678")])
def test_store_request_as_pynetdicom_encodes_it(max_pdu, size, sop_class, sop_uid):
    dataset = bytes(range(256)) * (size // 256) + bytes(size % 256)
    req = C_STORE()
    req.MessageID, req.Priority = 7, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_uid
    req.DataSet = BytesIO(dataset)
    ours = _ours(store_request(7, sop_class, sop_uid, 2), dataset, 3, max_pdu)
    assert ours == _pynetdicom(req, 3, max_pdu)
    assert len(ours) > 1 or max_pdu == 0  # command and data set travel apart


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0xB000])
@pytest.mark.parametrize("message_id", [1, 65535])
@pytest.mark.parametrize("max_pdu", [0, 16384, 20])
def test_store_response_as_pynetdicom_encodes_it(status, message_id, max_pdu):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = message_id, status
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = DX, "2.25.12345678901234567890"
    ours = _ours(
        store_response(message_id, DX, "2.25.12345678901234567890", status), None, 1, max_pdu
    )
    assert ours == _pynetdicom(rsp, 1, max_pdu)


def test_a_pdu_too_small_for_any_data_is_refused():
    with pytest.raises(ValueError, match="no room"):
        list(p_data(1, store_request(1, CT, "1.2.3", 2), b"x", 6))


def _pynetdicom_decoded(command: bytes):
    """The primitive pynetdicom makes of a complete command set (no data set needed)."""
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    message, primitive = DIMSEMessage(), P_DATA()
    primitive.presentation_data_value_list.append((1, b"\x03" + command))
    message.decode_msg(primitive)
    return message.message_to_primitive()


@pytest.mark.parametrize("priority", [0, 1, 2])
@pytest.mark.parametrize(
    ("sop_class", "sop_uid"), [(CT, "1.2.3"), (DX, "1.2.34.5678"), (DX, "2.25." + "9" * 59)]
)
def test_store_requests_parse_as_pynetdicom_decodes_them(priority, sop_class, sop_uid):
    command = store_request(65535, sop_class, sop_uid, priority)
    parsed = parse_store_request(command)
    reference = _pynetdicom_decoded(command)
    assert parsed == StoreRequest(65535, priority, sop_class, sop_uid)
    assert (reference.MessageID, reference.Priority) == (parsed.message_id, parsed.priority)
    assert reference.AffectedSOPClassUID == parsed.sop_class
    assert reference.AffectedSOPInstanceUID == parsed.sop_instance
    assert parse_store_request(memoryview(bytearray(command))) == parsed


def _with_element(command: bytes, tag: int, value: bytes) -> bytes:
    """``command`` with one element added (group length left as it was)."""
    import struct

    return command + struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _replaced(command: bytes, old: bytes, new: bytes) -> bytes:
    assert command.count(old) == 1
    return command.replace(old, new)


GOOD = store_request(7, DX, "1.2.3.4", 0)
DATASET_PRESENT_ELEMENT = b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x00"  # (0000,0800) US 1
PRIORITY_ELEMENT = b"\x00\x00\x00\x07\x02\x00\x00\x00\x00\x00"  # (0000,0700) US 0


@pytest.mark.parametrize(
    "command",
    [
        store_response(7, DX, "1.2.3.4", 0),  # a response
        _replaced(
            GOOD, DATASET_PRESENT_ELEMENT, DATASET_PRESENT_ELEMENT[:-2] + b"\x01\x01"
        ),  # none
        _replaced(GOOD, DATASET_PRESENT_ELEMENT, DATASET_PRESENT_ELEMENT + b"\x00"),  # stray byte
        _replaced(GOOD, PRIORITY_ELEMENT, PRIORITY_ELEMENT[:4] + b"\x04\0\0\0\0\0\0\0"),  # UL
        _with_element(GOOD, 0x00001030, b"MOVESCU "),  # Move Originator AE Title
        _with_element(GOOD, 0x00001031, b"\x01\x00"),  # Move Originator Message ID
        _with_element(GOOD, 0x00020010, b"1.2\x00"),  # not group 0000
        GOOD[:-1],  # truncated value
        GOOD[:-10],  # truncated header
        _with_element(GOOD, 0x00000110, b"\x07\x00"),  # an element twice
        _replaced(GOOD, b"1.2.3.4", b"1.2.3.a"),  # not digits and dots
        _replaced(GOOD, b"1.2.3.4", b"1.2\\3.4"),  # two values
        _replaced(GOOD, b"1.2.3.4", b"   \x00\x00\x00\x00"),  # empty after stripping
        b"",
    ],
)
def test_anything_but_a_plain_store_request_is_left_to_pynetdicom(command):
    assert parse_store_request(command) is None
