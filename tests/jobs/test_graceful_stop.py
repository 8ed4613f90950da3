"""SIGTERM under incoming traffic, with the node as a real process: it stops taking
C-STOREs, ends its associations, lets the worker finish, closes the job store last and
exits 0 within worker.shutdown_timeout; every image it acknowledged gets its SR after a
restart, and nothing is ever answered from a closed database."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from helpers import Sender, chest_images, free_port, sr_sources, storescp, wait_for

pytestmark = pytest.mark.integration
SHUTDOWN = 10.0


def test_sigterm_under_traffic_exits_0_in_time_and_loses_nothing(node_factory, tmp_path):
    pacs_port, node_port = free_port(), free_port()
    pacs = storescp(tmp_path / "pacs", pacs_port)
    try:
        node = node_factory(
            pacs_port, port=node_port, worker={"shutdown_timeout": SHUTDOWN}, model=False
        )
        images = chest_images(80, "sigterm")
        sender = Sender(node_port)
        thread = threading.Thread(target=sender.send, args=(images, 0.1))  # ~10 images/s
        thread.start()
        wait_for(lambda: len(sender.acked) >= 15, 60, "15 images acknowledged")
        node.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        rc = node.proc.wait(SHUTDOWN + 10)
        took = time.monotonic() - start
        thread.join(120)
        assert rc == 0 and took <= SHUTDOWN + 2, (rc, took)
        text = node.log_text()
        assert "closed database" not in text and "Traceback" not in text
        assert "stopped" in text
        acked = set(sender.acked)
        node_factory(
            pacs_port, port=node_port, model=False
        )  # the restart delivers what was pending
        wait_for(lambda: acked <= sr_sources(tmp_path / "pacs"), 120, "an SR per acked image")
        assert sr_sources(tmp_path / "pacs") <= {str(d.SOPInstanceUID) for d in images}
    finally:
        pacs.terminate()
        pacs.wait(10)
