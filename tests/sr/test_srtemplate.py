"""Unit: the fast SR encoder produces exactly the document highdicom builds (pure)."""

from __future__ import annotations

import logging
from datetime import datetime

import numpy as np
import pytest
from helpers import ACRNEMA, NIH
from hypothesis import given, settings
from hypothesis import strategies as st
from test_report import (
    BAD_VALUES,
    CTX,
    NON_CONFORMANT,
    NOW,
    RETIRED_US,
    SCORES,
    info,
    roundtrip,
    roundtrip_bytes,
)

from node.analysis.model import Finding, to_findings
from node.core.errors import ReportError
from node.dicom.dicomio import read_dataset
from node.sr.report import ImageRef, build_sr
from node.sr.srtemplate import ReportEncoder, comparable, encode_dataset


@pytest.fixture(scope="module")
def encoder() -> ReportEncoder:
    return ReportEncoder(info(), CTX)


@pytest.fixture(scope="module")
def unchecked() -> ReportEncoder:
    """The template path alone: no comparison with highdicom inside the encoder (the test
    compares), so that every image, the first of its kind too, is the template's."""
    return ReportEncoder(info(), CTX, verify=False)


@pytest.fixture(autouse=True)
def _every_kind_agrees(request):
    """The first image of each kind is highdicom's build, checked against the fast one;
    a kind that disagreed would be built by highdicom ever after, and compare equal."""
    yield
    if "encoder" in request.fixturenames:
        assert request.getfixturevalue("encoder").slow_kinds == frozenset()


def reference(src, findings, model=None, now=NOW, summary=None) -> bytes:
    return encode_dataset(build_sr(src, findings, model or info(), CTX, now, summary))


SC = "1.2.840.10008.5.1.4.1.1.7"


def test_the_template_is_used_and_agrees_on_the_shared_images(encoder):
    assert encoder.fast  # the self-check passed: the fast path is on
    for path in (NIH, ACRNEMA):
        src = read_dataset(path, stop_before_pixels=True)
        findings = to_findings(SCORES, info())
        encoder.encode(src, findings, NOW)  # the first of its kind: highdicom's, checked
        fast = encoder.encode(src, findings, NOW)
        assert comparable(fast.data) == comparable(reference(src, findings))
        sr = roundtrip(read_dataset(fast.data))  # strict pydicom validation
        assert sr.SOPInstanceUID == fast.sop_instance_uid
        assert sr.SeriesInstanceUID == fast.series_instance_uid


_component = st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,15}", fullmatch=True))
_uid = st.lists(_component, min_size=2, max_size=20).map(".".join).filter(lambda u: len(u) <= 64)
_score = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False),
    st.sampled_from([0.0, 1.0, 0.5, 0.4999995, 1e-7, 0.123456789, 2 / 3]),
)


@settings(max_examples=30, deadline=None)  # each compares with a 0.4 s highdicom build
@given(
    scores=st.lists(_score, min_size=18, max_size=18),
    sop=_uid,
    study=_uid,
    sop_class=st.sampled_from(
        ["1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.7"]
    ),
    name=st.one_of(st.none(), st.just(""), st.text(min_size=1, max_size=20)),
    age=st.sampled_from([None, "045Y", "81", "012M"]),
    accession=st.one_of(st.none(), st.from_regex(r"[A-Z0-9]{1,16}", fullmatch=True)),
    summary=st.one_of(st.none(), st.tuples(_uid, st.one_of(st.none(), _uid))),
)
def test_fast_equals_highdicom_for_generated_inputs(
    unchecked, scores, sop, study, sop_class, name, age, accession, summary
):
    encoder = unchecked
    assert encoder.fast  # else this compares highdicom with itself
    src = read_dataset(NIH, stop_before_pixels=True)
    src.SOPInstanceUID, src.StudyInstanceUID, src.SOPClassUID = sop, study, sop_class
    for keyword, value in (("PatientName", name), ("PatientAge", age)):
        if value is None:
            src.pop(keyword, None)
        else:
            setattr(src, keyword, value)
    if accession is not None:
        src.AccessionNumber = accession
    findings = to_findings(np.array(scores, dtype=np.float32), info())
    ref = None  # the summary image: in a series of its own, or (None) in the source's
    if summary is not None:
        ref = ImageRef(SC, summary[0], summary[1] or str(src.SeriesInstanceUID))
    try:
        expected = reference(src, findings, summary=ref)
    except ReportError:
        with pytest.raises(ReportError):
            encoder.encode(src, findings, NOW, ref)
        return
    assert comparable(encoder.encode(src, findings, NOW, ref).data) == comparable(expected)


@pytest.mark.parametrize("whose", ["source", "sr"])
def test_a_summary_with_the_source_or_sr_uid_is_refused_by_both_encoders(encoder, whose):
    src = read_dataset(NIH, stop_before_pixels=True)
    findings = to_findings(SCORES, info())
    uid = encoder.encode(src, findings, NOW).sop_instance_uid if whose == "sr" else None
    ref = ImageRef(SC, uid or str(src.SOPInstanceUID), "1.2.3.4")  # another series
    with pytest.raises(ReportError, match="summary image's SOP Instance UID"):
        reference(src, findings, summary=ref)
    with pytest.raises(ReportError, match="summary image's SOP Instance UID"):
        encoder.encode(src, findings, NOW, ref)


def test_unexpected_labels_take_highdicoms_path(encoder):
    src = read_dataset(NIH, stop_before_pixels=True)
    findings = (Finding("Cardiomegaly", 0.7, 0.5, True), Finding("Mass", 0.2, 0.5, False))
    fast = encoder.encode(src, findings, NOW)
    assert comparable(fast.data) == comparable(reference(src, findings))


@pytest.mark.parametrize("where", ["template", "fill"])
def test_an_encoder_that_disagrees_falls_back_to_highdicom(monkeypatch, caplog, where):
    from node.sr import srtemplate

    if where == "template":  # every score would read 0.5: the template cannot be built
        monkeypatch.setattr(srtemplate, "_ds", lambda value: b"0.5")
    else:  # a per-image value encoded wrongly (every code "Absent"): caught by the self-check
        right = srtemplate._ContentTemplate._value

        def wrong(self, slot, fixed, ident, findings):
            if slot.kind == "code":
                return self.absent_code
            return right(self, slot, fixed, ident, findings)

        monkeypatch.setattr(srtemplate._ContentTemplate, "_value", wrong)
    with caplog.at_level(logging.WARNING, logger="node.sr.srtemplate"):
        enc = ReportEncoder(info(), CTX)
        assert not enc.fast
    assert "disagrees" in caplog.text
    assert ("cannot build the SR template" in caplog.text) == (where == "template")
    src = read_dataset(NIH, stop_before_pixels=True)
    findings = to_findings(SCORES, info())
    assert comparable(enc.encode(src, findings, NOW).data) == comparable(reference(src, findings))


def test_untrained_models_and_other_clocks_agree():
    enc = ReportEncoder(info(False), CTX)
    src = read_dataset(ACRNEMA, stop_before_pixels=True)
    findings = to_findings(SCORES[::-1].copy(), info(False))
    now = datetime(2030, 12, 31, 23, 59, 59)
    enc.encode(src, findings, NOW)  # the first of its kind: highdicom's, checked
    got = comparable(enc.encode(src, findings, now).data)
    assert got == comparable(reference(src, findings, info(False), now))
    assert "UNTRAINED" in got["0008103E"]["Value"][0]
    assert enc.slow_kinds == frozenset()


def test_fast_encoder_off_builds_every_sr_with_highdicom(monkeypatch):
    from node.sr import srtemplate

    built: list[str] = []
    real = srtemplate.build_sr

    def counted(source, *args):  # type: ignore[no-untyped-def]
        built.append(str(source.SOPInstanceUID))
        return real(source, *args)

    monkeypatch.setattr(srtemplate, "build_sr", counted)
    enc = ReportEncoder(info(), CTX, fast=False)
    src = read_dataset(NIH, stop_before_pixels=True)
    findings = to_findings(SCORES, info())
    for _ in range(3):
        assert comparable(enc.encode(src, findings, NOW).data) == comparable(
            reference(src, findings)
        )
    assert not enc.fast
    assert built == [str(src.SOPInstanceUID)] * 3  # none from a template, no self-check


def test_a_kind_whose_header_disagrees_is_built_by_highdicom_and_the_others_stay_fast(
    monkeypatch, caplog
):
    """The first image of each header kind is checked against highdicom's build: a kind
    nobody tried (here: sources with an accession number, whose template is made to encode
    it wrongly) is built by highdicom from then on, with one warning naming the kind."""
    from node.sr import srtemplate

    write = srtemplate._HeaderTemplate.write

    def wrong(self, ident, now, summary):  # type: ignore[no-untyped-def]
        return write(self, ident, now, summary).replace(b"ACC12345", b"ACC99999")

    monkeypatch.setattr(srtemplate._HeaderTemplate, "write", wrong)
    built: list[str] = []
    real = srtemplate.build_sr
    monkeypatch.setattr(
        srtemplate,
        "build_sr",
        lambda src, *a: built.append(str(src.SOPInstanceUID)) or real(src, *a),
    )
    enc = ReportEncoder(info(), CTX)
    enc.prepare()  # its self-check's sources have no accession number: it agrees
    built.clear()
    findings = to_findings(SCORES, info())
    plain, with_accession = [], []
    for i in range(3):
        src = read_dataset(NIH, stop_before_pixels=True)
        src.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.5.{i}"
        src.pop("AccessionNumber", None)
        plain.append(src)
        odd = read_dataset(NIH, stop_before_pixels=True)
        odd.SOPInstanceUID, odd.AccessionNumber = f"1.2.826.0.1.3680043.8.498.6.{i}", "ACC12345"
        with_accession.append(odd)
    with caplog.at_level(logging.WARNING, logger="node.sr.srtemplate"):
        for src in plain + with_accession:
            got = enc.encode(src, findings, NOW).data
            assert comparable(got) == comparable(reference(src, findings))
    warnings = [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]
    assert len(warnings) == 1 and "AccessionNumber" in warnings[0]
    [kind] = enc.slow_kinds
    assert "AccessionNumber" in kind
    # the plain kind: highdicom's for its first image (the check), then fast; the odd kind:
    # its first image checked, the two after it built by highdicom
    assert built == [plain[0].SOPInstanceUID, *(odd.SOPInstanceUID for odd in with_accession)]


def test_reused_headers_agree_with_highdicoms_across_scripts_and_clocks(encoder):
    """A header of a kind seen before is its template with this image's values encoded
    into it: it must decode to highdicom's header for the image (names in three scripts,
    two clocks), pass strict validation, and date each contribution now."""
    from node.sr.report import identify
    from node.sr.srtemplate import _header_key, _HeaderTemplate

    findings = to_findings(SCORES, info())
    checked = 0
    for i, name in enumerate(["Doe^Jane", "Müller^Jürgen", "山田^太郎", "Doe^John", ""]):
        src = read_dataset(NIH, stop_before_pixels=True)
        src.PatientName, src.SOPInstanceUID = name, f"1.2.826.0.1.3680043.8.498.7.{i}"
        encoder.encode(src, findings, NOW)  # the header of this kind is cached
        ident = identify(src, encoder.model, encoder.ctx)
        key = _header_key(ident.clean, encoder.ctx)
        assert isinstance(encoder._headers[key], _HeaderTemplate)
        for now in (NOW, datetime(2031, 12, 31, 23, 59, 59)):
            fast = encoder.encode(src, findings, now).data
            assert comparable(fast) == comparable(reference(src, findings, now=now))
            sr = roundtrip(read_dataset(fast))
            assert str(sr.PatientName) == name and sr.ContentTime == now.strftime("%H%M%S")
            stamps = {i.ContributionDateTime for i in sr.ContributingEquipmentSequence}
            assert stamps == {now.strftime("%Y%m%d%H%M%S")}
            checked += 1
    assert checked == 10


def test_a_header_with_ambiguous_vrs_is_not_templated():
    from pydicom.dataset import Dataset

    from node.sr.srtemplate import _HeaderTemplate

    header = Dataset()
    header.add_new(0x00280106, "US or SS", b"\x00\x00")  # Smallest Image Pixel Value
    with pytest.raises(ReportError, match="ambiguous"):
        _HeaderTemplate(header)


ODD_SOURCES = [
    *((keyword, value) for keyword, value, _ in BAD_VALUES),
    *NON_CONFORMANT,
    ("SOPClassUID", RETIRED_US),
    ("SOPClassUID", "1.2.826.0.1.3680043.8.498.1"),  # a private class nobody knows
]


@pytest.mark.parametrize(("keyword", "value"), ODD_SOURCES)
def test_both_encoders_agree_on_sources_with_invalid_values(encoder, keyword, value):
    """Dropped values, non-conformant source UIDs and a class highdicom does not know:
    the same SR from both, for the first image of its kind and for one that reuses its
    header."""
    src = read_dataset(NIH, stop_before_pixels=True)
    setattr(src, keyword, value)
    src = read_dataset(roundtrip_bytes(src), stop_before_pixels=True)
    findings = to_findings(SCORES, info())
    for now in (NOW, datetime(2031, 1, 2, 3, 4, 5)):
        fast = encoder.encode(src, findings, now)
        assert comparable(fast.data) == comparable(reference(src, findings, now=now))


def test_what_pydicom_raises_in_the_fast_encoder_becomes_a_report_error(monkeypatch):
    from node.sr import srtemplate

    enc = ReportEncoder(info(), CTX, verify=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("refused for the test")

    monkeypatch.setattr(srtemplate, "write_data_element", refuse)
    src = read_dataset(NIH, stop_before_pixels=True)
    with pytest.raises(ReportError, match="ValueError: refused for the test"):
        enc.encode(src, to_findings(SCORES, info()), NOW)


def test_the_template_is_built_on_the_first_sr_not_at_start_up(monkeypatch):
    """Building the template and its self-check takes several highdicom builds: a node
    that (re)starts listens without waiting for them."""
    from node.sr import srtemplate

    built: list[object] = []
    init = srtemplate._ContentTemplate.__init__

    def counted(self: object, *args: object) -> None:
        built.append(args)
        init(self, *args)

    monkeypatch.setattr(srtemplate._ContentTemplate, "__init__", counted)
    enc = ReportEncoder(info(), CTX, verify=False)
    assert built == []
    src = read_dataset(NIH, stop_before_pixels=True)
    enc.encode(src, to_findings(SCORES, info()), NOW)
    enc.encode(src, to_findings(SCORES, info()), NOW)
    assert len(built) == 1
