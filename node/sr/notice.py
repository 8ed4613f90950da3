"""The not-analysed notice (pure): a small SR, in the source image's study, saying that the
AI did not analyse the image and why, so that an absent result is never read as a normal
one. Sent for a routed image the worker skips (a lateral view, not a chest), fails (cannot
be decoded) or quarantines; never for what is not an image of ``filter.modalities`` (an SR
routed back to the node, a CT slice), nor for what the SCP refused (it was not accepted).
"""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.dicom.uids import notice_instance_uid, notice_series_uid
from node.sr.codes import NOT_ANALYZED, NOT_ANALYZED_TITLE
from node.sr.report import (
    Identity,
    ReportContext,
    Stamp,
    escaped,
    library_errors,
    observation_context,
    sanitized_source,
    stamped_document,
)
from node.sr.srtemplate import EncodedSR, encode_dataset

NOTICE_SERIES_NUMBER = 9903
NOTICE_SERIES_DESCRIPTION = "AI CXR: images not analysed, no AI result"
MAX_REASON = 1024
"""Characters of the reason kept in the notice (non-printable ones written as \\xNN)."""

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def notice_identity(source: Dataset, ctx: ReportContext) -> Identity:
    """The notice's clean source header and deterministic UIDs (derived otherwise than the
    findings SR's: one image never has both under one UID)."""
    clean, _ = sanitized_source(source)
    return Identity(
        clean,
        notice_instance_uid(ctx.uid_root, clean.SOPInstanceUID),
        notice_series_uid(ctx.uid_root, clean.StudyInstanceUID),
    )


def notice_content(ident: Identity, reason: str, ctx: ReportContext) -> hd.sr.ContentSequence:
    """The notice's content tree: the node as observer, the reason, the source image."""
    root = hd.sr.ContainerContentItem(NOT_ANALYZED_TITLE)
    items = hd.sr.ContentSequence()
    items.extend(hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    items.extend(observation_context(ctx))
    items.append(hd.sr.TextContentItem(NOT_ANALYZED, reason, relationship_type=_CONTAINS))
    src = ident.clean
    items.append(
        hd.sr.ImageContentItem(
            codes.DCM.SourceImage,
            str(src.SOPClassUID),
            str(src.SOPInstanceUID),
            relationship_type=_CONTAINS,
        )
    )
    root.ContentSequence = items
    return hd.sr.ContentSequence([root], is_root=True)


def build_notice(source: Dataset, reason: str, ctx: ReportContext, now: datetime) -> EncodedSR:
    """The encoded notice for ``source``; raises :class:`node.core.errors.ReportError`."""
    text = escaped(reason, MAX_REASON)
    with library_errors(source.get("SOPInstanceUID", "a source")):
        ident = notice_identity(source, ctx)
        stamp = Stamp(
            now,
            NOTICE_SERIES_NUMBER,
            NOTICE_SERIES_DESCRIPTION,
            (ctx.software_version,),
            texts=(text,),
        )
        sr = stamped_document(ident, notice_content(ident, text, ctx), ctx, stamp)
        return EncodedSR(encode_dataset(sr), ident.sop_instance_uid, ident.series_instance_uid)
