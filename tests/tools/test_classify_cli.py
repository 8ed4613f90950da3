"""``cxr-node classify``: offline pipeline, JSON validated against the repo's schema,
SR files validated by dciodvfy and rendered by dsrdump."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pydicom
import pytest
from conftest import write_config
from helpers import ACRNEMA, NIH, ROOT
from reference import xrv_outputs
from sr_tree import nums

from node.analysis.preprocess import preprocess
from node.dicom.dicomio import read_dataset
from node.sr.codes import pathology_code

SCHEMA = json.loads((ROOT / "node" / "process" / "result.schema.json").read_text())


STAND_IN = (str(ROOT / "tests" / "modelless_node.py"),)
"""The command with a stand-in classifier, where the model is not what a test is about."""


def classify(
    tmp_path: Path, weights_dir: Path, *args: str, entry: tuple[str, ...] = ("-m", "node")
) -> subprocess.CompletedProcess[str]:
    conf = write_config(
        tmp_path / "c.toml", {"model": {"cache_dir": str(weights_dir), "allow_download": False}}
    )
    return subprocess.run(
        [sys.executable, *entry, "classify", "--config", str(conf), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("Error")]


def test_classify_both_shared_files_writes_valid_json_and_srs(tmp_path, weights_dir):
    out, srs = tmp_path / "results.json", tmp_path / "SR"
    done = classify(
        tmp_path,
        weights_dir,
        str(NIH),
        str(ACRNEMA),
        "--json",
        str(out),
        "--sr-dir",
        str(srs),
        "--allow-untrained",
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(out.read_text())
    assert len(records) == 2
    for record, src in zip(records, (NIH, ACRNEMA), strict=True):
        jsonschema.validate(record, SCHEMA)
        assert record["model"]["trained"] is False and "UNTRAINED" in record["model"]["warning"]
        sr_path = Path(record["sr"]["file"])
        sr = pydicom.dcmread(sr_path)
        assert sr.StudyInstanceUID == read_dataset(src).StudyInstanceUID
        expected = xrv_outputs(preprocess(read_dataset(src)).array, weights_dir)
        got = nums(sr)
        for f in record["findings"]:
            assert f["score"] == pytest.approx(expected[f["pathology"]], abs=1e-5)
            assert got[pathology_code(f["pathology"]).meaning] == pytest.approx(
                f["score"], abs=1e-5
            )
            assert f["label"] == ("present" if f["score"] >= 0.5 else "absent")
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(sr_path) == []
        if shutil.which("dsrdump"):
            dump = subprocess.run(
                ["dsrdump", str(sr_path)], capture_output=True, text=True, check=False
            )
            assert dump.returncode == 0
            labels = dump.stdout.count('"Present")') + dump.stdout.count('"Absent")')
            assert labels == 18


def test_classify_refuses_untrained_without_flag(tmp_path, weights_dir):
    done = classify(tmp_path, weights_dir, str(NIH))
    assert done.returncode == 2
    assert "refusing to load" in done.stderr and "Traceback" not in done.stderr


def test_classify_names_a_non_dicom_file_as_skipped(tmp_path, weights_dir):
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image\n")
    done = classify(tmp_path, weights_dir, str(junk), "--allow-untrained", entry=STAND_IN)
    assert done.returncode == 0  # skipped, as push skips it
    assert f"{junk}: skipped: not a DICOM file" in done.stderr
    assert "0 classified, 1 skipped, 0 failed" in done.stderr
    assert "Traceback" not in done.stderr


def _variant(tmp_path: Path, name: str, **attrs: object) -> Path:
    ds = pydicom.dcmread(NIH)
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[name])
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path)
    return path


def test_classify_applies_the_serve_filter_and_counts(tmp_path, weights_dir):
    chest = _variant(tmp_path, "chest", BodyPartExamined="THORAX")
    skipped = [
        _variant(tmp_path, "ct", Modality="CT"),
        _variant(tmp_path, "spine", Modality="CR", BodyPartExamined="CSPINE"),
        _variant(tmp_path, "lateral", ViewPosition="LL"),
    ]
    sr = tmp_path / "sr.dcm"
    first = classify(
        tmp_path,
        weights_dir,
        str(chest),
        "--sr-dir",
        str(tmp_path / "SR"),
        "--json",
        str(tmp_path / "first.json"),
        "--allow-untrained",
        entry=STAND_IN,  # the filter is under test, not the model
    )
    assert first.returncode == 0, first.stderr
    [sr_made] = list((tmp_path / "SR").iterdir())
    sr.write_bytes(sr_made.read_bytes())  # an SR sent back to us is never classified
    files = [str(p) for p in (chest, *skipped, sr)]
    out = tmp_path / "r.json"
    done = classify(
        tmp_path, weights_dir, *files, "--json", str(out), "--allow-untrained", entry=STAND_IN
    )
    assert done.returncode == 0, done.stderr  # every file classified or skipped
    assert len(json.loads(out.read_text())) == 1
    assert "1 classified, 4 skipped, 0 failed" in done.stderr
    for path in (*skipped, sr):
        assert f"{path}: skipped: not a chest radiograph:" in done.stderr
    assert "no Pixel Data" not in done.stderr and "Modality SR" in done.stderr
    assert "Traceback" not in done.stderr
    everything = classify(
        tmp_path,
        weights_dir,
        *files[:4],
        "--json",
        str(out),
        "--allow-untrained",
        "--no-filter",
        entry=STAND_IN,
    )
    assert everything.returncode == 0, everything.stderr
    assert len(json.loads(out.read_text())) == 4


def test_classify_fails_a_broken_image_alone_with_one_line(tmp_path, weights_dir):
    good = _variant(tmp_path, "good")
    broken = _variant(tmp_path, "broken", PixelData=b"")
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    bad_lut = _variant(tmp_path, "bad-lut", ModalityLUTSequence=[lut])
    out = tmp_path / "r.json"
    done = classify(
        tmp_path,
        weights_dir,
        str(broken),
        str(bad_lut),
        str(good),
        "--json",
        str(out),
        "--allow-untrained",
        entry=STAND_IN,  # what fails is the image's decoding, never the model
    )
    assert done.returncode == 1  # some failed
    assert "1 classified, 0 skipped, 2 failed" in done.stderr
    assert len(json.loads(out.read_text())) == 1
    assert "Pixel Data element is empty" in done.stderr
    assert "malformed Modality LUT Sequence" in done.stderr
    assert "Traceback" not in done.stderr
    for line in done.stderr.splitlines():
        assert line.count(str(tmp_path)) <= 1, line  # never the path twice


def test_classify_outputs_in_new_folders_and_an_unwritable_one_in_one_line(tmp_path, weights_dir):
    """``--csv``/``--json`` in folders that do not exist yet are created; a path that
    cannot be written is one line naming it, never a traceback."""
    csv_path, json_path = tmp_path / "a" / "b" / "r.csv", tmp_path / "c" / "r.json"
    done = classify(
        tmp_path, weights_dir, str(NIH), "--allow-untrained",
        "--csv", str(csv_path), "--json", str(json_path), entry=STAND_IN,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(json.loads(json_path.read_text())) == 1
    assert len(csv_path.read_text().splitlines()) == 2
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = classify(
        tmp_path,
        weights_dir,
        str(NIH),
        "--allow-untrained",
        "--json",
        str(blocker / "r.json"),
        entry=STAND_IN,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"cannot write {blocker / 'r.json'}" in done.stderr, done.stderr
