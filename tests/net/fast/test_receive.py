"""Unit: received P-DATA assembled into C-STORE requests (node.receive) exactly as
pynetdicom's DIMSE provider assembles them, and everything else left to pynetdicom."""

from __future__ import annotations

import queue
from io import BytesIO
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import peer_associate
from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from node.net.fast.cstore import encoded_p_data, store_request, store_response
from node.net.fast.receive import StoreAssembler, parse_pdvs

DX = "1.2.840.10008.5.1.4.1.1.1.1"
PDUs = list[list[tuple[int, bytes]]]


def _assoc(watching: bool = False) -> Any:
    return SimpleNamespace(
        get_handlers=lambda event: (
            [(print, None)] if watching and event is evt.EVT_DIMSE_RECV else []
        ),
        dul=SimpleNamespace(event_queue=queue.Queue()),
    )


def _summary(dimse: DIMSEServiceProvider) -> list[dict[str, Any]]:
    """What the queued DIMSE primitives carry, comparably, and the DUL events queued."""
    out = []
    while not dimse.msg_queue.empty():
        context_id, primitive = dimse.msg_queue.get()
        fields = {
            name: getattr(primitive, name, None)
            for name in (
                "MessageID",
                "MessageIDBeingRespondedTo",
                "Priority",
                "AffectedSOPClassUID",
                "AffectedSOPInstanceUID",
                "MoveOriginatorApplicationEntityTitle",
                "MoveOriginatorMessageID",
                "Status",
            )
        }
        data = getattr(primitive, "DataSet", None)
        fields.update(
            type=type(primitive).__name__,
            context=(context_id, primitive._context_id),
            data=data.getvalue() if isinstance(data, BytesIO) else data,
        )
        out.append(fields)
    return out + list(dimse.dul.event_queue.queue)


def _pdus(primitive: Any, message: Any, context_id: int = 3, max_pdu: int = 64) -> PDUs:
    """A DIMSE message as pynetdicom sends it: one PDV per P-DATA, small fragments."""
    message.primitive_to_message(primitive)
    return [p.presentation_data_value_list for p in message.encode_msg(context_id, max_pdu)]


def _store(uid: str = "1.2.3.4", data: bytes = bytes(range(200)), **extra: Any) -> PDUs:
    rq = C_STORE()
    rq.MessageID, rq.Priority = 9, 1
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = DX, uid
    rq.DataSet = BytesIO(data)
    for name, value in extra.items():
        setattr(rq, name, value)
    return _pdus(rq, C_STORE_RQ())


def _echo() -> PDUs:
    rq = C_ECHO()
    rq.MessageID, rq.AffectedSOPClassUID = 5, "1.2.840.10008.1.1"
    return _pdus(rq, C_ECHO_RQ())


def _run(pdus: PDUs, watching: bool = False) -> tuple[list[Any], list[Any], int]:
    """(pynetdicom's queue, ours, how many primitives ours handed to pynetdicom)."""
    theirs = DIMSEServiceProvider(_assoc())
    for pdvs in pdus:
        primitive = P_DATA()
        primitive.presentation_data_value_list.extend(pdvs)
        theirs.receive_primitive(primitive)
    ours = DIMSEServiceProvider(_assoc(watching))
    reference = DIMSEServiceProvider(_assoc())  # pynetdicom behind ours, unwatched
    reference.msg_queue, reference.assoc.dul = ours.msg_queue, ours.assoc.dul
    handed: list[P_DATA] = []

    def pynetdicoms(primitive: P_DATA) -> None:
        handed.append(primitive)
        reference.receive_primitive(primitive)
        ours.message = reference.message

    assembler = StoreAssembler(ours, pynetdicoms)
    for pdvs in pdus:  # views into one buffer per PDU, as node.net.fast.netopts passes them
        assembler.feed([(c, memoryview(bytearray(d))) for c, d in pdvs])
    return _summary(theirs), _summary(ours), len(handed)


def test_a_store_request_is_assembled_as_pynetdicom_does_it_without_pynetdicom():
    pdus = _store() + _store("1.2.3.5", b"\x00" * 1000)
    assert sum(len(p) for p in pdus) > 20  # many fragments of command and data
    theirs, ours, handed = _run(pdus)
    assert ours == theirs and len(ours) == 2
    assert ours[0]["data"] == bytes(range(200)) and ours[0]["context"] == (3, 3)
    assert handed == 0


@pytest.mark.parametrize(
    "pdus",
    [
        _echo(),
        _store(MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=3),
        _echo() + _store() + _echo(),
    ],
    ids=["echo", "move-originator", "mixed"],
)
def test_other_messages_go_to_pynetdicom_and_come_out_the_same(pdus):
    theirs, ours, handed = _run(pdus)
    assert ours == theirs and handed > 0


def test_a_store_response_amid_requests_is_handed_over_whole():
    rsp = [[(3, b"\x03" + store_response(9, DX, "1.2.3.4", 0))]]
    theirs, ours, handed = _run(_store() + rsp + _store("1.2.3.6"))
    assert ours == theirs and [m["type"] for m in ours] == ["C_STORE", "C_STORE", "C_STORE"]
    assert handed == 1  # the response alone


def test_several_messages_in_one_pdu():
    pdus = [[pdv for pdu in _store() + _store("1.2.3.7") for pdv in pdu]]
    _, ours, handed = _run(pdus)
    # pynetdicom drops what follows a complete message in the same PDU; here it is kept
    assert [m["AffectedSOPInstanceUID"] for m in ours] == ["1.2.3.4", "1.2.3.7"]
    assert handed == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda pdus: [*pdus[:1], [(3, b"\x00" + bytes(10))], *pdus[1:]],  # data amid command
        lambda pdus: [*pdus[:-2], [(3, b"\x01" + bytes(10))], *pdus[-2:]],  # command amid data
        lambda pdus: [[(3, b"\x02" + bytes(4))], *pdus],  # data before any command
    ],
    ids=["data-amid-command", "command-amid-data", "data-first"],
)
def test_fragments_out_of_order_are_replayed_to_pynetdicom(damage):
    theirs, ours, handed = _run(damage(_store()))
    assert ours == theirs and handed > 0


def test_while_someone_watches_every_fragment_goes_to_pynetdicom(monkeypatch):
    theirs, ours, handed = _run(_store(), watching=True)
    assert ours == theirs and handed == len(_store())
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    assembler = StoreAssembler(DIMSEServiceProvider(_assoc()), lambda p: seen.append(p))
    seen: list[P_DATA] = []
    for pdvs in _store():
        assembler.feed(pdvs)
    assert len(seen) == len(_store())


def test_a_request_is_in_progress_from_its_first_fragment_to_its_last():
    dimse = DIMSEServiceProvider(_assoc())
    assembler = StoreAssembler(dimse, lambda p: pytest.fail("handed over"))
    pdus = _store()
    progress = []
    for pdvs in pdus:
        assembler.feed(pdvs)
        progress.append(assembler.in_message)
    assert progress == [True] * (len(pdus) - 1) + [False]
    assert dimse.msg_queue.qsize() == 1


def test_pdv_items_parse_as_views_and_odd_ones_are_left_to_pynetdicom():
    body = bytearray(b"\x00\x00\x00\x04\x01\x03ab" + b"\x00\x00\x00\x02\x03\x00")
    items = parse_pdvs(memoryview(body))
    assert [(c, bytes(d)) for c, d in items] == [(1, b"\x03ab"), (3, b"\x00")]
    assert all(isinstance(d, memoryview) for _, d in items)
    for odd in (b"", b"\x00\x00\x00\x01\x01", b"\x00\x00\x00\x09\x01\x03ab", b"\x00\x00"):
        assert parse_pdvs(memoryview(odd)) is None


def test_store_request_encoding_round_trips_through_the_assembler():
    command = store_request(4, DX, "1.2.3.8", 2)
    dimse = DIMSEServiceProvider(_assoc())
    StoreAssembler(dimse, lambda p: pytest.fail("handed over")).feed(
        [(1, b"\x03" + command), (1, b"\x02" + b"xyz")]
    )
    (ours,) = _summary(dimse)
    assert (ours["MessageID"], ours["Priority"], ours["data"]) == (4, 2, b"xyz")


def test_a_message_streaming_in_longer_than_the_network_timeout_is_received(tmp_path):
    """Network: the reader takes several PDUs of one message per reactor turn, and must
    restart the idle timer at each, as pynetdicom does: a C-STORE whose PDUs arrive back
    to back for 2 s must not be aborted by a 1 s network timeout."""
    import time

    import pydicom
    from helpers import NIH, fast_paths
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.dsutils import encode

    from node.core.config import ScpConfig
    from node.net.scp import StoreStatus, start_server
    from node.store.spool import Spool

    spool = Spool(tmp_path / "spool", fsync=False)
    cfg = ScpConfig(port=0, allowed_calling_aets=("TESTSCU",), network_timeout=1.0)
    server = start_server(cfg, spool, fast_paths=fast_paths())
    ds = pydicom.dcmread(NIH)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, [ImplicitVRLittleEndian])
    assoc = peer_associate(ae, "127.0.0.1", server.server_address[1], ae_title="CXR_NODE")
    try:
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        assoc._reactor_checkpoint.clear()  # we read the response ourselves
        while not assoc._is_paused:
            time.sleep(0.001)
        payload = encode(ds, True, True)
        command = store_request(1, str(ds.SOPClassUID), str(ds.SOPInstanceUID), 2)
        stream = b"".join(encoded_p_data(context_id, command, payload, 16384 + 6))
        sock, start = assoc.dul.socket.socket, time.monotonic()
        pieces = range(0, len(stream), 4000)
        for i in pieces:  # ~2 s in all, continuously: PDU boundaries arrive mid-piece
            sock.sendall(stream[i : i + 4000])
            time.sleep(max(0.0, start + 2.0 * (i + 4000) / len(stream) - time.monotonic()))
        assert time.monotonic() - start > 1.5 * cfg.network_timeout
        _, rsp = assoc.dimse.get_msg(block=True)
        assert rsp is not None and rsp.Status == StoreStatus.SUCCESS
        assert not assoc.is_aborted
        assert [j.sop_instance_uid for j in spool.jobs()] == [ds.SOPInstanceUID]
    finally:
        assoc._reactor_checkpoint.set()
        if assoc.is_established:
            assoc.release()
        server.shutdown()
        spool.close()
