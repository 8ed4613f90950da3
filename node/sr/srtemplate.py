"""Encode the SR of :func:`node.sr.report.build_sr` from a template of it (pure).

Building the whole document with highdicom costs more than the model itself (the
constructor deep-copies and re-walks the 600-element content tree, then pydicom writes it;
``python -m bench inference`` measures both ways). Yet from one image to the next the
content tree differs only in a few values. So highdicom builds the content tree once, for a
sentinel image, and pydicom encodes it once, with undefined-length sequences and items (so
that no enclosing length depends on a value). For each image:

* the document header (patient, study, evidence, flags) is highdicom's, built around a
  one-item stub of the content tree for the first source of each kind (SOP class,
  character set and which patient/study values it has) and encoded once with this image's
  values left out; every image of that kind encodes only its own values into it;
* the encoded content tree is reused with its variable elements (the source image
  reference, tracking identifier and UID, each score as DS and FD, each present/absent
  code, and the reference to the summary image or nothing) re-encoded from this image's
  values.

The result decodes to the same dataset as ``build_sr`` (a unit test compares them on
generated inputs), and :class:`ReportEncoder` checks that for a mixed example before its
first SR, then for the first source of each header kind: should a highdicom or pydicom
upgrade, or a kind of source nobody tried, break the equivalence, it logs a warning and
builds those SRs (all of them, if the first check fails) with ``build_sr``.
``report.fast_encoder = false`` builds every SR with ``build_sr``.
"""

from __future__ import annotations

import copy
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import Any

import highdicom as hd
import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import SecondaryCaptureImageStorage
from pydicom.valuerep import DS

from node.analysis.model import Finding, ModelInfo
from node.core.errors import ReportError
from node.dicom.wire import encoded_element, file_meta_group
from node.sr.codes import ABSENT, PRESENT, SUMMARY_IMAGE
from node.sr.report import (
    FROM_SOURCE,
    Identity,
    ImageRef,
    ReportContext,
    build_sr,
    check_summary,
    clock_attributes,
    content_tree,
    datetime_value,
    document,
    escaped,
    identify,
    library_errors,
    sr_charset,
    summary_text,
    tracking_uid,
)

log = logging.getLogger(__name__)

_CONTENT_SEQUENCE = Tag("ContentSequence")
_REF_CLASS = Tag("ReferencedSOPClassUID")
_REF_INSTANCE = Tag("ReferencedSOPInstanceUID")
_UID_VALUE = Tag("UID")
_TEXT_VALUE = Tag("TextValue")
_NUMERIC = Tag("NumericValue")
_FLOAT = Tag("FloatingPointValue")
_CONCEPT_CODE = Tag("ConceptCodeSequence")
_SOP_INSTANCE = Tag("SOPInstanceUID")
_SERIES = Tag("SeriesInstanceUID")
_STUDY = Tag("StudyInstanceUID")
_MEDIA_INSTANCE = Tag("MediaStorageSOPInstanceUID")
_EVIDENCE = Tag("CurrentRequestedProcedureEvidenceSequence")
_REF_SERIES = Tag("ReferencedSeriesSequence")
_REF_SOPS = Tag("ReferencedSOPSequence")
_EQUIPMENT = Tag("ContributingEquipmentSequence")
_CONTRIBUTED = Tag("ContributionDateTime")

# Sentinel values for the template image: valid, and unlike anything a scanner makes.
_SENTINEL_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
_SENTINEL_SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.99999999999992"
_SENTINEL_STUDY = "1.2.826.0.1.3680043.8.498.99999999999993"
_SENTINEL_SERIES = "1.2.826.0.1.3680043.8.498.99999999999994"
_SENTINEL_NOW = datetime(2000, 1, 1)
_SENTINEL_SUMMARY = ImageRef(
    SecondaryCaptureImageStorage,
    "1.2.826.0.1.3680043.8.498.99999999999995",
    "1.2.826.0.1.3680043.8.498.99999999999996",
)
_MAX_HEADERS = 64  # header shapes kept (SOP class x which patient/study values exist)


@dataclass(frozen=True)
class EncodedSR:
    """An SR ready to store or send: its Part 10 bytes and its UIDs."""

    data: bytes
    sop_instance_uid: str
    series_instance_uid: str


def encode_dataset(ds: Dataset) -> bytes:
    """A dataset as DICOM Part 10 bytes (pydicom's writer)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


_Parts = tuple[bytes | BaseTag, ...]  # encoded bytes, and the tags of each image's values


def _split(ds: Dataset, slots: set[BaseTag], charset: Any) -> _Parts:
    """``ds`` encoded in tag order, each tag of ``slots`` (present or not) left as a slot
    and consecutive constant elements joined; group lengths are left out (the writer
    computes File Meta's and skips the retired ones, as pydicom's does)."""
    parts: list[bytes | BaseTag] = []
    for tag in sorted(set(ds.keys()) | slots):
        if tag.element == 0:
            continue
        if tag in slots:
            parts.append(tag)
        elif parts and isinstance(parts[-1], bytes):
            parts[-1] += _element_bytes(ds[tag], charset)
        else:
            parts.append(_element_bytes(ds[tag], charset))
    return tuple(parts)


def _join(parts: _Parts, values: dict[BaseTag, bytes]) -> bytes:
    return b"".join(p if isinstance(p, bytes) else values[p] for p in parts)


def _item(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _sequence(tag: BaseTag, items: Sequence[bytes]) -> bytes:
    """A sequence of defined length holding ``items`` (encoded item bodies)."""
    return encoded_element(tag, "SQ", b"".join(_item(body) for body in items))


def _ui(tag: BaseTag, uid: str) -> bytes:
    return encoded_element(tag, "UI", uid.encode("ascii"))


class _HeaderTemplate:
    """A cached header encoded once with each image's values left out, so that a header
    of the same kind costs only the encoding of those values, not building and writing a
    pydicom Dataset.

    Each image's values are those ``_stamp`` and highdicom take from the source and the
    clock: the source's patient and study attributes (``FROM_SOURCE``), the dates and
    times, the SR's own UIDs, the evidence sequence and each contribution's date-time.
    """

    def __init__(self, cached: Dataset) -> None:
        if any(" or " in elem.VR for elem in cached.iterall()):
            raise ReportError("SR header has ambiguous VRs")
        charset = _encodings(cached)
        self.charset = charset
        self.copied = tuple(k for k in FROM_SOURCE if k in cached)
        clock = tuple(clock_attributes(_SENTINEL_NOW))
        slots = {Tag(k) for k in (*self.copied, *clock, "SOPInstanceUID", "SeriesInstanceUID")}
        slots |= {_EVIDENCE} | ({_EQUIPMENT} if _EQUIPMENT in cached else set())
        self.meta = _split(cached.file_meta, {_MEDIA_INSTANCE}, charset)
        self.body = _split(cached, slots, charset)
        items = cached[_EQUIPMENT].value if _EQUIPMENT in cached else []
        self.contributions = tuple(_split(item, {_CONTRIBUTED}, charset) for item in items)

    def write(self, ident: Identity, now: datetime, summary: ImageRef | None) -> bytes:
        """The encoded header (Part 10 preamble and File Meta included) for one image."""
        meta = _join(self.meta, {_MEDIA_INSTANCE: _ui(_MEDIA_INSTANCE, ident.sop_instance_uid)})
        clean = ident.clean
        values = {
            Tag(k): encoded_element(Tag(k), dictionary_VR(k), v.encode("ascii"))
            for k, v in clock_attributes(now).items()
        }
        values[_SOP_INSTANCE] = _ui(_SOP_INSTANCE, ident.sop_instance_uid)
        values[_SERIES] = _ui(_SERIES, ident.series_instance_uid)
        for keyword in self.copied:
            values[Tag(keyword)] = _element_bytes(
                _element(keyword, clean.get(keyword)), self.charset
            )
        values[_EVIDENCE] = _sequence(_EVIDENCE, [_evidence(clean, summary)])
        if self.contributions:
            when = {_CONTRIBUTED: encoded_element(_CONTRIBUTED, "DT", datetime_value(now).encode())}
            values[_EQUIPMENT] = _sequence(_EQUIPMENT, [_join(c, when) for c in self.contributions])
        return file_meta_group(meta) + _join(self.body, values)


def _element_bytes(elem: DataElement, charset: Any = None) -> bytes:
    """One element (and what it holds) in Explicit VR Little Endian, by pydicom's writer."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, charset)
    return fp.getvalue()


def _score(value: float) -> float:
    return round(value, 6)


def _ds(value: float) -> bytes:
    return str(DS(value, auto_format=True)).encode()


def _fd(value: float) -> bytes:
    return struct.pack("<d", value)


def _undefined_lengths(elem: DataElement) -> None:
    """Mark a sequence, its items and every sequence below for undefined-length encoding."""
    elem.is_undefined_length = True
    for item in elem.value:
        item.is_undefined_length_sequence_item = True
        for child in item:
            if child.VR == "SQ":
                _undefined_lengths(child)


def _encodings(ds: Dataset) -> list[str]:
    """The Python codecs of ``ds``'s Specific Character Set, as pydicom's writer takes them."""
    return list(convert_encodings(ds.get("SpecificCharacterSet") or default_encoding))


def _encode_undefined(elem: DataElement, encodings: list[str]) -> bytes:
    """A copy of the sequence ``elem`` encoded with undefined lengths throughout."""
    elem = copy.deepcopy(elem)
    _undefined_lengths(elem)
    return _element_bytes(elem, encodings)


def _find_once(blob: bytes, needle: bytes, what: str) -> int:
    at = blob.find(needle)
    if at < 0 or blob.find(needle, at + 1) >= 0:
        raise ReportError(f"SR template: {what} is not found exactly once")
    return at


def _code_items(ds: Dataset, code_value: str) -> list[DataElement]:
    """The Concept Code Sequence elements below ``ds`` that hold ``code_value``."""
    found: list[DataElement] = []
    for elem in ds.iterall():
        if elem.tag == _CONCEPT_CODE and elem.value[0].CodeValue == code_value:
            found.append(elem)
    return found


@dataclass(frozen=True)
class _Slot:
    """A variable element in the encoded content: its byte span and what fills it."""

    start: int
    end: int
    kind: str
    index: int = 0


class _ContentTemplate:
    """The encoded content tree of a sentinel SR, and where each image's values go."""

    def __init__(self, model: ModelInfo, ctx: ReportContext) -> None:
        self.labels = tuple(model.pathologies)
        if not all(label.isascii() for label in self.labels):
            raise ReportError("SR template: the model's labels are not all ASCII")
        self.root = ctx.uid_root
        present = self._sentinel_sr(model, ctx, True)
        absent = self._sentinel_sr(model, ctx, False)
        self.present_code = self._code_bytes(present, PRESENT.value)
        self.absent_code = self._code_bytes(absent, ABSENT.value)
        blob = self._content_bytes(present)
        self.image = self._image_parts(present)
        summaries = [_summary(summary_text(self._sentinel_findings(p))) for p in (True, False)]
        same = blob.replace(summaries[0], summaries[1]).replace(self.present_code, self.absent_code)
        if same != self._content_bytes(absent):
            raise ReportError("SR template: present and absent documents differ elsewhere")
        sr_uid = identify(self._sentinel_source(), model, ctx).sop_instance_uid
        needles: list[tuple[bytes, str, int]] = [(summaries[0], "summary", 0)]
        needles.append((self._image(_SENTINEL_SUMMARY), "image", 0))
        for i, label in enumerate(self.labels):
            value = self._sentinel_score(i)
            needles.append((_ui(_UID_VALUE, tracking_uid(self.root, sr_uid, label)), "track", i))
            needles.append((encoded_element(_NUMERIC, "DS", _ds(value)), "ds", i))
            needles.append((encoded_element(_FLOAT, "FD", _fd(value)), "fd", i))
        slots = []
        for needle, kind, i in needles:
            at = _find_once(blob, needle, f"{kind} {i}")
            slots.append(_Slot(at, at + len(needle), kind, i))
        slots.extend(self._repeated(blob, self.present_code, "code"))
        slots.extend(self._repeated(blob, _ui(_REF_CLASS, _SENTINEL_SOP_CLASS), "class"))
        slots.extend(self._repeated(blob, _ui(_REF_INSTANCE, _SENTINEL_SOP_INSTANCE), "inst"))
        slots.sort(key=lambda s: s.start)
        self.slots = tuple(slots)
        self.segments = self._segments(blob, self.slots)

    def _repeated(self, blob: bytes, needle: bytes, kind: str) -> list[_Slot]:
        """One slot per finding for ``needle`` (its present/absent code, its group's source
        reference), in the findings' order."""
        start = 0
        found: list[_Slot] = []
        while (at := blob.find(needle, start)) >= 0:
            found.append(_Slot(at, at + len(needle), kind, len(found)))
            start = at + len(needle)
        if len(found) != len(self.labels):
            raise ReportError(f"SR template: one {kind} per finding expected")
        return found

    @staticmethod
    def _sentinel_score(i: int) -> float:
        return _score(0.123457 + 0.001013 * i)

    @staticmethod
    def _sentinel_source() -> Dataset:
        ds = Dataset()
        ds.SOPClassUID = _SENTINEL_SOP_CLASS
        ds.SOPInstanceUID = _SENTINEL_SOP_INSTANCE
        ds.StudyInstanceUID = _SENTINEL_STUDY
        ds.SeriesInstanceUID = _SENTINEL_SERIES
        return ds

    def _sentinel_findings(self, present: bool) -> list[Finding]:
        return [
            Finding(label, self._sentinel_score(i), 0.5, present)
            for i, label in enumerate(self.labels)
        ]

    def _sentinel_sr(self, model: ModelInfo, ctx: ReportContext, present: bool) -> Dataset:
        findings = self._sentinel_findings(present)
        source = self._sentinel_source()
        return build_sr(source, findings, model, ctx, _SENTINEL_NOW, _SENTINEL_SUMMARY)

    @staticmethod
    def _image_parts(sr: Dataset) -> tuple[bytes, bytes]:
        """The encoded content item that references the summary image, split where its
        Referenced SOP Instance UID goes (the element left out)."""
        items = [
            item
            for item in sr[_CONTENT_SEQUENCE].value
            if item.ValueType == "IMAGE"
            and item.ConceptNameCodeSequence[0].CodeValue == SUMMARY_IMAGE.value
        ]
        if len(items) != 1:
            raise ReportError("SR template: one summary image reference expected")
        elem = DataElement(_CONTENT_SEQUENCE, "SQ", DicomSequence(items))
        encoded = _encode_undefined(elem, _encodings(sr))[12:-8]  # the item alone
        needle = _ui(_REF_INSTANCE, _SENTINEL_SUMMARY.sop_instance_uid)
        at = _find_once(encoded, needle, "the summary image's UID")
        return encoded[:at], encoded[at + len(needle) :]

    @staticmethod
    def _content_bytes(sr: Dataset) -> bytes:
        return _encode_undefined(sr[_CONTENT_SEQUENCE], _encodings(sr))

    @staticmethod
    def _code_bytes(sr: Dataset, code_value: str) -> bytes:
        return _encode_undefined(_code_items(sr, code_value)[0], _encodings(sr))

    @staticmethod
    def _segments(blob: bytes, slots: Sequence[_Slot]) -> tuple[bytes, ...]:
        out, pos = [], 0
        for slot in slots:
            out.append(blob[pos : slot.start])
            pos = slot.end
        out.append(blob[pos:])
        return tuple(out)

    def fill(self, ident: Identity, findings: Sequence[Finding], summary: ImageRef | None) -> bytes:
        """The content tree's bytes for one image (referencing ``summary`` where given)."""
        src = ident.clean
        values = {
            "class": _ui(_REF_CLASS, str(src.SOPClassUID)),
            "inst": _ui(_REF_INSTANCE, str(src.SOPInstanceUID)),
            "summary": _summary(summary_text(findings)),
            "image": b"" if summary is None else self._image(summary),
        }
        parts = [self.segments[0]]
        for slot, segment in zip(self.slots, self.segments[1:], strict=True):
            parts.append(self._value(slot, values, ident, findings))
            parts.append(segment)
        return b"".join(parts)

    def _image(self, summary: ImageRef) -> bytes:
        if summary.sop_class_uid != _SENTINEL_SUMMARY.sop_class_uid:
            raise ReportError(f"SR template: a summary image of class {summary.sop_class_uid}")
        uid = _ui(_REF_INSTANCE, summary.sop_instance_uid)
        return self.image[0] + uid + self.image[1]

    def _value(
        self,
        slot: _Slot,
        fixed: dict[str, bytes],
        ident: Identity,
        findings: Sequence[Finding],
    ) -> bytes:
        if slot.kind in fixed:
            return fixed[slot.kind]
        finding = findings[slot.index]
        if slot.kind == "code":
            return self.present_code if finding.present else self.absent_code
        if slot.kind == "track":
            uid = tracking_uid(self.root, ident.sop_instance_uid, finding.pathology)
            return _ui(_UID_VALUE, uid)
        value = _score(finding.score)
        if slot.kind == "ds":
            return encoded_element(_NUMERIC, "DS", _ds(value))
        return encoded_element(_FLOAT, "FD", _fd(value))


def _summary(text: str) -> bytes:
    """The summary's Text Value element (the finding names are ASCII)."""
    return encoded_element(_TEXT_VALUE, "UT", text.encode("ascii"))


class ReportEncoder:
    """Encodes one SR per classified image, equal to :func:`node.sr.report.build_sr`'s.

    The content template and its check against highdicom's build cost several highdicom
    builds: they are made on the first :meth:`encode`, not at start-up, so that a node
    (re)starts and listens without waiting for them. The first image of each header kind
    costs one more highdicom build (its check); every other :meth:`encode` is cheap.
    """

    def __init__(
        self, model: ModelInfo, ctx: ReportContext, *, verify: bool = True, fast: bool = True
    ) -> None:
        """``fast`` False: every SR is ``build_sr``'s (``report.fast_encoder``). ``verify``
        False: no comparison with highdicom's build (tests that run many processes)."""
        self.model, self.ctx, self._verify = model, ctx, verify
        self._stub = self._root_stub()
        self._headers: dict[tuple[str, ...], _HeaderTemplate | None] = {}
        self._slow: set[tuple[str, ...]] = set()  # header kinds that disagreed: build_sr
        self._template: _ContentTemplate | None = None
        self._built = not fast

    @property
    def slow_kinds(self) -> frozenset[tuple[str, ...]]:
        """The header kinds whose check against highdicom disagreed: built by highdicom."""
        return frozenset(self._slow)

    @property
    def fast(self) -> bool:
        """Whether SRs are encoded from the template (built now if not yet)."""
        self.prepare()
        return self._template is not None

    def prepare(self) -> None:
        """Build the template now, checked against highdicom's build (on any disagreement
        every SR is built by highdicom); else the first :meth:`encode` does."""
        if self._built:
            return
        self._built = True  # the check below encodes through this encoder
        try:
            self._template = _ContentTemplate(self.model, self.ctx)
            agrees = not self._verify or self._agrees()
        except ReportError as exc:
            agrees = False
            log.warning("cannot build the SR template: %s", exc)
        if not agrees:
            log.warning(
                "the fast SR encoder disagrees with highdicom's reference build "
                "(highdicom %s, pydicom %s): every SR is built by highdicom instead",
                hd.__version__,
                pydicom.__version__,
            )
            self._template = None

    def _root_stub(self) -> hd.sr.ContainerContentItem:
        """The content root with one constant child: enough for highdicom's header."""
        source = _ContentTemplate._sentinel_source()
        ident = identify(source, self.model, self.ctx)
        findings = [Finding(label, 0.0, 0.5, False) for label in self.model.pathologies]
        root = content_tree(ident, findings, self.model, self.ctx)[0]
        if not isinstance(root, hd.sr.ContainerContentItem):
            raise ReportError("SR template: the content root is not a container")
        stub = copy.deepcopy(root)
        stub.ContentSequence = hd.sr.ContentSequence([root.ContentSequence[0]])
        return stub

    def encode(
        self,
        source: Dataset,
        findings: Sequence[Finding],
        now: datetime,
        summary: ImageRef | None = None,
    ) -> EncodedSR:
        """The SR for one image (referencing its ``summary`` image where given); raises
        :class:`node.core.errors.ReportError`."""
        with library_errors(source.get("SOPInstanceUID", "a source")):
            return self._encode(source, findings, now, summary)

    def _encode(
        self,
        source: Dataset,
        findings: Sequence[Finding],
        now: datetime,
        summary: ImageRef | None,
    ) -> EncodedSR:
        self.prepare()
        labels = tuple(f.pathology for f in findings)
        if self._template is None or labels != self._template.labels:
            return self._reference(source, findings, now, summary)
        ident = identify(source, self.model, self.ctx)
        check_summary(ident, summary)
        key = _header_key(ident.clean, self.ctx)
        if key in self._slow:
            return self._reference(source, findings, now, summary)
        first = key not in self._headers
        data = self._fast_bytes(self._template, key, ident, findings, now, summary)
        if first and self._verify:  # the first source of a kind: checked against highdicom
            return self._checked(key, data, source, findings, now, summary)
        return EncodedSR(data, ident.sop_instance_uid, ident.series_instance_uid)

    def _reference(
        self, source: Dataset, findings: Sequence[Finding], now: datetime, summary: ImageRef | None
    ) -> EncodedSR:
        sr = build_sr(source, findings, self.model, self.ctx, now, summary)
        return EncodedSR(encode_dataset(sr), str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID))

    def _checked(
        self,
        key: tuple[str, ...],
        fast: bytes,
        source: Dataset,
        findings: Sequence[Finding],
        now: datetime,
        summary: ImageRef | None,
    ) -> EncodedSR:
        """highdicom's SR for this image; where the fast encoding differs, this kind of
        header is built by highdicom from now on."""
        reference = self._reference(source, findings, now, summary)
        if comparable(fast) != comparable(reference.data):
            log.warning(
                "the fast SR encoder disagrees with highdicom's build for sources like %s "
                "(SOP class %s, character set %r, values: %s): their SRs are built by "
                "highdicom",
                escaped(str(source.get("SOPInstanceUID", "?"))),
                key[0],
                key[1],
                ", ".join(key[2:]) or "none",
            )
            if len(self._slow) >= _MAX_HEADERS:
                self._slow.clear()
            self._slow.add(key)
        return reference

    def _fast_bytes(
        self,
        template: _ContentTemplate,
        key: tuple[str, ...],
        ident: Identity,
        findings: Sequence[Finding],
        now: datetime,
        summary: ImageRef | None,
    ) -> bytes:
        content = template.fill(ident, findings, summary)
        return self._header_bytes(key, ident, now, summary) + content

    def _header_bytes(
        self, key: tuple[str, ...], ident: Identity, now: datetime, summary: ImageRef | None
    ) -> bytes:
        """The encoded document header: highdicom's, built for the first source of its kind
        and kept with each image's values left out (:class:`_HeaderTemplate`), then filled
        with this image's values, the first's too (so that its check covers the template)."""
        template = self._headers.get(key)
        if template is not None:
            return template.write(ident, now, summary)
        header = document(ident, self._stub, self.model, self.ctx, now, summary)
        if any(tag > _CONTENT_SEQUENCE for tag in header.keys()):
            raise ReportError("SR header has attributes after the Content Sequence")
        del header[_CONTENT_SEQUENCE]
        if key not in self._headers:
            if len(self._headers) >= _MAX_HEADERS:
                self._headers.pop(next(iter(self._headers)))
            template = self._headers[key] = self._template_of(header)
            if template is not None:
                return template.write(ident, now, summary)
        return encode_dataset(header)

    @staticmethod
    def _template_of(header: Dataset) -> _HeaderTemplate | None:
        try:
            return _HeaderTemplate(header)
        except ReportError as exc:  # highdicom's header is then built for every image
            log.warning("SR header of %s not reusable: %s", header.SOPClassUID, exc)
            return None

    def _agrees(self) -> bool:
        """Whether a mixed example encodes to the same dataset as ``build_sr``'s (the
        header of the first image built, the others' reused from it)."""
        source = _ContentTemplate._sentinel_source()
        source.PatientName = "Check^Self"
        findings = [
            Finding(label, 0.3 + 0.4 * (i % 2) + i / 997, 0.5, i % 2 == 1)
            for i, label in enumerate(self.model.pathologies)
        ]
        summary = ImageRef(SecondaryCaptureImageStorage, "1.2.826.0.1.3680043.8.498.7", "1.2.8")
        for n, ref in enumerate((None, summary, None)):
            now = datetime(2001 + n, 2, 3, 4, 5, 6)
            source.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{n + 1}"  # later ones reuse
            source.PatientID = f"SELFCHECK{n}"  # the header of the first
            ident = identify(source, self.model, self.ctx)
            key = _header_key(ident.clean, self.ctx)
            if self._template is None:
                return False
            fast = self._fast_bytes(self._template, key, ident, findings, now, ref)
            slow = encode_dataset(build_sr(source, findings, self.model, self.ctx, now, ref))
            if comparable(fast) != comparable(slow):
                return False
        self._headers.clear()
        return True


def _header_key(clean: Dataset, ctx: ReportContext) -> tuple[str, ...]:
    """What decides the header's shape: the source's SOP class, the SR's character set
    and which values the source has."""
    present = (k for k in FROM_SOURCE if clean.get(k) not in (None, ""))
    return (str(clean.SOPClassUID), sr_charset(clean, ctx) or "", *present)


def _element(keyword: str, value: object) -> DataElement:
    tag = Tag(keyword)
    return DataElement(tag, dictionary_VR(tag), value)


def _evidence(clean: Dataset, summary: ImageRef | None) -> bytes:
    """The Current Requested Procedure Evidence item that lists the source image (and the
    summary image), grouped by series in that order as highdicom groups them."""
    series: dict[str, list[bytes]] = {str(clean.SeriesInstanceUID): [_sop(clean)]}
    if summary is not None:
        ref = Dataset()
        ref.SOPClassUID, ref.SOPInstanceUID = summary.sop_class_uid, summary.sop_instance_uid
        series.setdefault(summary.series_instance_uid, []).append(_sop(ref))
    items = [_sequence(_REF_SOPS, sops) + _ui(_SERIES, uid) for uid, sops in series.items()]
    return _sequence(_REF_SERIES, items) + _ui(_STUDY, str(clean.StudyInstanceUID))


def _sop(ds: Dataset) -> bytes:
    return _ui(_REF_CLASS, str(ds.SOPClassUID)) + _ui(_REF_INSTANCE, str(ds.SOPInstanceUID))


def comparable(data: bytes) -> dict[str, Any]:
    """An SR's content and File Meta as one JSON dict: equal for equal documents however
    they were encoded (defined or undefined lengths)."""
    ds = pydicom.dcmread(BytesIO(data))
    out: dict[str, Any] = ds.to_json_dict()
    out["file_meta"] = ds.file_meta.to_json_dict()
    return out
