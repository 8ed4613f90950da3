"""What the push tool checks about an encoded object before it sends it.

Files that a peer aborts the association on, or never answers, cost a reconnect or a whole
DIMSE timeout each: an empty or malformed SOP UID, a value of odd length (highdicom's
``dx_image.dcm`` has odd-length Pixel Data), a truncated file. These checks find them from
the identity and the top-level element headers, with pydicom's reader; values (Pixel Data
included) are skipped, not read, so their cost does not grow with the image.
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.datadict import dictionary_description
from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from pydicom.uid import UID

from node.dicom.dicomio import Encoded

UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_UID_LENGTH = 64
_UID_CHARACTERS = frozenset("0123456789.")
_SKIP_VALUES_FROM = 256  # bytes: longer values are skipped over, not read


def problem(encoded: Encoded) -> str:
    """Why ``encoded`` must not be sent ("" when nothing was found)."""
    for what, uid in (
        ("SOP Class UID", encoded.sop_class_uid),
        ("SOP Instance UID", encoded.sop_instance_uid),
    ):
        if why := uid_problem(uid):
            return f"invalid {what} {uid!r} ({why})"
    return structure_problem(encoded.dataset, encoded.transfer_syntax)


def uid_problem(uid: str) -> str:
    """Why ``uid`` cannot go on the wire ("" when it can).

    A conformant UID (pydicom's ``UID.is_valid``) goes; so does one that is merely safe,
    1 to 64 digits and dots (``999.999.01.23``: a component with a leading zero is not
    conformant, but peers take it and it is the file's identity, so it is sent as it is).
    """
    if UID(uid).is_valid:
        return ""
    if not uid:
        return "empty"
    if len(uid) > MAX_UID_LENGTH:
        return f"{len(uid)} characters, over {MAX_UID_LENGTH}"
    if not set(uid) <= _UID_CHARACTERS:
        return "characters other than digits and dots"
    return ""


def structure_problem(dataset: bytes, transfer_syntax: str) -> str:
    """Why the encoded data set's top-level elements cannot all be right ("" when they can
    be): a value of odd length, a value that runs past the end (a truncated file), an
    undefined-length value without its delimiter, or an odd number of bytes in all
    (an odd-length value deeper down). Deflated and unknown syntaxes are not checked."""
    syntax = UID(transfer_syntax)
    if syntax.is_deflated or not syntax.is_transfer_syntax:
        return ""
    end = len(dataset)
    fp = BytesIO(dataset)
    elements = data_element_generator(
        fp, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=_SKIP_VALUES_FROM
    )
    try:
        for elem in elements:
            if not isinstance(elem, RawDataElement) or elem.length == UNDEFINED_LENGTH:
                continue  # a sequence or undefined length: read through its delimiter
            if elem.value_tell + elem.length > end:
                left = end - elem.value_tell
                return f"{_named(elem.tag)} declares {elem.length} bytes, {left} left: truncated"
            if elem.length % 2:
                return f"{_named(elem.tag)} has an odd length ({elem.length} bytes)"
    except (EOFError, ValueError, KeyError, TypeError, OverflowError, struct.error) as exc:
        return f"malformed data set: {exc}"
    if end % 2:
        return f"the data set has an odd number of bytes ({end}): an element has an odd length"
    return ""


def _named(tag: BaseTag) -> str:
    try:
        return f"{tag} {dictionary_description(tag)}"
    except KeyError:
        return str(tag)
