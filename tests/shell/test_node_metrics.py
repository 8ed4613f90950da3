"""What an operator alerts on, scraped from a running node's /metrics: rejected associations
by reason, whether the model is trained, and when the catch-up last ran."""

from __future__ import annotations

import time

import pytest
from helpers import free_port, peer_associate, wait_for
from pynetdicom import AE

pytestmark = pytest.mark.integration
REJECTED = "cxr_node_associations_rejected_total"


def _associate(port: int, calling: str, called: str) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = peer_associate(ae, "127.0.0.1", port, ae_title=called)
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established


def test_rejections_by_reason_the_model_gauge_and_the_catch_up_clock(node_factory):
    started = time.time()
    node = node_factory(free_port(), model=False, catchup={"enabled": True, "interval": 0.5})
    assert not _associate(node.port, "STRANGER", "CXR_NODE")
    assert not _associate(node.port, "STRANGER", "CXR_NODE")
    assert not _associate(node.port, "ORTHANC", "NOT_THE_NODE")
    assert _associate(node.port, "ORTHANC", "CXR_NODE")
    m = node.metrics()
    assert m[f'{REJECTED}{{reason="calling_ae_title_not_recognized"}}'] == 2.0
    assert m[f'{REJECTED}{{reason="called_ae_title_not_recognized"}}'] == 1.0
    assert m["cxr_node_associations_total"] == 1.0
    assert m["cxr_node_model_trained"] == 0.0  # the stand-in, like untrained weights
    last = wait_for(
        lambda: node.metrics().get("cxr_node_catchup_last_round_timestamp_seconds"),
        20,
        "a catch-up round (its peer is down: the round fails, and still counts)",
    )
    assert started - 1 <= last <= time.time()
