"""``cxr-node push``: zips (in memory), folders and files to real Orthanc and dcmtk storescp."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
from helpers import ACRNEMA, NIH, closed_port, fast_paths, free_port, wait_for
from test_transcodes import transcode

from node.dicom.dicomio import read_dataset

pytestmark = pytest.mark.integration


def run_push(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", "push", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )


def renumber(path: Path) -> Path:
    """Give a transcode its own SOP Instance UID (pixel data untouched, still compressed)."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def study_zip(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A zip with nested folders: the shared files, a JPEG-Lossless and a JPEG 2000
    transcode, a text file and a DICOMDIR."""
    jl = renumber(transcode(NIH, "jpeg-lossless-sv1", tmp_path))
    j2k = renumber(transcode(ACRNEMA, "jpeg2000-lossless", tmp_path))
    dicomdir = tmp_path / "fs"
    from pydicom.fileset import FileSet

    fs = FileSet()
    ds = pydicom.dcmread(NIH)
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20200101", "120000", "1", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    fs.add(ds)
    fs.write(dicomdir)
    path = tmp_path / "study.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(NIH, "export/PAT1/nih.dcm")
        zf.write(ACRNEMA, "export/PAT1/old/acrnema")
        zf.write(jl, "export/PAT1/jpeg/IM0001")
        zf.write(j2k, "export/PAT2/j2k/IM0002.dcm")
        zf.writestr("export/readme.txt", "exported by a viewer\n")
        zf.write(dicomdir / "DICOMDIR", "export/DICOMDIR")
    return path, [NIH, ACRNEMA, jl, j2k]


def test_zip_to_orthanc_arrives_unchanged(orthanc_factory, study_zip):
    orthanc = orthanc_factory(free_port())
    path, originals = study_zip
    done = run_push(str(path), "--port", str(orthanc.dicom_port), "--aet", "ORTHANC")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sent 4, warnings 0, failed 0, skipped 2" in done.stdout
    for original in originals:
        src = read_dataset(original)
        [iid] = orthanc.rest.find("Instance", {"SOPInstanceUID": src.SOPInstanceUID})
        meta = orthanc.rest.get(f"/instances/{iid}/metadata?expand")
        assert meta["TransferSyntax"] == src.file_meta.TransferSyntaxUID, original
        got = pydicom.dcmread(__import__("io").BytesIO(orthanc.rest.file(iid)))
        assert got.PixelData == src.PixelData, original


def test_zip_to_dcmtk_storescp_equals_originals(tmp_path, study_zip):
    path, originals = study_zip
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    scp = subprocess.Popen(
        ["storescp", "--output-directory", str(out), "+xa", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), 20, "storescp to listen")
        done = run_push(str(path), "--port", str(port), "--aet", "STORESCP")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: len(list(out.iterdir())) == 4, 20, "4 files in storescp")
    finally:
        scp.terminate()
        scp.wait(10)
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in out.iterdir()}
    for original in originals:
        src = read_dataset(original)
        got = received[src.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        for elem in src:
            if elem.tag.element == 0:  # group lengths: retired, dropped by dcmtk on write
                continue
            assert got[elem.tag].value == elem.value, (original, elem.keyword)


@pytest.mark.parametrize("how", ["--abort-after", "--abort-during"])
def test_dcmtk_storescp_that_aborts_fails_each_file_alone_at_once(tmp_path, how):
    """dcmtk's storescp aborting every association after (or while) it receives a C-STORE:
    each file fails alone, named, with the reason, after one more try on a new association;
    no file waits out the 10 s timeout, and the peer is not reported unreachable."""
    from helpers import chest_images

    for i, ds in enumerate(chest_images(3, "dcmtk-abort")):
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
    port = free_port()
    scp = subprocess.Popen(
        ["storescp", how, "--output-directory", str(tmp_path), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), 20, "storescp to listen")
        start = time.monotonic()
        done = run_push(
            *(str(tmp_path / f"{i}.dcm") for i in range(3)),
            *("--port", str(port), "--aet", "STORESCP", "--associations", "1"),
            *("--timeout", "10"),
        )
        elapsed = time.monotonic() - start
    finally:
        scp.terminate()
        scp.wait(10)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "sent 0, warnings 0, failed 3" in done.stdout, done.stdout
    for i in range(3):
        [line] = [x for x in done.stdout.splitlines() if f"{i}.dcm" in x]
        assert "aborted the association while receiving it" in line or (
            "closed the connection while receiving it" in line
        ), line
    assert "not attempted" not in done.stdout and "Traceback" not in done.stderr
    assert elapsed < 10, f"{elapsed:.1f} s: the 10 s timeout was waited out"


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_orthanc_down_gives_clear_error_and_nonzero_exit(tmp_path):
    with closed_port() as port:  # not free_port(): another test's peer could take that one
        done = run_push(str(NIH), "--port", str(port), "--aet", "ORTHANC")
    assert done.returncode == 1
    assert "failed 1" in done.stdout and f"connection refused by 127.0.0.1:{port}" in done.stdout
    assert "Traceback" not in done.stderr


def test_wrong_called_ae_rejection_is_reported(tmp_path):
    from node.core.config import ScpConfig
    from node.net.scp import start_server
    from node.store.spool import Spool

    spool = Spool(tmp_path / "spool", fsync=False)
    server = start_server(
        ScpConfig(port=0, allowed_calling_aets=("CXR_PUSH",)), spool, fast_paths=fast_paths()
    )
    try:
        done = run_push(str(NIH), "--port", str(server.server_address[1]), "--aet", "WRONG_AE")
    finally:
        server.shutdown()
    assert done.returncode == 1 and "rejected" in done.stdout
    assert spool.jobs() == []


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"PK\x03\x04 this is not really a zip", "not a readable zip"), (None, "is empty")],
)
def test_corrupt_and_empty_zip_fail_clearly(tmp_path, content, message):
    path = tmp_path / "bad.zip"
    if content is None:
        zipfile.ZipFile(path, "w").close()
    else:
        path.write_bytes(content + b"\x00" * 64)
    done = run_push(str(path), "--port", str(free_port()), "--aet", "ORTHANC")
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_zip_bomb_member_refused(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\x00" * (3 * 2**20))
    done = run_push(str(path), "--port", str(free_port()), "--max-member-mb", "1")
    assert done.returncode == 1, done.stdout + done.stderr  # the member fails, not the push
    assert f"failed: {path}!big.dcm: refused: declares {3 * 2**20} bytes" in done.stdout
    assert "zip bomb" in done.stdout and "Traceback" not in done.stderr


def test_pushed_zip_of_chest_images_gets_one_sr_each(orthanc_factory, node_factory, tmp_path):
    from helpers import chest_images

    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    node_factory(orthanc.dicom_port, port=node_port, model=False)  # push is under test
    images = chest_images(5, "zip-e2e")
    path = tmp_path / "chest.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i, ds in enumerate(images):
            buf = __import__("io").BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            zf.writestr(f"study/series/{i}.dcm", buf.getvalue())
    done = run_push(str(path), "--port", str(orthanc.dicom_port), "--associations", "2")
    assert done.returncode == 0 and "sent 5" in done.stdout, done.stdout
    wait_for(lambda: len(orthanc.sr_uids()) == 5, 120, "5 SRs")
