"""Durability with a real Orthanc and the node as a real process: kill -9, PACS outage,
dead letters, an unwritable spool, SIGTERM. An image answered 0x0000 is never lost."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from helpers import WEIGHTS_NAME, Sender, chest_images, free_port, wait_for

from node.config import ReportConfig
from node.model import sha256_file
from node.uids import sr_instance_uid

pytestmark = pytest.mark.integration


def expected_srs(sop_uids: list[str], weights_dir) -> set[str]:
    sha = sha256_file(weights_dir / WEIGHTS_NAME)
    model_id = f"densenet121-res224-all@{sha[:16]}"
    root = ReportConfig().uid_root
    return {str(sr_instance_uid(root, uid, model_id, sha)) for uid in sop_uids}


def test_kill_9_mid_stream_loses_nothing_that_was_acknowledged(
    orthanc_factory, node_factory, weights_dir
):
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    node = node_factory(orthanc.dicom_port, port=node_port)
    images = chest_images(50, "kill9")
    sender = Sender(node_port)
    # paced, so that the kill lands mid-stream with jobs received, classified and sent
    thread = threading.Thread(target=sender.send, args=(images, 0.15))
    thread.start()
    wait_for(lambda: len(sender.acked) >= 25, 120, "25 acknowledged images")
    # ideally some SRs are already delivered; on a slow machine kill before the stream ends
    wait_for(
        lambda: node.jobs().get("sent", 0) >= 1 or len(sender.acked) >= 45,
        60,
        "a first SR delivered",
    )
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(10)
    thread.join(120)
    assert len(sender.acked) + len(sender.failed) == 50
    assert sender.failed, "the kill should have interrupted the stream"
    node_factory(orthanc.dicom_port, port=node_port)
    want = expected_srs(sender.acked, weights_dir)
    wait_for(lambda: want <= set(orthanc.sr_uids()), 180, "an SR for every acked image")
    got = orthanc.sr_uids()
    assert len(got) == len(set(got)) and set(got) <= expected_srs(
        [str(d.SOPInstanceUID) for d in images], weights_dir
    )


def test_orthanc_outage_all_pending_srs_arrive_once(orthanc_factory, node_factory, weights_dir):
    node_port, dicom_port = free_port(), free_port()
    node = node_factory(dicom_port, port=node_port)  # Orthanc is down: nothing listens there
    images = chest_images(20, "outage")
    sender = Sender(node_port)
    sender.send(images)
    assert len(sender.acked) == 20
    wait_for(
        lambda: node.jobs().get("classified", 0) == 20 and "attempt 2" in node.log_text(),
        120,
        "20 SRs pending after failed delivery attempts",
    )
    orthanc = orthanc_factory(node_port, dicom_port=dicom_port)
    want = expected_srs(sender.acked, weights_dir)
    wait_for(lambda: set(orthanc.sr_uids()) == want, 120, "all 20 SRs in Orthanc")
    wait_for(lambda: node.jobs().get("sent", 0) == 20, 30, "all 20 jobs sent")
    assert sorted(orthanc.sr_uids()) == sorted(want)


def test_wrong_destination_dead_letters_then_retry_delivers(
    orthanc_factory, node_factory, weights_dir
):
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    node = node_factory(free_port(), port=node_port, worker={"max_attempts": 2})
    sender = Sender(node_port)
    sender.send(chest_images(3, "dead"))
    wait_for(lambda: node.jobs().get("dead", 0) == 3, 120, "3 dead-lettered jobs")
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(30) == 0
    listing = node.cli("jobs", "--state", "dead")
    assert listing.returncode == 0 and "dead=3" in listing.stdout
    fixed = node_factory(orthanc.dicom_port, port=node_port)  # config fixed: right port
    retry = fixed.cli("jobs", "retry")
    assert retry.returncode == 0 and "3 job(s) requeued" in retry.stdout
    want = expected_srs(sender.acked, weights_dir)
    wait_for(lambda: set(orthanc.sr_uids()) == want, 120, "the 3 SRs after retry")


def _make_unwritable(path):
    """chmod is no barrier to root: as root, swap the directory for a plain file instead."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    parked = path.with_name(path.name + ".parked")
    path.rename(parked)
    path.write_bytes(b"")

    def restore() -> None:
        path.unlink()
        parked.rename(path)

    return restore


def test_unwritable_spool_answers_a700_and_recovers(orthanc_factory, node_factory, weights_dir):
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    node = node_factory(orthanc.dicom_port, port=node_port)
    restore = _make_unwritable(node.spool / "incoming")
    try:
        refused = Sender(node_port)
        [ds] = chest_images(1, "ro-1")
        assoc = refused._association(ds)
        assert assoc is not None
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0xA700
        assert node.proc.poll() is None
    finally:
        restore()
    sender = Sender(node_port)
    sender.send(chest_images(1, "ro-2"))
    assert len(sender.acked) == 1
    want = expected_srs(sender.acked, weights_dir)
    wait_for(lambda: want <= set(orthanc.sr_uids()), 60, "the SR after recovery")
    assert "refused" in node.log_text()


def test_sigterm_during_processing_exits_cleanly_and_loses_nothing(
    orthanc_factory, node_factory, weights_dir
):
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    node = node_factory(orthanc.dicom_port, port=node_port)
    sender = Sender(node_port)
    sender.send(chest_images(12, "term"))
    assert len(sender.acked) == 12
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(40) == 0
    assert "stopped" in node.log_text()
    status = node.cli("status")
    assert status.returncode == 3 and "node: NOT running" in status.stdout
    node_factory(orthanc.dicom_port, port=node_port)
    want = expected_srs(sender.acked, weights_dir)
    wait_for(lambda: set(orthanc.sr_uids()) == want, 120, "all 12 SRs after restart")
