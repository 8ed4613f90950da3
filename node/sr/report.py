"""Build the DICOM SR (TID 1500 Measurement Report, Comprehensive 3D SR) — pure.

Inputs are values (source header, findings, model identity, UIDs root, clock); the output
is a ``pydicom`` dataset. Nothing here touches the disk or the network.
"""

from __future__ import annotations

import copy
import logging
import struct
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, SecondaryCaptureImageStorage
from pydicom.valuerep import DA, validate_value

from node import __version__
from node.analysis.model import Finding, ModelInfo
from node.core.errors import ReportError
from node.dicom.uids import derive_uid, is_safe_uid, is_valid_uid, sr_instance_uid, sr_series_uid
from node.sr.codes import (
    ABOVE_THRESHOLD,
    ABSENT,
    CHEST_XRAY,
    PRESENT,
    PROBABILITY_UNIT,
    SUMMARY_IMAGE,
    UNTRAINED_MODEL,
    finding_name,
    local_scheme_item,
    pathology_code,
)

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
UTF8 = "ISO_IR 192"
SR_SERIES_DESCRIPTION = "AI CXR findings (torchxrayvision), not for diagnosis"

# Attributes of the source that the SR copies (Patient, General Study, Patient Study).
# Each is checked against its VR; an invalid value is dropped (Type 2 become empty).
_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
)
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
_REQUIRED_UIDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
)
_SEX = {"M", "F", "O"}
# What the SR's header takes from the source (highdicom copies them, _stamp the age).
FROM_SOURCE = (*_TYPE2, "PatientAge", "StudyInstanceUID")


@dataclass(frozen=True)
class ReportContext:
    """Who writes the report: the node's identity and its UID root."""

    uid_root: str
    device_name: str
    manufacturer: str = "cxr-node"
    institution_name: str | None = None
    software_version: str = __version__


def sr_charset(clean: Dataset, ctx: ReportContext) -> str | None:
    """The SR's Specific Character Set: UTF-8 where a copied or configured text is not
    ASCII (pydicom has decoded the source's values from its own character set, and UTF-8
    holds them all), else none, the default repertoire that every PACS reads."""
    texts = [str(v) for k in FROM_SOURCE for v in _values(clean.get(k))]
    texts += [ctx.manufacturer, ctx.institution_name or ""]
    return None if all(text.isascii() for text in texts) else UTF8


def _values(value: object) -> list[object]:
    """Each value of a single- or multi-valued element (``str`` of a MultiValue would
    escape some characters, e.g. U+3000, as ASCII)."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]


def _problem(keyword: str, value: object) -> str | None:
    """Why ``value`` may not be copied into the SR as ``keyword``, or None when it may."""
    if dictionary_VM(keyword) == "1" and isinstance(value, MultiValue):
        return f"{len(value)} values where one is allowed"
    text = str(value)
    vr = dictionary_VR(keyword)
    if vr == "UI":  # referenced as it is where merely non-conformant (``identify`` warns)
        return None if is_safe_uid(text) else "not a UID"
    try:
        validate_value(vr, text, config.RAISE)  # length, characters, format of the VR
    except ValueError as exc:
        return str(exc)
    return _stricter(keyword, vr, text)


def _stricter(keyword: str, vr: str, text: str) -> str | None:
    """What pydicom lets pass but an SR's attribute must not have: a control character,
    a date or time range (a query's form), an impossible date, more than 5 name
    components, an undefined sex."""
    if any(unicodedata.category(c) == "Cc" for c in text):
        return "a control character"
    if vr in ("DA", "TM") and "-" in text:
        return f"a range is no {vr} value of an instance"
    if vr == "DA":
        try:
            DA(text)
        except ValueError as exc:
            return str(exc)
    if vr == "PN" and any(group.count("^") > 4 for group in text.split("=")):
        return "more than 5 components in a name"
    if keyword == "PatientSex" and text not in _SEX:
        return "not one of M, F, O"
    return None


def escaped(text: str, limit: int = 80) -> str:
    """``text`` fit for a log line: non-printable characters as \\xNN (\\uNNNN above
    U+00FF), cut at ``limit`` characters."""
    out = "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
        for c in text[:limit]
    )
    return out + ("..." if len(text) > limit else "")


@dataclass(frozen=True)
class Dropped:
    """A source attribute not copied into the SR, and why."""

    keyword: str
    value: str
    reason: str


def sanitized_source(source: Dataset) -> tuple[Dataset, tuple[Dropped, ...]]:
    """Copy the attributes the SR needs from ``source``, dropping invalid ones (pure).

    Each is checked against its VR and VM (pydicom's validation, and the stricter rules
    of ``_stricter``); Type 2 attributes that are absent or invalid are present and empty
    in the result. Returns the clean header and what was dropped.
    """
    clean = Dataset()
    for keyword in _TYPE2:
        setattr(clean, keyword, None)
    dropped: list[Dropped] = []
    for keyword in _COPIED:
        value = source.get(keyword)
        if value is None or value == "":
            continue
        problem = _problem(keyword, value)
        if problem is None:
            setattr(clean, keyword, value)
        else:
            dropped.append(Dropped(keyword, str(value), problem))
    missing = [k for k in _REQUIRED_UIDS if k not in clean]
    if missing:
        raise ReportError(f"source lacks a valid {', '.join(missing)}: cannot reference it")
    return clean, tuple(dropped)


MAX_SHOWN_TEXT = 30
"""Text values up to this length are shown whole by ``dsrdump`` (longer ones are cut)."""


def tracking_uid(root: str, sr_uid: str, label: str) -> UID:
    """The tracking UID of one finding's measurement group in the SR ``sr_uid``."""
    return derive_uid(root, "tracking", sr_uid, label)


def algorithm_name(model: ModelInfo) -> str:
    """The SR's Algorithm Name: the weights' name, or for a model that is not the published
    one ``UNTRAINED`` and the architecture, short enough to be shown whole (the weights'
    full name is a parameter)."""
    if model.trained:
        return model.weights
    return f"UNTRAINED {model.weights.split('-')[0]}"


def summary_text(findings: Sequence[Finding]) -> str:
    """The findings at or above the operating threshold, highest score first, with their
    scores (``Consolidation (Lung consolidation) 0.83, Cardiomegaly 0.61``), or ``none``."""
    above = sorted((f for f in findings if f.present), key=lambda f: -f.score)
    return ", ".join(f"{finding_name(f.pathology)} {f.score:.2f}" for f in above) or "none"


def headline_items(findings: Sequence[Finding], model: ModelInfo) -> list[hd.sr.TextContentItem]:
    """The TEXT items the SR opens with (after its context): the UNTRAINED warning where it
    applies, and the findings above the operating threshold."""
    items = [] if model.trained else [_text(UNTRAINED_MODEL, UNTRAINED_VALUE)]
    return [*items, _text(ABOVE_THRESHOLD, summary_text(findings))]


@dataclass(frozen=True)
class ImageRef:
    """An image of the SR's study that the SR references (its summary image)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str

    def evidence(self, study_uid: str) -> Dataset:
        """The image as highdicom takes evidence: the four UIDs of a dataset."""
        ds = Dataset()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


def summary_item(summary: ImageRef) -> hd.sr.ImageContentItem:
    """The reference to the summary image, after the headline: a viewer that lists an SR's
    images offers it, and a reader learns its UID."""
    return hd.sr.ImageContentItem(
        SUMMARY_IMAGE,
        summary.sop_class_uid,
        summary.sop_instance_uid,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name, value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


UNTRAINED_VALUE = "NOT FOR CLINICAL USE"


def _algorithm(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=algorithm_name(model),
        version=f"torchxrayvision {model.library_version}",
        parameters=[
            f"weights={model.weights}",
            f"weights_sha256={model.weights_sha256}",
        ],
    )


def _finding_group(
    source: Dataset, finding: Finding, model: ModelInfo, uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One finding's measurement group (TID 1501): its score and its Present/Absent side by
    side, named by the model's label (tracking identifier) and the coded concept."""
    code = pathology_code(finding.pathology)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=finding.pathology),
        finding_type=code,
        algorithm_id=_algorithm(model),
        measurements=[
            hd.sr.Measurement(name=code, value=round(finding.score, 6), unit=PROBABILITY_UNIT)
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(code, PRESENT if finding.present else ABSENT)
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
        ],
    )


@dataclass(frozen=True)
class Identity:
    """The SR's clean source header and its deterministic UIDs."""

    clean: Dataset
    sop_instance_uid: str
    series_instance_uid: str


def identify(source: Dataset, model: ModelInfo, ctx: ReportContext) -> Identity:
    """Sanitize the source header and derive the SR's UIDs; raises :class:`ReportError`."""
    clean, dropped = sanitized_source(source)
    _log_source_problems(clean, dropped)
    sop_uid = sr_instance_uid(
        ctx.uid_root, clean.SOPInstanceUID, model.model_id, model.weights_sha256
    )
    return Identity(
        clean,
        sop_uid,
        sr_series_uid(ctx.uid_root, clean.StudyInstanceUID, model.model_id),
    )


def _log_source_problems(clean: Dataset, dropped: Sequence[Dropped]) -> None:
    for item in dropped:
        log.warning(
            "source %s: %s '%s' not copied to the SR: %s",
            clean.SOPInstanceUID,
            item.keyword,
            escaped(item.value),
            escaped(item.reason, 160),
        )
    for keyword in _REQUIRED_UIDS:
        if not is_valid_uid(str(clean[keyword].value)):
            log.warning(
                "source %s: %s %s is not a conformant UID (a leading zero or an empty "
                "component): referenced as it is",
                clean.SOPInstanceUID,
                keyword,
                clean[keyword].value,
            )


def content_tree(
    ident: Identity,
    findings: Sequence[Finding],
    model: ModelInfo,
    ctx: ReportContext,
    summary: ImageRef | None = None,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree for one image's findings: the headline first (and the
    reference to the ``summary`` image), then one measurement group per finding."""
    groups = [
        _finding_group(
            ident.clean, f, model, tracking_uid(ctx.uid_root, ident.sop_instance_uid, f.pathology)
        )
        for f in findings
    ]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(ctx),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=groups,
    )
    image = [] if summary is None else [summary_item(summary)]
    _insert_before_measurements(report, [*headline_items(findings, model), *image])
    return report


def _insert_before_measurements(
    report: hd.sr.MeasurementReport, items: Sequence[hd.sr.ContentItem]
) -> None:
    """Put ``items`` in the report's root, before its Imaging Measurements (TID 1500 is
    extensible): a reader meets them first."""
    content = report[0].ContentSequence
    at = len(content) - 1  # highdicom appends the Imaging Measurements container last
    for offset, item in enumerate(items):
        content.insert(at + offset, item)


def observation_context(ctx: ReportContext) -> hd.sr.ObservationContext:
    """The node as the observing device."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid(ctx.uid_root, "device", ctx.device_name),
            name=ctx.device_name,
            manufacturer_name=ctx.manufacturer,
            model_name=f"cxr-node {ctx.software_version}",
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


Content = hd.sr.ContentItem | hd.sr.MeasurementReport | hd.sr.ContentSequence
"""What an SR document is built around: a findings report, or a notice's content tree."""


@dataclass(frozen=True)
class Stamp:
    """What an SR says of itself beyond its content: when it was made, its series'
    description, the software that made it, texts of its own (they decide its character set)."""

    now: datetime
    series_number: int
    series_description: str
    software_versions: tuple[str, ...]
    texts: tuple[str, ...] = ()


def findings_stamp(model: ModelInfo, ctx: ReportContext, now: datetime) -> Stamp:
    suffix = "" if model.trained else " [UNTRAINED]"
    return Stamp(
        now,
        SR_SERIES_NUMBER,
        f"{SR_SERIES_DESCRIPTION}{suffix}",
        (ctx.software_version, f"torchxrayvision {model.library_version}"),
    )


def document(
    ident: Identity,
    content: hd.sr.ContentItem | hd.sr.MeasurementReport,
    model: ModelInfo,
    ctx: ReportContext,
    now: datetime,
    summary: ImageRef | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR document around ``content`` (which references ``summary`` where given);
    raises :class:`ReportError`."""
    others = () if summary is None else (summary.evidence(ident.clean.StudyInstanceUID),)
    return stamped_document(ident, content, ctx, findings_stamp(model, ctx, now), others)


def stamped_document(
    ident: Identity,
    content: Content,
    ctx: ReportContext,
    stamp: Stamp,
    others: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """An SR document (of findings or of a notice) around ``content``, with the images of
    ``others`` (which ``content`` references) in its evidence after the source; raises
    :class:`ReportError`."""
    with library_errors(ident.clean.SOPInstanceUID):
        try:
            sr = _comprehensive(ident, [ident.clean, *others], content, ctx, stamp)
        except KeyError as exc:
            if exc.args != (ident.clean.SOPClassUID,):
                raise
            sr = _with_stand_in_class(ident, content, ctx, stamp, others)
        _stamp(sr, ident.clean, ctx, stamp)
    return sr


def _comprehensive(
    ident: Identity,
    evidence: Sequence[Dataset],
    content: Content,
    ctx: ReportContext,
    stamp: Stamp,
) -> hd.sr.Comprehensive3DSR:
    own_texts = all(text.isascii() for text in stamp.texts)
    return hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=content,
        series_instance_uid=ident.series_instance_uid,
        series_number=stamp.series_number,
        sop_instance_uid=ident.sop_instance_uid,
        instance_number=1,
        manufacturer=ctx.manufacturer,
        institution_name=ctx.institution_name,
        specific_character_set=sr_charset(ident.clean, ctx) if own_texts else UTF8,
        is_complete=False,
        is_final=False,
        is_verified=False,
    )


def class_name(sop_class: str) -> str:
    """A SOP class UID's name for messages, "(Retired)" where it is ("unknown" where
    pydicom does not know it)."""
    uid = UID(sop_class)
    if uid.name == uid:
        return "unknown"
    return f"{uid.name} (Retired)" if uid.is_retired else uid.name


def _with_stand_in_class(
    ident: Identity,
    content: Content,
    ctx: ReportContext,
    stamp: Stamp,
    others: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR of a source whose SOP class highdicom does not know (it looks up the class's
    IOD to copy the Patient and General Study modules, the same in every image IOD): built
    from the source under Secondary Capture's class, then the evidence names its own."""
    clean = ident.clean
    sop_class = str(clean.SOPClassUID)
    log.warning(
        "source %s: SOP class %s (%s) is unknown to highdicom: patient and study copied "
        "as for Secondary Capture",
        clean.SOPInstanceUID,
        sop_class,
        class_name(sop_class),
    )
    stand_in = copy.deepcopy(clean)
    stand_in.SOPClassUID = SecondaryCaptureImageStorage
    try:
        sr = _comprehensive(ident, [stand_in, *others], content, ctx, stamp)
    except KeyError as exc:
        raise ReportError(
            f"cannot reference the source: SOP class {sop_class} ({class_name(sop_class)}) "
            "is not supported by highdicom"
        ) from exc
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            for ref in series.ReferencedSOPSequence:
                if ref.ReferencedSOPInstanceUID == clean.SOPInstanceUID:
                    ref.ReferencedSOPClassUID = sop_class
    return sr


_LIBRARY_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, struct.error)
"""What highdicom and pydicom raise on values they refuse."""


@contextmanager
def library_errors(source_sop_uid: object) -> Iterator[None]:
    """Turn highdicom's and pydicom's exceptions into :class:`ReportError`, with the reason."""
    try:
        yield
    except _LIBRARY_ERRORS as exc:
        raise ReportError(
            f"cannot build the SR of {source_sop_uid}: {type(exc).__name__}: {exc}"
        ) from exc


def build_sr(
    source: Dataset,
    findings: Sequence[Finding],
    model: ModelInfo,
    ctx: ReportContext,
    now: datetime,
    summary: ImageRef | None = None,
) -> Dataset:
    """Build the SR for one classified image (referencing its ``summary`` image where
    given); raises :class:`ReportError`.

    This is the reference construction, entirely by highdicom; :mod:`node.sr.srtemplate`
    encodes the same document faster and is checked against this function.
    """
    if not findings:
        raise ReportError("no findings to report")
    with library_errors(source.get("SOPInstanceUID", "a source")):
        ident = identify(source, model, ctx)
        check_summary(ident, summary)
        content = content_tree(ident, findings, model, ctx, summary)
        return document(ident, content, model, ctx, now, summary)


def check_summary(ident: Identity, summary: ImageRef | None) -> None:
    """Raise :class:`ReportError` if ``summary`` claims the source's or the SR's own SOP
    Instance UID: one UID cannot name two instances in the SR's evidence."""
    if summary is None:
        return
    if summary.sop_instance_uid in (str(ident.clean.SOPInstanceUID), ident.sop_instance_uid):
        raise ReportError(
            f"the summary image's SOP Instance UID {summary.sop_instance_uid} is that of "
            "the source image or of its SR"
        )


def datetime_value(now: datetime) -> str:
    """``now`` as the SR's DT values (each contribution's date-time) give it."""
    return now.strftime("%Y%m%d%H%M%S")


def clock_attributes(now: datetime) -> dict[str, str]:
    """The SR's dates and times, all of them ``now``."""
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    return {
        "ContentDate": date,
        "ContentTime": time,
        "SeriesDate": date,
        "SeriesTime": time,
        "InstanceCreationDate": date,
        "InstanceCreationTime": time,
    }


def _stamp(sr: Dataset, clean: Dataset, ctx: ReportContext, stamp: Stamp) -> None:
    """Set the clock-dependent and descriptive attributes highdicom leaves to us."""
    for keyword, value in clock_attributes(stamp.now).items():
        setattr(sr, keyword, value)
    for item in sr.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = datetime_value(stamp.now)  # highdicom's is its own clock's
    sr.SeriesDescription = stamp.series_description
    sr.SoftwareVersions = list(stamp.software_versions)
    sr.ManufacturerModelName = "cxr-node"
    if "PatientAge" in clean:
        sr.PatientAge = clean.PatientAge
    sr.CodingSchemeIdentificationSequence = [local_scheme_item()]
