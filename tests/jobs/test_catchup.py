"""Nothing routed is lost: the catch-up over query/retrieve (node/jobs/catchup.py) and
``cxr-node backfill``, with real Orthanc (the repo's orthanc.json and Lua route) and the node
as real processes, timers scaled down by configuration. The pure part: test_catchup_plan.py.
"""

from __future__ import annotations

import copy
import os
import re
import sqlite3
import subprocess
import time
from datetime import date
from pathlib import Path

import pydicom
import pytest
from conftest import stop_process
from helpers import NIH, free_port, wait_for
from pydicom.uid import generate_uid

from node.jobs.catchup import open_session
from node.net.scu import Peer

pytestmark = pytest.mark.integration
FAST = {"enabled": True, "interval": 1.0, "grace": 2.0, "window_hours": 24.0}
"""Catch-up timers scaled down: a round a second, fetched after 2 s missing."""


def _images(folder: Path, n: int, seed: str, study_date: str) -> list[Path]:
    """``n`` distinct DX chest images of one new study (StudyDate ``study_date``), as files."""
    base = pydicom.dcmread(NIH)
    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[seed, str(i)]
        )
        ds.StudyDate = ds.SeriesDate = study_date
        ds.StudyTime = "101010"
        path = folder / f"{seed}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _today() -> str:
    return f"{date.today():%Y%m%d}"


def storescu(port: int, *files: Path) -> None:
    done = subprocess.run(
        ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def _route_failures(orthanc: object, n: int) -> None:
    """Wait until Orthanc's route has given up on ``n`` images (the node is down or refusing):
    nothing of them is still on its way."""
    log: Path = orthanc.log  # type: ignore[attr-defined]
    wait_for(
        lambda: log.read_text(errors="replace").count("Unable to send instance") >= n,
        60,
        f"Orthanc's route to fail {n} times",
    )


def _srs(orthanc: object, study: str | None = None) -> list[str]:
    query = {"Modality": "SR", **({"StudyInstanceUID": study} if study else {})}
    return orthanc.rest.find("Instance", query)  # type: ignore[attr-defined]


def _refusals(spool: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(f"file:{spool / 'jobs.sqlite'}?mode=ro", uri=True)
    try:
        return [
            (str(u), int(s)) for u, s in db.execute("SELECT sop_instance_uid, status FROM refusals")
        ]
    finally:
        db.close()


def test_images_routed_while_the_node_was_down_are_fetched_once(
    orthanc_factory, node_factory, tmp_path
):
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    storescu(orthanc.dicom_port, *_images(tmp_path / "in", 50, "down", _today()))
    _route_failures(orthanc, 50)  # Orthanc never retries these

    started = time.monotonic()
    node = node_factory(orthanc.dicom_port, port=node_port, catchup=FAST, model=False)
    srs = wait_for(
        lambda: len(_srs(orthanc)) >= 50 and _srs(orthanc), FAST["interval"] + 120, "50 SRs"
    )
    took = time.monotonic() - started
    print(f"node start to the 50th SR in Orthanc: {took:.1f} s")
    time.sleep(3 * FAST["interval"])  # a few more rounds: nothing fetched twice
    assert len(set(_srs(orthanc))) == len(srs) == 50
    assert node.jobs() == {"sent": 50}
    m = node.metrics()
    assert m['cxr_node_c_store_total{status="0x0000"}'] == 50.0
    assert m["cxr_node_catchup_fetched_total"] == 50.0
    assert m["cxr_node_catchup_errors_total"] == 0.0
    assert m["cxr_node_catchup_rounds_total"] >= 3
    assert re.search(
        r"catch-up round: 1 studies, 50 instances found, 0 already known, "
        r"0 refused, 0 waiting \(grace\), 50 fetched, 0 errors",
        node.log_text(),
    )
    status = node.cli("status")
    assert re.search(r"catch-up: last round .* found 50, fetched 0, errors 0", status.stdout), (
        status.stdout
    )


def test_images_refused_while_the_spool_was_full_are_fetched_after(
    orthanc_factory, node_factory, tmp_path
):
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    full = node_factory(
        orthanc.dicom_port, port=node_port, catchup=FAST, spool={"min_free_mb": 2**30}, model=False
    )
    storescu(orthanc.dicom_port, *_images(tmp_path / "in", 12, "full", _today()))
    _route_failures(orthanc, 12)
    wait_for(  # the catch-up tried too, and was refused as well
        lambda: full.metrics()["cxr_node_catchup_errors_total"] >= 1,
        30,
        "the catch-up's C-MOVEs to be refused for lack of space",
    )
    assert full.metrics()['cxr_node_c_store_total{status="0xA700"}'] > 12
    assert full.jobs() == {} and _refusals(full.spool) == []  # 0xA700 is not for good
    stop_process(full.proc, 20)

    node = node_factory(orthanc.dicom_port, port=node_port, catchup=FAST, model=False)
    wait_for(lambda: len(_srs(orthanc)) == 12, FAST["interval"] + 120, "12 SRs")
    # Orthanc lists an SR before the node has its C-STORE response and marks the job sent
    wait_for(lambda: node.jobs() == {"sent": 12}, 30, "12 jobs sent")
    assert node.metrics()["cxr_node_catchup_fetched_total"] == 12.0


def test_backfill_fetches_exactly_the_missing_studies_and_nothing_twice(
    orthanc_factory, node_factory, tmp_path
):
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    off = {"enabled": False}
    live = node_factory(orthanc.dicom_port, port=node_port, catchup=off, model=False)
    old = "20190301"  # far outside any catch-up window
    storescu(orthanc.dicom_port, *_images(tmp_path / "a", 3, "study-a", old))
    wait_for(lambda: len(_srs(orthanc)) == 3, 60, "the routed study's 3 SRs")
    stop_process(live.proc, 20)
    b = _images(tmp_path / "b", 4, "study-b", old)
    c = _images(tmp_path / "c", 2, "study-c", "20190302")
    storescu(orthanc.dicom_port, *b, *c)
    _route_failures(orthanc, 6)
    study_b, study_c = (str(pydicom.dcmread(p[0]).StudyInstanceUID) for p in (b, c))

    node = node_factory(orthanc.dicom_port, port=node_port, catchup=off, model=False)
    run = node.cli("backfill", "--study", study_b)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(
        r"1 studies, 4 instances found, 0 already known, 0 refused, 4 fetched, "
        r"0 errors",
        run.stdout,
    ), run.stdout
    # not a terminal: no progress bar (stock pynetdicom may log a line of its own there)
    assert "\r" not in run.stderr and "backfill" not in run.stderr
    wait_for(lambda: len(_srs(orthanc, study_b)) == 4, 60, "study B's 4 SRs")
    assert _srs(orthanc, study_c) == []

    run = node.cli("backfill", "--since", "2019-03-01", "--until", "2019-03-02")
    assert "3 studies, 9 instances found, 7 already known, 0 refused, 2 fetched" in run.stdout
    wait_for(lambda: len(_srs(orthanc)) == 9, 60, "every study's SRs")
    for args in (("--study", study_b), ("--since", "20190301")):
        again = node.cli("backfill", *args)
        assert again.returncode == 0 and " 0 fetched, 0 errors" in again.stdout, again.stdout
    assert node.jobs() == {"sent": 9}  # 3 routed, 6 backfilled: each received once
    assert len(set(_srs(orthanc))) == 9


def test_an_instance_refused_for_good_is_not_fetched_again(orthanc_factory, node_factory, tmp_path):
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    good = _images(tmp_path / "in", 2, "good", _today())
    bad = pydicom.dcmread(good[0])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.7x"
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    storescu(orthanc.dicom_port, tmp_path / "bad.dcm", good[1], good[0])
    _route_failures(orthanc, 3)
    quick = {"enabled": True, "interval": 0.5, "grace": 0.0, "window_hours": 24.0}
    node = node_factory(orthanc.dicom_port, port=node_port, catchup=quick, model=False)
    wait_for(lambda: len(_srs(orthanc)) == 2, 60, "the 2 valid images' SRs")
    rounds = node.metrics()["cxr_node_catchup_rounds_total"]
    wait_for(
        lambda: node.metrics()["cxr_node_catchup_rounds_total"] >= rounds + 6, 30, "6 more rounds"
    )
    m = node.metrics()
    assert m['cxr_node_c_store_total{status="0xC000"}'] == 1.0  # moved once, refused once
    assert m["cxr_node_catchup_fetched_total"] == 2.0
    assert m["cxr_node_catchup_errors_total"] == 1.0
    assert _refusals(node.spool) == [("1.2.826.0.1.3680043.8.498.7x", 0xC000)]
    assert node.jobs() == {"sent": 2}
    assert re.search(
        r"3 instances found, 2 already known, 1 refused, 0 waiting \(grace\), 0 fetched, 0 errors",
        node.log_text(),
    )


def test_five_restarts_under_a_steady_stream_lose_nothing_and_duplicate_nothing(
    orthanc_factory, node_factory, tmp_path
):
    """90 images stored into Orthanc at a steady rate while the node is restarted five
    times as a supervisor does it (TERM, then KILL after a few seconds): 90 SRs in Orthanc,
    none twice — the route drops what arrives while the node is down, the catch-up fetches
    it. The restarts follow the stream (one every 5 of its 30 associations), so that it
    runs through all five on any machine. ``CXR_TEST_RESTART_IMAGES`` sets the count."""
    # the 300 with CXR_TEST_RESTART_IMAGES=300 (~3 min); 90 in make test
    n, per_association = int(os.environ.get("CXR_TEST_RESTART_IMAGES", "90")), 3
    step = n // per_association // 6  # five restarts spread over the stream
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    images = _images(tmp_path / "in", n, "restarts", _today())
    start = lambda: node_factory(orthanc.dicom_port, port=node_port, catchup=FAST, model=False)  # noqa: E731
    node = start()
    progress = tmp_path / "associations"
    progress.touch()
    sender = subprocess.Popen(  # 3 images an association, one association a second or so
        [
            "bash",
            "-c",
            " ; ".join(
                f"storescu -aec ORTHANC 127.0.0.1 {orthanc.dicom_port} "
                + " ".join(map(str, images[i : i + per_association]))
                + f" ; echo >> {progress} ; sleep 1"
                for i in range(0, n, per_association)
            ),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for k in range(step, 6 * step, step):
        wait_for(lambda: len(progress.read_text()) >= k, 120, f"{k} associations stored")  # noqa: B023
        stop_process(node.proc, 3)  # TERM, KILL after 3 s
        node = start()
    assert sender.wait(180) == 0
    assert len(orthanc.rest.find("Instance", {"Modality": "DX"})) == n
    wait_for(lambda: len(_srs(orthanc)) >= n, 240, f"{n} SRs in Orthanc")
    srs = _srs(orthanc)
    assert len(srs) == n
    uids = {orthanc.rest.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in srs}
    assert len(uids) == n
    assert node.proc.poll() is None


def test_orthanc_answers_the_counts_that_let_a_study_be_remembered(orthanc_factory, tmp_path):
    """A study is queried again each round unless its answers were complete by the PACS's
    own counts: Orthanc gives them, so a quiet day costs one C-FIND per round."""
    orthanc = orthanc_factory(free_port())
    storescu(orthanc.dicom_port, *_images(tmp_path / "in", 3, "counts", _today()))
    peer = Peer("127.0.0.1", orthanc.dicom_port, "ORTHANC", "CXR_NODE")
    with open_session(peer, "CXR_NODE") as qr:
        [study] = qr.studies("")
        listing = qr.instances(study, ("CR", "DX"))
    assert (study.related, study.series) == ("3", "1")
    assert len(listing.instances) == 3 and listing.complete
