"""Integration: real Orthanc (Lua auto-routing) -> real node process -> SR back in Orthanc."""

from __future__ import annotations

import os
import subprocess
import time
from io import BytesIO

import pydicom
import pytest
from helpers import NIH, WEIGHTS_NAME, wait_for
from reference import xrv_input, xrv_outputs
from sr_tree import codes, nums

from node.analysis.model import sha256_file
from node.sr.codes import pathology_code

pytestmark = pytest.mark.integration


def storescu(port: int, *files: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_orthanc_routes_chest_xray_and_receives_sr_in_same_study(
    orthanc_factory, node_factory, weights_dir, tmp_path
):
    from helpers import free_port

    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    node = node_factory(orthanc.dicom_port, port=node_port)
    src = pydicom.dcmread(NIH)
    before = node.metrics()
    assert before.get('cxr_node_c_store_total{status="0x0000"}', 0.0) == 0.0
    assert before["cxr_node_sr_sent_total"] == 0.0

    done = storescu(orthanc.dicom_port, NIH)
    assert done.returncode == 0, done.stderr

    def sr_ids() -> list[str]:
        return orthanc.rest.find(
            "Instance", {"StudyInstanceUID": src.StudyInstanceUID, "Modality": "SR"}
        )

    ids = wait_for(sr_ids, 90, "the SR to reach Orthanc")
    assert len(ids) == 1, ids
    sr = pydicom.dcmread(BytesIO(orthanc.rest.file(ids[0])))
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.PatientID == src.PatientID

    expected = xrv_outputs(xrv_input(NIH), weights_dir)
    got = nums(sr)
    assert len(got) == 18
    for pathology, value in expected.items():
        assert got[pathology_code(pathology).meaning] == pytest.approx(value, abs=1e-5), pathology
    assert min(expected.values()) < 0.5 < max(expected.values())  # both labels occur
    assert all(0.01 < v < 0.99 for v in expected.values())  # not saturated
    labels = codes(sr)
    for pathology, value in expected.items():
        assert labels[pathology_code(pathology).meaning] == (
            "Present" if value >= 0.5 else "Absent"
        )

    out = tmp_path / "sr.dcm"
    out.write_bytes(orthanc.rest.file(ids[0]))
    check = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True)
    errors = [
        line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")
    ]
    assert errors == []
    dump = subprocess.run(["dsrdump", str(out)], capture_output=True, text=True)
    assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout

    after = node.metrics()
    assert after['cxr_node_c_store_total{status="0x0000"}'] == 1.0
    assert after["cxr_node_sr_sent_total"] == 1.0
    assert after["cxr_node_images_classified_total"] == 1.0
    assert after['cxr_node_jobs{state="sent"}'] == 1.0
    assert after["cxr_node_inference_seconds_count"] == 1.0

    # The same image again: the deterministic SR UID means Orthanc still holds one SR.
    assert storescu(orthanc.dicom_port, NIH).returncode == 0
    wait_for(lambda: node.log_text().count("delivered") >= 2, 60, "the second SR delivery")
    assert len(sr_ids()) == 1
    again = node.metrics()
    assert again['cxr_node_c_store_total{status="0x0000"}'] == 2.0
    assert again["cxr_node_sr_sent_total"] == 2.0

    status = node.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "node: running" in status.stdout and "uptime" in status.stdout
    assert "jobs: received=0 classified=0 sent=2" in status.stdout
    assert "UNTRAINED" in status.stdout
    assert sha256_file(weights_dir / WEIGHTS_NAME) in status.stdout


def test_route_reaches_a_node_restarted_after_kill_9_while_images_keep_coming(
    orthanc_factory, node_factory, tmp_path
):
    """Orthanc's Lua route keeps no association to the node between images: images 0.5 s
    apart kept Orthanc 1.10's cached association (DicomAssociationCloseDelay, default 5 s)
    in use after the node died, and every later image failed on it ("Broken pipe") although
    the restarted node answered. Images routed after the restart must reach it."""
    import signal
    import threading

    from helpers import chest_images, free_port

    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    node = node_factory(orthanc.dicom_port, port=node_port, model=False)  # the route's test
    files = []
    for i, ds in enumerate(chest_images(40, "route-kill")):
        ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["route-kill", str(i)])
        path = tmp_path / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append((path, str(ds.StudyInstanceUID)))

    def has_sr(study: str) -> bool:
        return bool(orthanc.rest.find("Instance", {"StudyInstanceUID": study, "Modality": "SR"}))

    assert storescu(orthanc.dicom_port, files[0][0]).returncode == 0
    wait_for(lambda: has_sr(files[0][1]), 90, "the first SR")  # the route has used the node
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(10)
    restarted = threading.Thread(
        target=node_factory,
        args=(orthanc.dicom_port,),
        kwargs={"port": node_port, "model": False},
    )
    restarted.start()
    sent = 1
    after_restart: list[str] = []
    while len(after_restart) < 4:  # bounded: 39 images at most
        assert sent < len(files), "the node did not come back within 39 images"
        up = not restarted.is_alive()
        path, study = files[sent]
        assert storescu(orthanc.dicom_port, path).returncode == 0
        sent += 1
        if up:
            after_restart.append(study)
        time.sleep(0.5)
    restarted.join()
    for study in after_restart:
        wait_for(lambda: has_sr(study), 90, "the SR of an image routed after the restart")  # noqa: B023


def test_a_lateral_view_routed_through_orthanc_leaves_a_not_analysed_sr_in_its_study(
    orthanc_factory, node_factory, tmp_path
):
    from helpers import free_port
    from pydicom.uid import generate_uid
    from sr_tree import texts

    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    node = node_factory(orthanc.dicom_port, port=node_port, model=False)
    lateral = pydicom.dcmread(NIH)
    lateral.ViewPosition = "LL"
    lateral.SOPInstanceUID = lateral.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "lateral.dcm"
    lateral.save_as(path)
    done = storescu(orthanc.dicom_port, path)
    assert done.returncode == 0, done.stderr

    def study_instances() -> list[dict[str, object]] | None:
        found = orthanc.rest.post(
            "/tools/find",
            {
                "Level": "Instance",
                "Query": {"StudyInstanceUID": lateral.StudyInstanceUID},
                "Expand": True,
            },
        )
        return found if len(found) == 2 else None

    instances = wait_for(study_instances, 60, "the notice beside the lateral view")
    [sr_id] = [
        str(i["ID"])
        for i in instances
        if i["MainDicomTags"]["SOPInstanceUID"] != lateral.SOPInstanceUID
    ]
    sr = pydicom.dcmread(BytesIO(orthanc.rest.file(sr_id)))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == lateral.StudyInstanceUID
    [reason] = texts(sr)["Image not analysed by the AI"]
    assert reason.startswith("not a frontal chest radiograph: ViewPosition LL"), reason
    assert "not analysed" in sr.SeriesDescription
    wait_for(lambda: node.jobs().get("skipped") == 1 or None, 10, "the job skipped")
