"""Reading DICOM bytes and files into datasets, including old ACR-NEMA files."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset as _read_group
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.core.errors import PreprocessError


def _encoding_uid(ds: Dataset) -> UID:
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def ensure_file_meta(ds: Dataset) -> Dataset:
    """Give a dataset read without File Meta (ACR-NEMA style) the meta it implies."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = _encoding_uid(ds)
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def read_dataset(
    source: Path | bytes, *, stop_before_pixels: bool = False, where: str | None = None
) -> Dataset:
    """Read a DICOM file or byte string (with or without preamble and File Meta).

    ``where`` names the source in error messages (default: the path, or "<received bytes>").
    """
    if where is None:
        where = str(source) if isinstance(source, Path) else "<received bytes>"
    try:
        fp = BytesIO(source) if isinstance(source, bytes) else source
        ds = pydicom.dcmread(fp, force=True, stop_before_pixels=stop_before_pixels)
    except (
        InvalidDicomError,
        OSError,
        ValueError,
        EOFError,
        KeyError,
        TypeError,
    ) as exc:
        raise PreprocessError(f"{where}: not a readable DICOM dataset: {exc}") from exc
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        raise PreprocessError(f"{where}: not a DICOM composite object (no SOP Class/Instance UID)")
    return ensure_file_meta(ds)


def read_uids(path: Path) -> tuple[str, str]:
    """(SOP Instance UID, SOP Class UID) of a DICOM file."""
    ds = read_dataset(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.SOPClassUID)


@dataclass(frozen=True)
class Encoded:
    """A DICOM object as received or read: its identity and its data set bytes as encoded."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes  # the bytes after the File Meta group (the whole file for ACR-NEMA)


def _not_group_2(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag.group != 2)


def split_encoded(data: bytes, where: str) -> Encoded:
    """Read a file's header only and locate its data set; raises :class:`PreprocessError`."""
    header = read_dataset(data, stop_before_pixels=True, where=where)
    offset = 0
    if data[128:132] == b"DICM":
        fp = BytesIO(data)
        fp.seek(132)
        _read_group(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_group_2)
        offset = fp.tell()
    return Encoded(
        str(header.SOPClassUID),
        str(header.SOPInstanceUID),
        str(header.file_meta.TransferSyntaxUID),
        data[offset:],
    )


def uncompressed(e: Encoded) -> Encoded:
    """``e`` decompressed to Explicit VR Little Endian (YBR colour as RGB), for a peer that
    refuses its compressed transfer syntax; raises :class:`PreprocessError`."""
    from node.dicom.wire import file_meta_bytes

    where = f"{e.sop_instance_uid} ({UID(e.transfer_syntax).name})"
    meta = file_meta_bytes(e.sop_class_uid, e.sop_instance_uid, e.transfer_syntax)
    ds = read_dataset(meta + e.dataset, where=where)
    try:
        ds.decompress(as_rgb=True, generate_instance_uid=False)  # the same object
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise PreprocessError(f"{where}: cannot decompress: {exc}") from exc
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return split_encoded(buf.getvalue(), where)
