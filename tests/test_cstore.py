"""Unit: C-STORE command sets and P-DATA fragments equal pynetdicom's own encoding."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from node.cstore import p_data, store_request, store_response

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
