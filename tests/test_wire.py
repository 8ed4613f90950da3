"""Unit: File Meta bytes, header UIDs and Part 10 splitting without decoding (node.wire),
and the socket reader and logging switch of node.netopts."""

from __future__ import annotations

import logging
import socket
import threading
import zlib
from functools import partial
from io import BytesIO

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

from node.dicomio import split_encoded
from node.netopts import quiet_pynetdicom, read_exact
from node.wire import PREAMBLE, dataset_uids, file_meta_bytes, split_part10

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
