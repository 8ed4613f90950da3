"""The not-analysed notice: a skipped, failed or quarantined image leaves a small SR in its
study saying why; delivered like the findings SRs, without ever putting its job back in line
(a stand-in classifier: the model is not the subject)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from helpers import NIH, Recorder, drain, fast_paths, peer_associate
from modelless_node import INFO, StandIn
from sr_tree import texts
from test_delivery import Refusing
from test_report import dciodvfy_errors, needs_dciodvfy

from node.core.config import NodeConfig
from node.dicom.uids import notice_instance_uid
from node.jobs.delivery import Delivery
from node.jobs.worker import Worker
from node.sr.notice import NOTICE_SERIES_NUMBER
from node.store.spool import Spool

ROOT_UID = "1.2.826.0.1.3680043.8.498."


def _cfg(**report: object) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "report": {"uid_root": ROOT_UID, **report},
            "worker": {"max_attempts": 2, "backoff_base": 0.0001, "backoff_max": 0.0001},
            "destination": {"retry_for": 0.000001},
        }
    )


def _store(spool: Spool, ds: pydicom.Dataset) -> None:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    spool.store(buf.getvalue(), str(ds.SOPInstanceUID), str(ds.SOPClassUID), "ORTHANC")


def _variant(uid_suffix: str, **attrs: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(NIH)
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.777.{uid_suffix}"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", fsync=False)


def _run(spool: Spool, cfg: NodeConfig, dest: Recorder | None = None) -> list[pydicom.Dataset]:
    dest = dest or Recorder()
    drain(Worker(spool, StandIn(None, INFO, "cpu"), cfg), Delivery(spool, cfg, dest))
    return [pydicom.dcmread(BytesIO(b)) for b in dest.sent]


@needs_dciodvfy
def test_a_lateral_view_leaves_a_valid_notice_with_its_reason_and_stays_skipped(spool, tmp_path):
    lateral = _variant("1", ViewPosition="LL")
    _store(spool, lateral)
    [sr] = _run(spool, _cfg())
    [job] = spool.jobs()
    assert job.state == "skipped" and "ViewPosition LL" in job.last_error  # its own reason
    assert job.notice == "sent" and job.sr_uid == sr.SOPInstanceUID
    assert sr.SOPInstanceUID == notice_instance_uid(ROOT_UID, lateral.SOPInstanceUID)
    assert sr.StudyInstanceUID == lateral.StudyInstanceUID
    assert sr.SeriesNumber == NOTICE_SERIES_NUMBER and "not analysed" in sr.SeriesDescription
    [reason] = texts(sr)["Image not analysed by the AI"]
    assert reason.startswith("not a frontal chest radiograph: ViewPosition LL")
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == lateral.SOPInstanceUID
    assert dciodvfy_errors(sr, tmp_path) == []


def test_an_undecodable_image_fails_with_a_notice(spool):
    broken = _variant("2")
    broken.PixelData = broken.PixelData[:1000]
    _store(spool, broken)
    [sr] = _run(spool, _cfg())
    [job] = spool.jobs()
    assert job.state == "failed" and job.notice == "sent"
    [reason] = texts(sr)["Image not analysed by the AI"]
    assert reason.startswith("the image could not be analysed: ")


def test_a_quarantined_job_gets_a_notice_and_is_never_worked_on_again(spool):
    _store(spool, _variant("3"))
    [job] = spool.jobs()
    for _ in range(3):
        spool.begin([job.id])  # three starts without an outcome: the node died each time
    [sr] = _run(spool, _cfg())
    [job] = spool.jobs()
    assert job.state == "quarantined" and job.notice == "sent"
    assert "stopped or hung" in texts(sr)["Image not analysed by the AI"][0]


def test_no_notice_when_switched_off_nor_for_what_is_not_a_radiograph(spool, tmp_path):
    _store(spool, _variant("4", ViewPosition="LL"))
    assert _run(spool, _cfg(not_analyzed_notice=False)) == []
    assert spool.jobs()[0].notice == "" and list(spool.reports.iterdir()) == []
    other = Spool(tmp_path / "other", fsync=False)
    _store(other, _variant("5", Modality="CT"))  # routed by mistake: no notice per slice
    assert _run(other, _cfg()) == []
    assert other.jobs()[0].state == "skipped" and other.jobs()[0].notice == ""


def test_a_notice_routed_back_to_the_node_makes_no_notice_of_its_own(spool, tmp_path):
    _store(spool, _variant("6", ViewPosition="LL"))
    [notice] = _run(spool, _cfg())
    again = Spool(tmp_path / "again", fsync=False)
    _store(again, notice)  # a routing mistake sends the node its own notice
    assert _run(again, _cfg()) == []
    [job] = again.jobs()
    assert job.state == "skipped" and "not an image" in job.last_error and job.notice == ""


def test_a_refused_notice_is_dead_lettered_by_the_rules_and_its_job_keeps_its_state(spool):
    _store(spool, _variant("7", ViewPosition="LL"))
    dest = Refusing()
    assert _run(spool, _cfg(), dest) == []
    [job] = spool.jobs()
    assert job.state == "skipped" and job.notice == "dead" and job.attempts == 2
    assert "ViewPosition LL" in job.last_error  # the reason is kept
    assert spool.requeue("dead") == 1  # `cxr-node jobs retry` re-sends it
    dest.refuse = False
    [sr] = _run(spool, _cfg(), dest)
    [job] = spool.jobs()
    assert job.state == "skipped" and job.notice == "sent" and sr.SOPInstanceUID == job.sr_uid


@pytest.mark.network
def test_an_image_the_scp_refused_gets_no_notice(tmp_path):
    """0xA700 (a spool below its free-space floor): the image was not accepted, so nothing
    is owed to its study; the sender is told, and the catch-up fetches it later."""
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    from node.core.config import ScpConfig
    from node.net.scp import StoreStatus, start_server

    full = Spool(tmp_path / "full", fsync=False, min_free_mb=2**40)
    server = start_server(
        ScpConfig(port=0, allowed_calling_aets=("TESTSCU",)), full, fast_paths=fast_paths()
    )
    try:
        lateral = _variant("8", ViewPosition="LL")
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(str(lateral.SOPClassUID))
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = peer_associate(ae, "127.0.0.1", server.server_address[1], ae_title="CXR_NODE")
        assert assoc.send_c_store(lateral).Status == StoreStatus.OUT_OF_RESOURCES
        assoc.release()
        assert full.jobs() == [] and _run(full, _cfg()) == []
        assert list(full.reports.iterdir()) == []
    finally:
        server.shutdown()
        full.close()


def test_notices_pending_and_dead_show_in_status_and_metrics(spool):
    """`cxr-node status` and /metrics count the notices still owed, not only findings SRs."""
    from prometheus_client import generate_latest

    from node.core.metrics import Metrics
    from node.jobs.delivery import read_state

    _store(spool, _variant("8", ViewPosition="LL"))
    _store(spool, _variant("9", ViewPosition="LL"))
    from node.core.errors import Unreachable

    dest = Recorder()
    dest.down = Unreachable("connection refused")
    _run(spool, _cfg(), dest)  # both notices built, neither delivered
    assert spool.notice_counts() == {"pending": 2, "sent": 0, "dead": 0, "failed": 0}
    lines = read_state(spool.root, "PACS").lines(0, 0, spool.notice_counts())
    assert "not-analysed notices pending: 2 (dead-lettered: 0, unreadable: 0)" in lines
    metrics = Metrics()
    metrics.watch_jobs(spool.counts, spool.notice_counts)
    assert b"cxr_node_notice_pending 2.0" in generate_latest(metrics.registry)
