"""Unit: SR building (pure) with a strict pydicom round trip; deterministic valid UIDs."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from datetime import datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import ACRNEMA, NIH
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from sr_tree import codes, nums, texts

from node.analysis.model import ModelInfo, to_findings
from node.core.errors import ReportError
from node.dicom.dicomio import read_dataset
from node.dicom.uids import is_valid_uid, sr_instance_uid
from node.sr.codes import PATHOLOGY_CODES, finding_name, pathology_code
from node.sr.report import ReportContext, build_sr, sanitized_source

LABELS = tuple(PATHOLOGY_CODES)
CTX = ReportContext(uid_root="1.2.826.0.1.3680043.8.498.", device_name="CXR_NODE")
NOW = datetime(2026, 11, 25, 10, 30, 0)


def info(trained: bool = True, sha: str = "ab" * 32) -> ModelInfo:
    return ModelInfo(
        "densenet121-res224-all",
        "/w.pt",
        sha,
        "1.5.7",
        trained,
        LABELS,
        tuple(0.05 for _ in LABELS),
    )


SCORES = np.linspace(0.05, 0.95, 18).astype(np.float32)


def roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    old = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        back = pydicom.dcmread(BytesIO(buf.getvalue()))
        for elem in back.iterall():
            elem.value  # noqa: B018 - force conversion + validation
    finally:
        pydicom_config.settings.reading_validation_mode = old
    return back


@pytest.mark.parametrize("path", [NIH, ACRNEMA])
def test_sr_round_trip_holds_every_finding(path):
    src = read_dataset(path)
    findings = to_findings(SCORES, info())
    sr = roundtrip(build_sr(src, findings, info(), CTX, NOW))
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.CompletionFlag == "PARTIAL" and sr.VerificationFlag == "UNVERIFIED"
    assert (sr.ContentDate, sr.ContentTime) == ("20261125", "103000")
    stamps = {item.ContributionDateTime for item in sr.ContributingEquipmentSequence}
    assert stamps == {"20261125103000"}  # the clock passed in, not highdicom's own
    got_nums, got_codes = nums(sr), codes(sr)
    for f in findings:
        meaning = pathology_code(f.pathology).meaning
        assert got_nums[meaning] == pytest.approx(f.score, abs=1e-6)
        assert got_codes[meaning] == ("Present" if f.present else "Absent")
    ref = sr.ContentSequence[-1].ContentSequence[0].ContentSequence[-1]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert all(is_valid_uid(str(e.value)) for e in sr.iterall() if e.VR == "UI" and e.value)


@pytest.mark.parametrize(
    ("charset", "name", "institution", "expected"),
    [
        ("ISO_IR 100", "Müller^Jürgen", None, "ISO_IR 192"),
        ("ISO_IR 192", "山田^太郎", None, "ISO_IR 192"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", None, "ISO_IR 192"),
        ("ISO_IR 100", "Doe^Jane", None, None),
        (None, "Doe^Jane", "Hôpital Saint-Éloi", "ISO_IR 192"),
    ],
)
def test_names_in_any_character_set_survive_in_utf8(charset, name, institution, expected):
    """The source's values as pydicom decoded them from its own character set; the SR is
    UTF-8 where any copied or configured text needs it (it read "M?ller" before)."""
    src = read_dataset(NIH)
    if charset is not None:
        src.SpecificCharacterSet = charset
    src.PatientName = name
    src = read_dataset(roundtrip_bytes(src))  # encoded in the source's own character set
    ctx = ReportContext(CTX.uid_root, CTX.device_name, institution_name=institution)
    sr = roundtrip(build_sr(src, to_findings(SCORES, info()), info(), ctx, NOW))
    assert sr.get("SpecificCharacterSet") == expected
    assert str(sr.PatientName) == name
    assert sr.get("InstitutionName") == institution


def test_a_multi_valued_non_ascii_value_makes_the_sr_utf8():
    from node.sr.report import sr_charset

    src = read_dataset(NIH)
    src.SpecificCharacterSet = "ISO_IR 192"
    assert sr_charset(sanitized_source(src)[0], CTX) is None
    src.AccessionNumber = ["X", "A\u3000B"]  # an ideographic space: str() of the
    clean = sanitized_source(src)[0]  # MultiValue writes it as an ASCII escape
    assert "AccessionNumber" in clean and not clean.AccessionNumber  # VM 1: dropped
    clean.AccessionNumber = ["X", "A\u3000B"]
    assert sr_charset(clean, CTX) == "ISO_IR 192"
    src.AccessionNumber = "A\u3000B"
    sr = roundtrip(build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW))
    assert sr.AccessionNumber == "A\u3000B"


def roundtrip_bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_invalid_source_attributes_are_dropped_and_type2_kept_empty():
    src = read_dataset(NIH)
    assert src.PatientAge == "81"  # invalid AS value in the shared file
    clean, dropped = sanitized_source(src)
    assert [d.keyword for d in dropped] == ["PatientAge"]
    assert "StudyDate" in clean and not clean.StudyDate and "PatientAge" not in clean
    sr = build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW)
    assert "PatientAge" not in sr and "StudyDate" in sr and not sr.StudyDate


def test_untrained_model_is_named_so():
    sr = build_sr(read_dataset(NIH), to_findings(SCORES, info(False)), info(False), CTX, NOW)
    names = texts(sr)["Algorithm Name"]
    assert names and all(n.startswith("UNTRAINED ") for n in names)
    assert texts(sr)["UNTRAINED model"] == ["NOT FOR CLINICAL USE"]
    assert "UNTRAINED" in sr.SeriesDescription
    trained = build_sr(read_dataset(NIH), to_findings(SCORES, info()), info(), CTX, NOW)
    assert "UNTRAINED model" not in texts(trained)


def test_sr_uid_is_deterministic_and_depends_on_weights():
    src = read_dataset(NIH)
    f = to_findings(SCORES, info())
    a = build_sr(src, f, info(), CTX, NOW)
    b = build_sr(src, f, info(), CTX, datetime(2027, 1, 1))
    c = build_sr(src, f, info(sha="cd" * 32), CTX, NOW)
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID


def test_source_without_uids_is_refused():
    src = read_dataset(NIH)
    del src.StudyInstanceUID
    with pytest.raises(ReportError, match="StudyInstanceUID"):
        build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW)


_component = st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,15}", fullmatch=True))


_uid = st.lists(_component, min_size=2, max_size=12).map(".".join).filter(lambda u: len(u) <= 64)


@settings(max_examples=40, deadline=None)
@given(study=_uid, series=_uid, sop=_uid)
def test_every_ui_value_of_the_sr_is_valid_for_random_sources(study, series, sop):
    src = read_dataset(NIH)
    src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID = study, series, sop
    sr = build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW)
    values = [
        str(v)
        for e in sr.iterall()
        if e.VR == "UI" and e.value
        for v in (e.value if e.VM > 1 else [e.value])
    ]
    assert values and all(is_valid_uid(v) for v in values), values
    assert sr.StudyInstanceUID == study


@settings(max_examples=300, deadline=None)
@given(
    source=_uid,
    root=st.lists(_component, min_size=1, max_size=8)
    .map(lambda c: ".".join(c) + ".")
    .filter(lambda r: len(r) <= 40),
    sha=st.text("0123456789abcdef", min_size=64, max_size=64),
)
def test_derived_uids_are_always_valid(source, root, sha):
    uid = sr_instance_uid(root, source, "m", sha)
    assert is_valid_uid(uid) and uid.startswith(root)


def dciodvfy_errors(sr: pydicom.Dataset, tmp_path: Path) -> list[str]:
    """dciodvfy's error lines for ``sr`` (written as a Part 10 file)."""
    path = tmp_path / "sr.dcm"
    path.write_bytes(roundtrip_bytes(sr))
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="no dciodvfy")

# Values seen on real sources (or close to them) that their VR or VM does not allow.
BAD_VALUES = [
    ("StudyDate", "1993.04.30", r"1993\.04\.30"),  # pydicom's DA() parses it
    ("StudyDate", "19930231", "19930231"),
    ("StudyDate", "19930101-19931231", "19930101-19931231"),  # a query's range
    ("PatientBirthDate", "30/04/1993", "30/04/1993"),
    ("StudyTime", "256199", "256199"),
    ("AccessionNumber", "A" * 56, "A" * 56),  # SH: 16 at most; seen on a real chest DX
    ("AccessionNumber", ["X1", "X2"], re.escape("['X1', 'X2']")),  # VM 1
    ("PatientID", "P" * 65, "P" * 65),  # LO: 64
    ("PatientID", "ID\x01\x7f", r"ID\\x01\\x7f"),  # control characters, logged escaped
    ("StudyID", "S" * 17, "S" * 17),  # SH
    ("PatientName", "A^B^C^D^E^F", r"A\^B\^C\^D\^E\^F"),  # PN: 5 components at most
    ("PatientName", "N" * 65 + "^J", "N" * 65 + r"\^J"),  # PN: 64 characters a component group
    ("ReferringPhysicianName", "Dr\tWho", r"Dr\\x09Who"),
    ("PatientSex", "MALE", "MALE"),
]


@needs_dciodvfy
@pytest.mark.parametrize(("keyword", "value", "logged"), BAD_VALUES)
def test_invalid_source_values_are_dropped_with_a_warning_and_the_sr_stays_valid(
    keyword, value, logged, tmp_path, caplog
):
    src = read_dataset(NIH)
    setattr(src, keyword, value)
    src = read_dataset(roundtrip_bytes(src))  # as a source would send it
    with caplog.at_level(logging.WARNING, logger="node.sr.report"):
        sr = build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW)
    assert keyword in sr and not sr[keyword].value  # Type 2: present and empty
    pattern = rf"source {re.escape(src.SOPInstanceUID)}: {keyword} '{logged}' not copied"
    assert re.search(pattern, caplog.text), caplog.text
    assert dciodvfy_errors(sr, tmp_path) == []


NON_CONFORMANT = [  # safe (digits and dots, <= 64) but not DICOM's UI grammar
    ("SOPInstanceUID", "999.999.01.23.45.6789"),  # a leading zero, as a real CR sent it
    ("StudyInstanceUID", "1.2.840.0123.5"),
    ("SeriesInstanceUID", "1.2..840.5"),  # an empty component
]


@pytest.mark.parametrize(("keyword", "uid"), NON_CONFORMANT)
def test_a_non_conformant_source_uid_is_referenced_as_it_is(keyword, uid, tmp_path, caplog):
    src = read_dataset(NIH)
    setattr(src, keyword, uid)
    src = read_dataset(roundtrip_bytes(src))
    with caplog.at_level(logging.WARNING, logger="node.sr.report"):
        sr = roundtrip_bytes(build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW))
    assert f"{keyword} {uid} is not a conformant UID" in caplog.text
    back = pydicom.dcmread(BytesIO(sr))
    values = {str(e.value) for e in back.iterall() if e.VR == "UI" and e.value}
    assert uid in values
    assert all(is_valid_uid(v) for v in values - {uid})  # the SR's own UIDs are conformant
    if shutil.which("dciodvfy"):  # its errors are about the source's UID alone
        errors = dciodvfy_errors(back, tmp_path)
        assert errors and all(uid in e or "contains invalid data values" in e for e in errors)


@pytest.mark.parametrize("uid", ["", "1.2.3a", "1." + "2" * 64, "1.2.3-4"])
def test_an_unsafe_source_uid_is_refused(uid):
    src = read_dataset(NIH)
    src.SOPInstanceUID = uid
    with pytest.raises(ReportError, match="SOPInstanceUID"):
        build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW)


RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)


def test_a_source_of_a_class_highdicom_does_not_know_gets_its_sr(tmp_path, caplog):
    """highdicom looks the source's class up to copy patient and study: the retired US
    class was a bare KeyError; the SR is now built and references the class as it is."""
    src = read_dataset(NIH)
    src.SOPClassUID = RETIRED_US
    src = read_dataset(roundtrip_bytes(src))
    with caplog.at_level(logging.WARNING, logger="node.sr.report"):
        sr = roundtrip(build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW))
    assert f"SOP class {RETIRED_US} (Ultrasound Image Storage (Retired))" in caplog.text
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPClassUID == RETIRED_US
    ref = sr.ContentSequence[-1].ContentSequence[0].ContentSequence[-1]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPClassUID == RETIRED_US
    assert (sr.PatientID, sr.StudyInstanceUID) == (src.PatientID, src.StudyInstanceUID)
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(sr, tmp_path) == []


def test_a_class_highdicom_cannot_reference_at_all_is_a_readable_report_error(monkeypatch):
    import highdicom.base

    monkeypatch.setattr(highdicom.base, "get_sop_class_iod_map", dict)  # knows no class
    src = read_dataset(NIH)
    src.SOPClassUID = RETIRED_US
    with pytest.raises(ReportError) as caught:
        build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW)
    assert str(caught.value) == (
        f"cannot reference the source: SOP class {RETIRED_US} (Ultrasound Image Storage "
        "(Retired)) is not supported by highdicom"
    )


@pytest.mark.parametrize(
    ("where", "error"),
    [("TrackingIdentifier", ValueError), ("Comprehensive3DSR", TypeError)],
)
def test_what_highdicom_raises_becomes_a_report_error_with_its_reason(monkeypatch, where, error):
    import highdicom as hd

    def refuse(*args: object, **kwargs: object) -> None:
        raise error("refused for the test")

    monkeypatch.setattr(hd.sr, where, refuse)
    src = read_dataset(NIH)
    with pytest.raises(ReportError, match=f"{error.__name__}: refused for the test"):
        build_sr(src, to_findings(SCORES, info()), info(), CTX, NOW)


needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="no dsrdump")


def dsrdump(sr: pydicom.Dataset, tmp_path: Path, *options: str) -> list[str]:
    """dcmtk's dsrdump of ``sr``, as a reader runs it (texts over 30 characters cut unless
    ``+Pl``), one stripped line each."""
    path = tmp_path / "dump.dcm"
    path.write_bytes(roundtrip_bytes(sr))
    done = subprocess.run(["dsrdump", *options, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [line.strip() for line in done.stdout.splitlines()]


@needs_dsrdump
def test_dsrdump_shows_the_summary_first_and_each_findings_score_beside_its_label(tmp_path):
    model = info(trained=False)
    findings = to_findings(SCORES, model)
    lines = dsrdump(build_sr(read_dataset(NIH), findings, model, CTX, NOW), tmp_path)
    warning = lines.index('<contains TEXT:(,,"UNTRAINED model")="NOT FOR CLINICAL USE">')
    [summary] = [i for i, ln in enumerate(lines) if "AI findings above the operating" in ln]
    groups = [i for i, ln in enumerate(lines) if '"Measurement Group")' in ln]
    assert warning < summary < groups[0] and len(groups) == len(findings)
    for f, start, end in zip(findings, groups, [*groups[1:], len(lines)], strict=True):
        group = lines[start:end]
        meaning = pathology_code(f.pathology).meaning
        assert f'<has obs context TEXT:(,,"Tracking Identifier")="{f.pathology}">' in group
        at = group.index(
            f'<contains NUM:(,,"{meaning}")="{round(f.score, 6):g}"'
            ' ({probability},UCUM,"probability")>'
        )  # the score, and on the next line its label
        state = '52101004,SCT,"Present"' if f.present else '2667000,SCT,"Absent"'
        assert group[at + 1] == f'<contains CODE:(,,"{meaning}")=({state})>'
        assert '<has concept mod TEXT:(,,"Algorithm Name")="UNTRAINED densenet121">' in group
    assert not [ln for ln in lines if "Algorithm Name" in ln and "..." in ln]  # never cut
    full = dsrdump(build_sr(read_dataset(NIH), findings, model, CTX, NOW), tmp_path, "+Pl")
    above = sorted((f for f in findings if f.present), key=lambda f: -f.score)
    text = ", ".join(f"{finding_name(f.pathology)} {f.score:.2f}" for f in above)
    assert f'<contains TEXT:(,,"AI findings above the operating threshold")="{text}">' in full
    assert "Fracture (Fracture of bone) 0.84" in text  # both names where they differ
    assert "Enlarged Cardiomediastinum 0.95, Lung Opacity 0.90" in text  # highest first


def test_the_summary_says_none_when_nothing_is_above_the_threshold():
    findings = to_findings(np.full(18, 0.2, dtype=np.float32), info())
    sr = build_sr(read_dataset(NIH), findings, info(), CTX, NOW)
    assert texts(sr)["AI findings above the operating threshold"] == ["none"]
    assert "UNTRAINED model" not in texts(sr)


def test_one_naming_table_shows_both_names_where_they_differ():
    assert finding_name("Consolidation") == "Consolidation (Lung consolidation)"
    assert finding_name("Pleural_Thickening") == "Pleural_Thickening (Pleural thickening)"
    assert finding_name("Infiltration") == "Infiltration (Infiltrate)"
    assert finding_name("Atelectasis") == "Atelectasis"
    assert finding_name("Lung Lesion") == "Lung Lesion"  # only the case differs
