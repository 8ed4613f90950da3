"""Unit: the SCU's reading of C-STORE response statuses (pynetdicom.status categories)."""

from __future__ import annotations

import gc
import os

import pytest
from helpers import closed_port
from pydicom.dataset import Dataset

from node.core.errors import SendError, Unreachable
from node.net.scu import Peer, check_status, echo, status_failure


def response(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


@pytest.mark.parametrize("code", [0x0000, 0x0001, 0xB000, 0xB006, 0xB007, 0xB00A])
def test_success_and_every_warning_mean_stored(code):
    assert status_failure(response(code)) == ""
    assert check_status(response(code), "x") == code


@pytest.mark.parametrize("code", [0xA700, 0xA900, 0xC000, 0x0122, 0xFF00, 0xFE00])
def test_failures_and_statuses_that_are_no_c_store_answer_are_failures(code):
    assert status_failure(response(code, "disk full")).startswith(
        f"C-STORE failed with status 0x{code:04X}"
    )
    with pytest.raises(SendError, match=f"0x{code:04X}"):
        check_status(response(code), "img.dcm")


def test_no_response_is_a_failure():
    assert "no response" in status_failure(None)
    assert "no response" in status_failure(Dataset())


@pytest.mark.network
@pytest.mark.parametrize("fast", [False, True], ids=["stock", "fast"])
def test_a_refused_connection_leaves_no_descriptor_open(fast):
    """Each refused attempt (a PACS down: the destination probe and every retry) closes
    its socket; before, one stayed open per attempt until the garbage collector came
    (the network-edge flood test counted them now and then)."""
    with closed_port() as port:
        peer = Peer("127.0.0.1", port, "PACS", "CXR_NODE", 5.0, None, fast)
        gc.collect()
        gc.disable()  # the collector would close them, and hide it
        try:
            before = _sockets()
            for _ in range(3):
                with pytest.raises(Unreachable, match="refused"):
                    echo(peer)
            assert _sockets() == before
        finally:
            gc.enable()


def _sockets() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in _fds())


def _fds() -> list[str]:
    return [fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
