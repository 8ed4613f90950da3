"""The node as a real process under a mix of 20 odd and hostile data sets sent between
valid chest images: every valid image gets its SR, the node never exits, and each odd one
ends refused at the SCP (a named status) or in a final job state with its reason."""

from __future__ import annotations

import struct
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    Sender,
    chest_images,
    deeply_nested,
    free_port,
    peer_associate,
    send_raw_c_store,
    sr_sources,
    storescp,
    wait_for,
)
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

pytestmark = pytest.mark.integration


def _lut_item(descriptor: list[int] | None, data: list[int] | None) -> Dataset:
    item = Dataset()
    if descriptor is not None:
        item.LUTDescriptor = descriptor
    if data is not None:
        item.add_new(0x00283006, "US", data)
    return item


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An element as received: its bytes are written as they are, never validated."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


REFERENCED_IMAGES = 0x00081140


def _nested_items(depth: int) -> bytes:
    """The value of the Referenced Image Sequence of ``deeply_nested(ds, depth)`` as
    pydicom encodes it (Implicit VR Little Endian, defined lengths), in linear time: its
    writer re-walks every nested level (quadratic). Written as UN, whose VR Implicit VR
    does not encode, it goes on the wire as that sequence."""
    content = b""
    for _ in range(depth + 1):
        item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(content)) + content
        content = struct.pack("<HHI", 0x0008, 0x1140, len(item)) + item
    return item


def test_the_nested_items_are_what_pydicom_encodes():
    for depth in (0, 1, 5):
        ds, raw = deeply_nested(Dataset(), depth), Dataset()
        raw[REFERENCED_IMAGES] = _raw(REFERENCED_IMAGES, "UN", _nested_items(depth))
        assert _implicit_le(raw) == _implicit_le(ds) != b""


def _implicit_le(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, implicit_vr=True, little_endian=True)
    return out.getvalue()


def _sixteen_bit(ds: Dataset) -> Dataset:
    px = ds.pixel_array.astype(np.uint16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 8, 7
    ds.PixelData = px.tobytes()
    return ds


def _odd(ds: Dataset, kind: str) -> Dataset:
    ds.Modality = "CR"
    if kind == "modality lut sequence":  # the real crasher: a valid image
        _sixteen_bit(ds).ModalityLUTSequence = [
            _lut_item([256, 0, 12], [int(v) for v in np.sqrt(np.arange(256) / 255) * 4095])
        ]
    elif kind == "empty lut item":
        _sixteen_bit(ds).ModalityLUTSequence = [Dataset()]
    elif kind == "lut without data":
        _sixteen_bit(ds).ModalityLUTSequence = [_lut_item([256, 0, 16], None)]
    elif kind == "short lut":
        _sixteen_bit(ds).ModalityLUTSequence = [_lut_item([4096, 0, 16], [1, 2, 3])]
    elif kind == "zero-length pixels":
        ds.PixelData = b""
    elif kind == "short pixels":
        ds.PixelData = ds.PixelData[:1000]
    elif kind == "2500-deep nesting":  # pydicom's writer takes ~30 s of CPU on it
        ds[REFERENCED_IMAGES] = _raw(REFERENCED_IMAGES, "UN", _nested_items(2500))
    elif kind == "dotted study date":
        ds.StudyDate = "1993.04.30"
    elif kind == "56-char accession":
        ds.AccessionNumber = "A" * 56
    elif kind == "leading-zero uid":
        ds.StudyInstanceUID = "999.999.01.23.45.6789"
    elif kind == "palette colour":
        ds.PhotometricInterpretation = "PALETTE COLOR"
    elif kind == "lateral":
        ds.ViewPosition = "LL"
    elif kind == "ct":
        ds.Modality = "CT"
    elif kind == "bad rescale slope":  # raw: pydicom would not store '1A' as a DS
        ds[0x00281053] = _raw(0x00281053, "DS", b"1A")
        ds.RescaleIntercept = "0"
    elif kind == "bits stored over allocated":
        ds.BitsStored, ds.HighBit = 12, 11
    elif kind == "zero rows":
        ds.Rows = 0
    elif kind == "frames not a number":
        ds[0x00280008] = _raw(0x00280008, "IS", b"x ")
    elif kind == "ybr with one sample":
        ds.PhotometricInterpretation = "YBR_FULL"
    elif kind == "rgb":
        px = ds.pixel_array
        ds.PixelData = np.repeat(px[:, :, None], 3, axis=2).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    elif kind == "retired us class":
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6"
    return ds


KINDS = [
    "modality lut sequence",
    "empty lut item",
    "lut without data",
    "short lut",
    "zero-length pixels",
    "short pixels",
    "2500-deep nesting",
    "dotted study date",
    "56-char accession",
    "leading-zero uid",
    "palette colour",
    "lateral",
    "ct",
    "bad rescale slope",
    "bits stored over allocated",
    "zero rows",
    "frames not a number",
    "ybr with one sample",
    "rgb",
    "retired us class",
]


def test_odd_and_hostile_data_sets_between_valid_chest_images(node_factory, tmp_path):
    valid = chest_images(len(KINDS) + 1, "valid")
    odd = [_odd(ds, kind) for ds, kind in zip(chest_images(len(KINDS), "odd"), KINDS, strict=True)]
    pacs_port = free_port()
    pacs = storescp(tmp_path / "pacs", pacs_port)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(30000)  # pynetdicom encodes the 2,500-deep data set recursively
    try:
        node = node_factory(pacs_port, model=False)
        sender = Sender(node.port)
        for i, ds in enumerate(odd):
            sender.send([valid[i]])
            _send_encoded(node.port, ds, sender)
        sender.send([valid[-1]])
        assert set(map(str, (d.SOPInstanceUID for d in valid))) <= set(sender.acked)
        want = {str(d.SOPInstanceUID) for d in valid}
        wait_for(
            lambda: want <= sr_sources(tmp_path / "pacs"),
            180,
            "an SR for every valid chest image",
        )
        wait_for(
            lambda: not node.jobs().get("received") and not node.jobs().get("classified"),
            60,
            "every job in a final state",
        )
        assert node.proc.poll() is None, node.log_text()
        text = node.log_text()
        assert "Traceback" not in text and "CRITICAL" not in text
        states = _job_states(node.spool / "jobs.sqlite")
        for ds, kind in zip(odd, KINDS, strict=True):
            uid = str(ds.SOPInstanceUID)
            if uid in NOT_NEGOTIATED:  # no presentation context for its SOP class
                assert kind == "retired us class"
                continue
            if uid not in sender.acked:  # refused at the SCP: a named status, logged
                assert uid in text, kind
                continue
            state, reason = states[uid]
            assert state in ("sent", "skipped", "failed", "quarantined"), (kind, state)
            assert state == "sent" or reason, kind
        assert states[str(odd[0].SOPInstanceUID)][0] == "sent"  # the real CR's LUT works
    finally:
        sys.setrecursionlimit(limit)
        pacs.terminate()
        pacs.wait(10)


NOT_NEGOTIATED: set[str] = set()


def _send_encoded(port: int, ds: Dataset, sender: Sender) -> None:
    """C-STORE ``ds`` as its bytes (encoded here, as the modality would have), whatever a
    peer's encoder would make of it."""
    from pynetdicom import AE

    out = BytesIO()
    ds.save_as(out, implicit_vr=True, little_endian=True)
    payload = out.getvalue()
    offset = payload.index(b"DICM") + 4 if payload[128:132] == b"DICM" else 0
    if offset:  # skip the File Meta group: its length is in its first element
        offset += 12 + int.from_bytes(payload[offset + 8 : offset + 12], "little")
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(str(ds.SOPClassUID), ["1.2.840.10008.1.2"])
    assoc = peer_associate(ae, "127.0.0.1", port, ae_title="CXR_NODE")
    uid = str(ds.SOPInstanceUID)
    if not assoc.is_established or not assoc.accepted_contexts:  # a class it does not take
        if assoc.is_established:
            assoc.release()
        sender.failed.append(uid)
        NOT_NEGOTIATED.add(uid)
        return
    try:
        status = send_raw_c_store(assoc, str(ds.SOPClassUID), uid, payload[offset:])
    finally:
        if assoc.is_established:
            assoc.release()
    (sender.acked if status and status.get("Status") == 0 else sender.failed).append(uid)


def _job_states(db: Path) -> dict[str, tuple[str, str]]:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT sop_instance_uid, state, last_error FROM jobs").fetchall()
    finally:
        con.close()
    return {str(u): (str(s), str(e)) for u, s, e in rows}
