"""A job that kills or hangs the node, with the node as a real process: after
``worker.max_crash_attempts`` starts it is quarantined, and every other image gets its SR.

The node runs through ``tests/faulty_node.py`` (one image made poisonous); the test plays
the supervisor (systemd, Docker) that restarts it; dcmtk's storescp is the PACS.
"""

from __future__ import annotations

import time

import pytest
from helpers import (
    ROOT,
    Sender,
    chest_images,
    free_port,
    sr_source,
    sr_sources,
    storescp,
    wait_for,
)

from node.dicom.dicomio import read_dataset

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_poison_job_is_quarantined_and_the_others_get_their_srs(node_factory, tmp_path, mode):
    images = chest_images(5, f"poison-{mode}")
    poison = str(images[2].SOPInstanceUID)
    pacs_port, node_port = free_port(), free_port()
    pacs = storescp(tmp_path / "pacs", pacs_port, "--fork")
    start = lambda: node_factory(  # noqa: E731
        pacs_port,
        port=node_port,
        entry=(str(ROOT / "tests" / "faulty_node.py"),),
        env={"CXR_TEST_POISON_UID": poison, "CXR_TEST_POISON_MODE": mode, "CXR_TEST_STAND_IN": "1"},
        # a hang is found after image_timeout; a healthy image may take seconds on a
        # loaded machine (2 s quarantined healthy images under xdist at load 11)
        worker={"image_timeout": 5.0 if mode == "hang" else 30.0, "max_crash_attempts": 3},
        may_exit=True,  # it may meet the poison job at once
    )
    try:
        node = start()
        pending, restarts = list(images), 0
        deadline = time.monotonic() + 240
        while node.jobs().get("quarantined", 0) == 0 or node.jobs().get("sent", 0) < 4:
            assert time.monotonic() < deadline, node.log_text()
            if pending:  # what the dead node did not acknowledge is sent again
                sender = Sender(node_port)
                sender.send(pending)
                pending = [d for d in pending if str(d.SOPInstanceUID) in sender.failed]
            if node.proc.poll() is not None:  # the supervisor's part
                restarts += 1
                assert restarts <= 5, node.log_text()
                node = start()
            time.sleep(0.2)
        assert node.proc.poll() is None  # alive, and serving
        assert restarts == 3  # one start per attempt, then quarantined without starting it
        text = node.log_text()
        assert "quarantined: processing never finished in 3 attempt(s)" in text
        if mode == "hang":
            assert "exceeded worker.image_timeout" in text
            assert list(node.spool.glob("hang-*.txt"))
        status = node.cli("status")
        assert "quarantined=1" in status.stdout and "quarantined" in status.stdout
        every = {str(d.SOPInstanceUID) for d in images}  # the poison's: its notice
        wait_for(lambda: sr_sources(tmp_path / "pacs") == every, 30, "an SR for every image")
        notices = [p for p in (tmp_path / "pacs").iterdir() if read_dataset(p).SeriesNumber == 9903]
        assert [sr_source(p) for p in notices] == [poison]
        wait_for(lambda: node.jobs().get("sent", 0) == 4, 10, "four jobs sent")
    finally:
        pacs.terminate()
        pacs.wait(10)
