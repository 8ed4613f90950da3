"""Unit: the SCU's reading of C-STORE response statuses (pynetdicom.status categories)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from node.core.errors import SendError
from node.net.scu import check_status, status_failure


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
