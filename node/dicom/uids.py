"""Deterministic, always-valid DICOM UIDs (pure).

Result UIDs are derived from the source and the model, so that processing the same
image twice with the same weights yields the same SR UID: the PACS keeps one SR.
"""

from __future__ import annotations

import re

from pydicom.uid import RE_VALID_UID, UID, generate_uid

_SAFE_UID = re.compile(r"[0-9.]{1,64}")


def is_valid_uid(value: str) -> bool:
    """True when ``value`` follows the DICOM UI grammar (<= 64 chars, no leading zeros,
    no empty component): pydicom's ``UID.is_valid`` rule, without constructing a ``UID``
    (which warns and logs for every invalid value)."""
    return len(value) <= 64 and bool(re.fullmatch(RE_VALID_UID, value))


def is_safe_uid(value: str) -> bool:
    """True when ``value`` may name an object here, conformant or not: 1 to 64 digits and
    dots (real devices send UIDs with a leading zero, e.g. ``999.999.01.23.45.6789``);
    safe in a file name, a log line and the SR that references it."""
    return bool(_SAFE_UID.fullmatch(value))


def derive_uid(root: str, *parts: str) -> UID:
    """A UID under ``root`` that depends only on ``parts`` (SHA-512 based, pydicom)."""
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    uid = generate_uid(prefix=root, entropy_srcs=[*parts])
    if not is_valid_uid(uid):  # pragma: no cover - generate_uid guarantees it
        raise ValueError(f"derived an invalid UID {uid!r} from root {root!r}")
    return uid


def sr_instance_uid(root: str, source_sop_uid: str, model_id: str, weights_sha256: str) -> UID:
    return derive_uid(root, "sr-instance", source_sop_uid, model_id, weights_sha256)


def sr_series_uid(root: str, study_uid: str, model_id: str) -> UID:
    return derive_uid(root, "sr-series", study_uid, model_id)


def notice_instance_uid(root: str, source_sop_uid: str) -> UID:
    """The not-analysed notice of one source image (whatever the model: it has no result)."""
    return derive_uid(root, "not-analysed-instance", source_sop_uid)


def notice_series_uid(root: str, study_uid: str) -> UID:
    return derive_uid(root, "not-analysed-series", study_uid)


def summary_instance_uid(root: str, source_sop_uid: str, model_id: str, weights_sha256: str) -> UID:
    return derive_uid(root, "summary-instance", source_sop_uid, model_id, weights_sha256)


def summary_series_uid(root: str, study_uid: str, model_id: str) -> UID:
    return derive_uid(root, "summary-series", study_uid, model_id)
