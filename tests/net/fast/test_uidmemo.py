"""node.net.fast.uidmemo: remembered UID checks answer as pydicom's and pynetdicom's own,
keep at most MEMO_SIZE short texts, come off again, and leave an association request with
no regular expression to run for the UIDs it has seen before."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom.valuerep
import pytest
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import StoragePresentationContexts, _config

from node.core.config import ScpConfig
from node.net.fast import fastpaths, uidmemo
from node.net.scp import start_server
from node.net.scu import Peer, associate
from node.store.spool import Spool

TEXTS = [
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.02.3",  # a component with a leading zero: not conformant
    "1.2.3.",
    "",
    "1.2.abc",
    "9" * 64,
    "1." + "2" * 63,  # 65 characters
    "1.2.3 ",
]


@pytest.fixture
def stock() -> Iterator[None]:
    """The library's own checks before and after (other tests' fast-path AEs install the
    remembered ones for the rest of the process)."""
    uidmemo.forget_uid_checks()
    yield
    uidmemo.forget_uid_checks()


def _answers() -> list[Any]:
    """Every check's answer for every text, with the warnings pydicom gives."""
    found: list[Any] = []
    setting = _config.ENFORCE_UID_CONFORMANCE
    try:
        for text in TEXTS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                uid = UID(text)
            found.append((text, [str(w.message) for w in caught]))
            found.append(pydicom.valuerep.VALIDATORS["UI"]("UI", text))
            for enforced in (False, True):
                _config.ENFORCE_UID_CONFORMANCE = enforced
                found.append(_config.VALIDATORS["UI"](text))
            found.append(uid.is_valid)
    finally:
        _config.ENFORCE_UID_CONFORMANCE = setting
    return found


def test_remembered_checks_answer_as_the_librarys_own_twice_over(stock):
    before = _answers()
    assert uidmemo.remember_uid_checks()
    assert _answers() == before  # the first time: computed
    assert _answers() == before  # the second: remembered, the warnings given again


def test_installed_once_and_put_back_whole(stock):
    own = (
        pydicom.valuerep.VALIDATORS["UI"],
        _config.VALIDATORS["UI"],
        inspect.getattr_static(UID, "is_valid"),
    )
    assert uidmemo.remember_uid_checks() and uidmemo.remember_uid_checks()
    installed = pydicom.valuerep.VALIDATORS["UI"]
    assert installed is not own[0] and getattr(installed, uidmemo._MARK) is own[0]
    assert uidmemo.problems() == []  # the guard reads through the remembered ones
    uidmemo.forget_uid_checks()
    assert (
        pydicom.valuerep.VALIDATORS["UI"],
        _config.VALIDATORS["UI"],
        inspect.getattr_static(UID, "is_valid"),
    ) == own


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """pydicom's own UI check, counted (then remembered, where installed, around it)."""
    calls = [0]
    check = pydicom.valuerep.VALIDATORS["UI"]

    def counting(vr: str, value: Any) -> tuple[bool, str]:
        calls[0] += 1
        return check(vr, value)  # type: ignore[no-any-return]

    monkeypatch.setitem(pydicom.valuerep.VALIDATORS, "UI", counting)
    return calls


def test_only_short_texts_are_kept_and_no_more_than_memo_size(stock, monkeypatch):
    calls = _counted(monkeypatch)
    monkeypatch.setattr(uidmemo, "MEMO_SIZE", 8)
    uidmemo.remember_uid_checks()
    check = pydicom.valuerep.VALIDATORS["UI"]
    long = "1." + "2" * 70
    for _ in range(3):
        check("UI", long)
    assert calls[0] == 3  # never kept
    calls[0] = 0
    texts = [f"1.2.{i}" for i in range(20)]
    for text in texts:
        check("UI", text)
    for text in texts[-8:]:
        check("UI", text)
    assert calls[0] == 20  # the last 8 remembered
    check("UI", texts[0])
    assert calls[0] == 21  # the first forgotten: at most MEMO_SIZE kept


ORTHANC_LIKE = [
    (str(cx.abstract_syntax), [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
    for cx in StoragePresentationContexts[:120]
]
"""What Orthanc's route and storescu propose in every association."""


@pytest.mark.network
@pytest.mark.parametrize("fast", [False, True], ids=["stock", "fast"])
def test_an_association_request_seen_before_runs_no_uid_regex(
    stock, monkeypatch, tmp_path: Path, fast
):
    """Both ends in this process: the second association's ~1,000 UIDs run pydicom's
    regular expression again with stock pynetdicom, not with the fast paths."""
    calls = _counted(monkeypatch)
    spool = Spool(tmp_path / "spool", fsync=False)
    server = start_server(
        ScpConfig(port=0, allowed_calling_aets=("TESTSCU",)), spool, fast_paths=fast
    )
    peer = Peer("127.0.0.1", server.server_address[1], "CXR_NODE", "TESTSCU", 10.0, None, fast)
    try:
        with associate(peer, ORTHANC_LIKE) as assoc:
            assert len(assoc.accepted_contexts) > 100
        calls[0] = 0
        with associate(peer, ORTHANC_LIKE) as assoc:
            assert len(assoc.accepted_contexts) > 100
    finally:
        server.shutdown()
        spool.close()
    if fast:
        assert calls[0] < 20, calls[0]
    else:
        assert calls[0] > 1000, calls[0]


def test_a_changed_check_keeps_them_and_every_fast_path_off(stock, monkeypatch, caplog):
    def validate_ui(value: Any, strict: bool = True) -> tuple[bool, str]:
        return True, ""

    monkeypatch.setitem(_config.VALIDATORS, "UI", validate_ui)
    expected = "pynetdicom._config.VALIDATORS['UI'](value, strict) instead of (value)"
    assert uidmemo.problems() == [expected]
    assert expected in fastpaths.problems() and fastpaths.resolve(True) is False
    assert uidmemo.remember_uid_checks() is False
    assert _config.VALIDATORS["UI"] is validate_ui
    assert "UID checks not remembered" in caplog.text
