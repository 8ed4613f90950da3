"""Encoded DICOM objects as they travel: File Meta bytes and header UIDs, without decoding.

The SCP (``node.net.scp``) and the push tool (``node.tools.push``) handle every image's
bytes but need only its File Meta group and a few header UIDs; building and validating
pydicom Datasets for the File Meta group and parsing whole headers is work they would pay
per image (measured in bench/RESULTS.md, "What changed, and what each change bought",
Ingest: header read, File Meta). These helpers read only what they need, still with
pydicom's reader.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from typing import BinaryIO

from pydicom.filereader import data_element_generator, read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.values import convert_UI
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from node.core.errors import MalformedDataset

PREAMBLE = b"\x00" * 128 + b"DICM"
_SOP_CLASS_UID_TAG = 0x00080016
_SOP_INSTANCE_UID_TAG = 0x00080018
_DEFLATED_HEADER_LIMIT = 2**20  # inflate at most this much of a deflated data set's start


_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def encoded_element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element in Explicit VR Little Endian, padded to even length."""
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    group, element = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta group for a received data set.

    Byte for byte what pynetdicom's ``Event.encoded_dataset()`` puts in front of the data
    set (``create_file_meta`` + pydicom's writer), without building and validating a pydicom
    Dataset per image. The caller has checked that the UIDs are valid.
    """
    body = b"".join(
        (
            encoded_element(0x00020001, "OB", b"\x00\x01"),
            encoded_element(0x00020002, "UI", sop_class.encode("ascii")),
            encoded_element(0x00020003, "UI", sop_instance.encode("ascii")),
            encoded_element(0x00020010, "UI", transfer_syntax.encode("ascii")),
            encoded_element(0x00020012, "UI", PYNETDICOM_IMPLEMENTATION_UID.encode("ascii")),
            encoded_element(0x00020013, "SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
        )
    )
    return file_meta_group(body)


def file_meta_group(body: bytes) -> bytes:
    """Preamble, ``DICM`` and a File Meta group of the encoded elements ``body``, behind
    their group length."""
    return PREAMBLE + encoded_element(0x00020000, "UL", struct.pack("<L", len(body))) + body


def _past_group_8(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag.group > 8)


def dataset_uids(fp: BinaryIO, transfer_syntax: str) -> tuple[str, str]:
    """(SOP Instance UID, SOP Class UID) of the encoded data set that starts at ``fp``'s
    position ("" where absent).

    Reads the elements in ``transfer_syntax`` up to the end of group 0008, long before the
    pixel data. Tags ascend in a data set, so an element at or below (0008,0018) that
    follows a higher one there is a repeated or misplaced SOP UID, which a full read would
    resolve otherwise (pydicom keeps the last): raises :class:`MalformedDataset`. ``fp``
    should share the caller's buffer (a ``BytesIO`` of ``bytes``, or the received
    ``BytesIO``): wrapping a 1 MB memoryview in a new BytesIO would copy it. Raises what
    pydicom's reader raises on malformed bytes (``ValueError``, ``EOFError``,
    ``struct.error``, ...) and ``zlib.error``.
    """
    syntax = UID(transfer_syntax)
    if syntax.is_deflated:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        fp = BytesIO(inflate.decompress(fp.read(), _DEFLATED_HEADER_LIMIT))
    found: dict[int, str] = {}
    highest = 0
    elements = data_element_generator(
        fp, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=_past_group_8
    )
    for elem in elements:
        tag = elem.tag
        if tag <= min(highest, _SOP_INSTANCE_UID_TAG):
            raise MalformedDataset(f"{Tag(tag)} after {Tag(highest)}: repeated or out of order")
        highest = max(highest, tag)
        if tag in (_SOP_CLASS_UID_TAG, _SOP_INSTANCE_UID_TAG):
            found[tag] = str(convert_UI(elem.value or b"", syntax.is_little_endian))
    return found.get(_SOP_INSTANCE_UID_TAG, ""), found.get(_SOP_CLASS_UID_TAG, "")


def _not_group_2(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag.group != 2)


def split_part10(data: bytes) -> tuple[str, str, str, int] | None:
    """(SOP Class UID, SOP Instance UID, transfer syntax, data set offset) of a DICOM file,
    from its File Meta group and the first elements of its data set only.

    ``None`` where that is not enough: no preamble/``DICM`` (ACR-NEMA), no transfer syntax,
    no SOP UIDs in the data set, or bytes pydicom cannot read; the caller then reads the
    file the thorough way (``node.dicom.dicomio.split_encoded``), which also names the problem.
    """
    if data[128:132] != b"DICM":
        return None
    fp = BytesIO(data)
    fp.seek(132)
    try:
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_group_2)
        syntax = str(meta.get("TransferSyntaxUID", ""))
        offset = fp.tell()
        uid, cls = dataset_uids(fp, syntax) if syntax else ("", "")
    except (
        ValueError,
        EOFError,
        KeyError,
        TypeError,
        OverflowError,
        struct.error,
        zlib.error,
        MalformedDataset,
    ):
        return None
    return (cls, uid, syntax, offset) if uid and cls else None
