"""Unit: File Meta bytes, header UIDs and Part 10 splitting without decoding (node.wire),
and the socket reader and logging switch of node.net.fast.netopts."""

from __future__ import annotations

import logging
import socket
import threading
import zlib
from functools import partial
from io import BytesIO
from typing import Any

import pydicom
import pytest
from helpers import ACRNEMA, NIH
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import _config
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta

from node.core.errors import MalformedDataset
from node.dicom.dicomio import split_encoded
from node.dicom.wire import PREAMBLE, dataset_uids, encoded_element, file_meta_bytes, split_part10
from node.net.fast.netopts import quiet_pynetdicom, read_exact

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.34", "2.25.123456789012345678901234567890"])
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, JPEGBaseline8Bit])
def test_file_meta_bytes_equal_pynetdicoms_encoding(uid, syntax):
    meta = create_file_meta(sop_class_uid=SOP_CLASS, sop_instance_uid=uid, transfer_syntax=syntax)
    assert file_meta_bytes(SOP_CLASS, uid, syntax) == PREAMBLE + encode_file_meta(meta)


def _encoded(syntax: str) -> tuple[pydicom.Dataset, bytes]:
    """NIH's data set encoded in ``syntax`` (no File Meta)."""
    ds = pydicom.dcmread(NIH)
    del ds.PixelData  # the header is what is read; big endian OB/OW swapping is not the point
    implicit = syntax == ImplicitVRLittleEndian
    raw = encode(ds, implicit, syntax != ExplicitVRBigEndian)
    assert raw is not None
    if syntax == DeflatedExplicitVRLittleEndian:
        squash = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = squash.compress(raw) + squash.flush()
    return ds, raw


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_dataset_uids_in_every_uncompressed_syntax(syntax):
    ds, raw = _encoded(syntax)
    assert dataset_uids(BytesIO(raw), syntax) == (ds.SOPInstanceUID, ds.SOPClassUID)


def test_dataset_uids_stop_before_the_pixel_data_and_tell_what_is_missing():
    _, raw = _encoded(ExplicitVRLittleEndian)
    fp = BytesIO(raw)
    dataset_uids(fp, ExplicitVRLittleEndian)
    assert fp.tell() < 200  # stopped right after (0008,0018)
    assert dataset_uids(BytesIO(b""), ImplicitVRLittleEndian) == ("", "")


def with_element(ds: pydicom.Dataset, extra: bytes, at: int) -> bytes:
    """``ds`` in Explicit VR Little Endian with the encoded element ``extra`` written
    before the first element at or above tag ``at`` (by hand: pydicom writes in order)."""
    head, tail = (encode(part, False, True) for part in (ds[:at], ds[at:]))
    assert head is not None and tail is not None
    return head + extra + tail


OTHER_UID = "1.2.826.0.1.3680043.8.498.424242"
REPEATS = {  # a second SOP Instance or Class UID, right after the first or later in 0008
    "uid-next": (0x00080018, OTHER_UID, 0x00080019),
    "uid-later": (0x00080018, OTHER_UID, 0x00081030),
    "same-uid-later": (0x00080018, None, 0x00080061),
    "class-later": (0x00080016, "1.2.840.10008.5.1.4.1.1.1.1", 0x00080061),
}


@pytest.mark.parametrize("case", REPEATS)
def test_a_repeated_sop_uid_is_malformed_and_left_to_the_thorough_reader(case):
    tag, value, at = REPEATS[case]
    ds = pydicom.dcmread(NIH)
    value = value or ds.SOPInstanceUID
    raw = with_element(ds, encoded_element(tag, "UI", value.encode()), at)
    with pytest.raises(MalformedDataset, match="repeated or out of order"):
        dataset_uids(BytesIO(raw), ExplicitVRLittleEndian)
    meta = file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    assert split_part10(meta + raw) is None
    assert pydicom.dcmread(BytesIO(meta + raw))[tag].value == value  # a full read keeps the last


def test_split_part10_agrees_with_split_encoded():
    data = NIH.read_bytes()
    cls, uid, syntax, offset = split_part10(data)
    slow = split_encoded(data, "nih")
    assert (cls, uid, syntax) == (slow.sop_class_uid, slow.sop_instance_uid, slow.transfer_syntax)
    assert data[offset:] == slow.dataset


def test_split_part10_leaves_acr_nema_and_garbage_to_the_thorough_reader():
    assert split_part10(ACRNEMA.read_bytes()) is None
    assert split_part10(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff") is None


def test_exact_reader_reads_across_partial_sends_and_stops_at_close():
    a, b = socket.socketpair()
    payload = bytes(range(256)) * 1024
    with a, b:
        sender = threading.Thread(
            target=lambda: [a.sendall(payload[i : i + 777]) for i in range(0, len(payload), 777)]
        )
        sender.start()
        read = partial(read_exact, b)
        assert read(6) == payload[:6]
        assert read(len(payload) - 6) == payload[6:]
        sender.join()
        a.sendall(b"abc")
        a.shutdown(socket.SHUT_WR)
        assert read(10) == b"abc"  # peer closed: what arrived, as pynetdicom's recv does


def test_pynetdicom_standard_log_handlers_only_when_its_log_shows_info():
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    try:
        logger.setLevel(logging.WARNING)
        quiet_pynetdicom()
        assert _config.LOG_HANDLER_LEVEL == "none"
        logger.setLevel(logging.DEBUG)
        quiet_pynetdicom()
        assert _config.LOG_HANDLER_LEVEL == "standard"
    finally:
        logger.setLevel(before)
        quiet_pynetdicom()


def test_exact_reader_does_not_allocate_what_a_pdu_header_merely_claims():
    import tracemalloc

    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"A" * 100)
        a.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            assert read_exact(b, 0xFFFFFFFF) == b"A" * 100
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 4 * 2**20


class _FakeDul:
    """What node.net.fast.netopts.read_pdu_data uses of a DULServiceProvider, over a socket pair
    that holds ``data`` and then closes."""

    def __init__(
        self, data: bytes, watched: bool = False, max_pdu: int = 0, message_bytes: int | None = None
    ) -> None:
        import queue
        from types import SimpleNamespace

        from node.net.fast.netopts import ReadLimits

        ours, peer = socket.socketpair()

        def send() -> None:
            with peer:
                peer.sendall(data)

        self._sender = threading.Thread(target=send)
        self._sender.start()
        self._sock = ours
        self.closed = False
        self.socket = SimpleNamespace(
            recv=partial(read_exact, ours),
            socket=None,
            close=lambda: setattr(self, "closed", True),
            limits=ReadLimits(message_bytes=message_bytes),
            message_bytes=0,
        )
        self.event_queue: queue.Queue[str] = queue.Queue()
        self._recv_pdu: queue.Queue[object] = queue.Queue()
        peer = SimpleNamespace(address="127.0.0.1", maximum_length=max_pdu)
        self.assoc = SimpleNamespace(
            get_handlers=lambda event: ["h"] if watched else [],
            is_acceptor=True,
            acceptor=peer,
            requestor=peer,
        )
        self.decoded: list[bytes] = []

    def _decode_pdu(self, bytestream: bytearray):  # pynetdicom's way, minus its events
        from pynetdicom.dul import _PDU_TYPES

        self.decoded.append(bytes(bytestream))
        cls, event = _PDU_TYPES[bytes(bytestream[:1])]
        pdu = cls()
        pdu.decode(bytes(bytestream))
        return pdu, event

    def events(self) -> list[str]:
        self._sock.close()
        self._sender.join()
        return list(self.event_queue.queue)


def _store_request_pdus(data: bytes, max_pdu: int) -> list[Any]:
    """A C-STORE request with ``data`` as pynetdicom's P_DATA_TF PDUs, one PDV each."""
    from pynetdicom.pdu import P_DATA_TF

    from node.net.fast.cstore import p_data, store_request

    pdus = []
    for primitive in p_data(5, store_request(3, "1.2.3", "1.2.3.4", 0), data, max_pdu):
        pdus.append(P_DATA_TF())
        pdus[-1].from_primitive(primitive)
    return pdus


def _p_data_pdu(size: int) -> bytes:
    pdus = _store_request_pdus(bytes(size) + b"x", 0)
    pdus[0].presentation_data_value_items += pdus[1].presentation_data_value_items
    return pdus[0].encode()  # one PDU, two PDVs: the command and the data set


def test_p_data_pdus_decode_over_views_as_pynetdicom_decodes_them():
    from pynetdicom.pdu import P_DATA_TF

    from node.net.fast.netopts import read_pdu_data

    raw = _p_data_pdu(300_000)
    dul = _FakeDul(raw)
    read_pdu_data(dul)
    assert dul.events() == ["Evt10"] and dul.decoded == []  # not pynetdicom's decoder
    ours = dul._recv_pdu.get().to_primitive().presentation_data_value_list
    reference = P_DATA_TF()
    reference.decode(raw)
    want = reference.to_primitive().presentation_data_value_list
    assert [(c, bytes(d)) for c, d in ours] == want
    assert len(want) == 2 and len(want[1][1]) == 300_002
    assert all(isinstance(d, memoryview) for _, d in ours)  # views, not copies

    watched = _FakeDul(raw, watched=True)  # a handler wants the PDU: pynetdicom decodes
    read_pdu_data(watched)
    assert watched.events() == ["Evt10"] and watched.decoded == [raw]


@pytest.mark.parametrize(
    ("damage", "event"),
    [
        (lambda raw: raw[:4], "Evt17"),  # closed inside the PDU header
        (lambda raw: raw[:-1], "Evt17"),  # closed inside the PDU
        (lambda raw: b"\x09" + raw[1:], "Evt17"),  # unknown PDU type: aborted and closed
        (lambda raw: raw[:6] + b"\xff\xff\xff\xff" + raw[10:], "Evt19"),  # PDV too long
    ],
)
def test_damaged_pdus_end_as_in_pynetdicom(damage, event):
    from node.net.fast.netopts import read_pdu_data

    dul = _FakeDul(damage(_p_data_pdu(1000)))
    read_pdu_data(dul)
    assert dul.events() == [event]
    assert dul._recv_pdu.empty()


@pytest.mark.parametrize(
    ("head", "what"),
    [
        (b"\x01\x00" + (2**32 - 1).to_bytes(4, "big"), "A-ASSOCIATE-RQ of 4 GiB"),
        (b"\x01\x00" + (65 * 1024).to_bytes(4, "big"), "A-ASSOCIATE-RQ over 64 KiB"),
        (b"\x04\x00" + (256 * 2**20).to_bytes(4, "big"), "P-DATA-TF of 256 MiB"),
        (b"\x07\x00" + (2**20).to_bytes(4, "big"), "A-ABORT of 1 MiB"),
    ],
)
def test_a_pdu_longer_than_its_limit_is_refused_before_its_body_is_read(head, what):
    """Before: the reader read what the header claimed (RSS +1 GiB for a 1 GiB body)."""
    from node.net.fast.netopts import read_pdu_data

    dul = _FakeDul(head + bytes(100_000), max_pdu=128 * 1024)
    read_pdu_data(dul)
    assert dul.events() == ["Evt17"] and dul.closed, what
    assert dul._recv_pdu.empty()


def test_a_message_growing_past_its_limit_is_refused_while_it_streams():
    from node.net.fast.netopts import read_pdu_data

    pdus = _store_request_pdus(bytes(5000), 1000)  # no message end within the limit
    raw = b"".join(p.encode() for p in pdus)
    dul = _FakeDul(raw, max_pdu=1000, message_bytes=3000)
    for _ in range(len(pdus)):
        read_pdu_data(dul)
        if dul.closed:
            break
    assert dul.closed and "Evt17" in dul.events()


def test_a_message_within_its_limit_resets_the_count_at_its_last_fragment():
    from node.net.fast.netopts import read_pdu_data

    pdus = _store_request_pdus(bytes(2000), 1000)
    one = b"".join(p.encode() for p in pdus)
    dul = _FakeDul(one * 3, max_pdu=1000, message_bytes=2500)  # three messages of ~2.1 KB
    for _ in range(3 * len(pdus)):
        read_pdu_data(dul)
    assert not dul.closed and dul.events() == ["Evt10"] * (3 * len(pdus))


def test_a_peer_that_stops_mid_pdu_times_out_at_the_deadline():
    import time

    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\x04\x00\x00\x00\x10\x00" + b"x" * 10)  # 4 KiB announced, 16 B sent
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            read_exact(b, 6 + 4096, deadline=start + 0.3)
        assert time.monotonic() - start < 2
        assert b.gettimeout() is None  # the socket's own timeout restored


def _store_pdus(n_data: int) -> bytes:
    """A C-STORE request as 1 + ``n_data`` P-DATA-TF PDUs, back to back."""
    pdus = _store_request_pdus(bytes(100 * n_data), 106)  # 100 data bytes per PDU
    return b"".join(pdu.encode() for pdu in pdus)


@pytest.mark.parametrize("queued_send", [False, True])
def test_the_reader_takes_a_message_in_one_turn_unless_something_waits_to_be_sent(queued_send):
    """read_pdu_data reads the PDUs of one message that have arrived in one reactor turn,
    restarting the idle timer at each (as pynetdicom's reactor does per PDU); with a send
    queued it gives the reactor its turn after one PDU."""
    import queue
    import time
    from types import SimpleNamespace

    from pynetdicom.dimse import DIMSEServiceProvider

    from node.net.fast.netopts import read_pdu_data
    from node.net.fast.receive import StoreAssembler

    dul = _FakeDul(_store_pdus(5))
    dul.socket.socket = dul._sock
    dul.state_machine = SimpleNamespace(current_state="Sta6")
    dul.to_provider_queue = queue.Queue()
    dul._kill_thread = False
    restarts: list[int] = []
    dul._idle_timer = SimpleNamespace(restart=lambda: restarts.append(1))
    if queued_send:
        dul.to_provider_queue.put("a response")
    dimse = DIMSEServiceProvider(SimpleNamespace(get_handlers=lambda e: [], dul=dul))
    assembler = StoreAssembler(dimse, lambda p: pytest.fail("handed to pynetdicom"))
    time.sleep(0.2)  # all of it has arrived
    read_pdu_data(dul, assembler)
    if queued_send:
        assert restarts == [1] and assembler.in_message
        return
    assert len(restarts) == 6 and not assembler.in_message  # the command and 5 data PDUs
    context_id, request = dimse.msg_queue.get_nowait()
    assert (context_id, request.AffectedSOPInstanceUID) == (5, "1.2.3.4")
    assert dul.events() == []
