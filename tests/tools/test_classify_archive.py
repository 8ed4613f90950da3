"""``cxr-node classify`` over a research archive: folders and zips through push's discovery,
serve's filter and pipeline, one CSV row per image, and ``--resume`` after Ctrl-C."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
from conftest import write_config
from helpers import ACRNEMA, ROOT, chest_images, wait_for

from node.process.results import SCORE_THRESHOLD

SCHEMA = json.loads((ROOT / "node" / "process" / "result.schema.json").read_text())


def _config(tmp_path: Path, weights_dir: Path, batch: int = 4) -> Path:
    model = {"cache_dir": str(weights_dir), "allow_download": False, "batch_size": batch}
    return write_config(tmp_path / "c.toml", {"model": model})


STAND_IN = (str(ROOT / "tests" / "modelless_node.py"),)
"""The command with a stand-in classifier, where the model is not what a test is about."""


def _run(
    conf: Path, *args: str, entry: tuple[str, ...] = ("-m", "node"), **kw: object
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            *entry,
            "classify",
            "--config",
            str(conf),
            "--allow-untrained",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT as a terminal sends it, also where this runs as a background job (which
        # ignores SIGINT: Python would then not turn it into KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,  # type: ignore[call-overload]
    )


def _archive(root: Path) -> dict[str, str]:
    """Nested folders, a zip, a text file and a CT: what each should become."""
    (root / "a" / "b").mkdir(parents=True)
    images = chest_images(5, "archive")
    expected: dict[str, str] = {}
    for i, ds in enumerate(images[:3]):
        path = root / ("a" if i else "a/b") / f"chest{i}.dcm"
        ds.save_as(path)
        expected[str(path)] = "classified"
    images[3].Modality = "CT"
    ct = root / "a" / "b" / "ct.dcm"
    images[3].save_as(ct)
    expected[str(ct)] = "skipped"
    (root / "a" / "notes.txt").write_text("not DICOM\n")
    expected[str(root / "a" / "notes.txt")] = "skipped"
    images[4].save_as(root / "in-zip.dcm")
    with zipfile.ZipFile(root / "a" / "export.zip", "w") as zf:
        zf.write(root / "in-zip.dcm", "study/in-zip.dcm")
        zf.write(ACRNEMA, "study/acrnema.dcm")
    (root / "in-zip.dcm").unlink()
    expected[f"{root / 'a' / 'export.zip'}!study/in-zip.dcm"] = "classified"
    expected[f"{root / 'a' / 'export.zip'}!study/acrnema.dcm"] = "classified"
    return expected


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_folders_and_zips_give_one_row_per_image_with_reasons(tmp_path, weights_dir):
    expected = _archive(tmp_path / "in")
    out_csv, out_json = tmp_path / "r.csv", tmp_path / "r.json"
    proc = _run(
        _config(tmp_path, weights_dir),
        str(tmp_path / "in"),
        "--csv",
        str(out_csv),
        "--json",
        str(out_json),
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "5 classified, 2 skipped, 0 failed" in err and "Traceback" not in err
    rows = _rows(out_csv)
    assert {r["file"]: r["status"] for r in rows} == expected
    by_file = {r["file"]: r for r in rows}
    ct = by_file[str(tmp_path / "in" / "a" / "b" / "ct.dcm")]
    assert ct["reason"].startswith("not a chest radiograph: Modality CT")
    assert by_file[str(tmp_path / "in" / "a" / "notes.txt")]["reason"] == "not a DICOM file"
    chest = next(r for r in rows if r["status"] == "classified")
    assert chest["modality"] == "DX" and chest["sop_instance_uid"]
    for name in ("Atelectasis", "Cardiomegaly"):
        prob, score = float(chest[f"{name}_probability"]), float(chest[f"{name}_score"])
        assert chest[f"{name}_label"] == ("present" if score >= SCORE_THRESHOLD else "absent")
        assert 0 <= prob <= 1 and 0 <= score <= 1
    assert chest["above_threshold"]  # the SR's summary: names and scores, or "none"
    records = json.loads(out_json.read_text())
    assert len(records) == 5
    import jsonschema

    for record in records:
        jsonschema.validate(record, SCHEMA)
        for f in record["findings"]:  # both scales, each with its own threshold
            assert (f["probability"] >= f["probability_threshold"]) == (f["label"] == "present")
            assert (f["score"] >= f["score_threshold"]) == (f["label"] == "present")
            assert f["name"].startswith(f["pathology"]) and f["code"]["meaning"]


def test_sigint_then_resume_gives_the_csv_of_an_uninterrupted_run(tmp_path, weights_dir):
    source = tmp_path / "in"
    source.mkdir()
    for i, ds in enumerate(chest_images(24, "resume")):
        ds.save_as(source / f"{i:03d}.dcm")
    conf = _config(tmp_path, weights_dir, batch=1)  # the same computation for every image
    whole = tmp_path / "whole.csv"
    run = functools.partial(_run, conf, str(source), entry=STAND_IN)
    proc = run("--csv", str(whole), "--json", str(tmp_path / "whole.json"))
    assert proc.wait(300) == 0
    cut, cut_json = tmp_path / "cut.csv", tmp_path / "cut.json"
    # 0.2 s an image: the interrupt lands half-way however fast the machine
    slow = {**os.environ, "CXR_TEST_STAND_IN_SECONDS": "0.2"}
    proc = run("--csv", str(cut), "--json", str(cut_json), env=slow)
    wait_for(lambda: cut.exists() and len(_rows(cut)) >= 6, 120, "6 rows written")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    done = len(_rows(cut))
    assert 6 <= done < 24
    assert len(json.loads(cut_json.read_text())) == done  # the JSON array was closed
    proc = run("--csv", str(cut), "--json", str(cut_json), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert cut.read_text() == whole.read_text()
    uids = [r["source"]["sop_instance_uid"] for r in json.loads(cut_json.read_text())]
    assert len(uids) == 24 == len(set(uids))
    again = run("--csv", str(cut), "--resume")
    _, err = again.communicate(timeout=300)
    assert "0 classified, 0 skipped, 0 failed" in err and cut.read_text() == whole.read_text()


def test_resume_needs_an_output(tmp_path, weights_dir):
    proc = _run(_config(tmp_path, weights_dir), str(ACRNEMA), "--resume")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--resume needs --csv or --json" in err


@pytest.mark.parametrize("n", [1])
def test_the_json_on_stdout_is_an_array(tmp_path, weights_dir, n):
    proc = _run(_config(tmp_path, weights_dir), str(ACRNEMA), entry=STAND_IN)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(json.loads(out)) == n
    assert pydicom.__name__  # imported for the archive builder
    time.sleep(0)
