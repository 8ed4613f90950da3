"""Log lines: peer-supplied text escaped, library tracebacks and warnings kept to one line."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest

from node.core.logs import escape, setup_logging


@pytest.fixture
def captured(monkeypatch):
    def run(json_format: bool, emit) -> str:
        stream = io.StringIO()
        monkeypatch.setattr("sys.stderr", stream)
        setup_logging("INFO", json_format)
        emit()
        for handler in logging.getLogger().handlers:
            handler.flush()
        return stream.getvalue()

    yield run
    logging.getLogger().handlers.clear()
    logging.captureWarnings(False)


FORGED = "EVIL\n2026-01-01 00:00:00,000 INFO node.net.scp: FORGED ok\x1b[31m"


def test_escape_keeps_printable_text_and_escapes_the_rest():
    assert escape("Müller^Jürgen 山田") == "Müller^Jürgen 山田"
    assert escape("a\nb\x1b[31m\x00") == "a\\nb\\x1b[31m\\x00"


@pytest.mark.parametrize("json_format", [False, True])
def test_a_forged_line_stays_on_one_escaped_line(captured, json_format):
    out = captured(
        json_format,
        lambda: logging.getLogger("node.net.scp").warning(
            "association from %s rejected", FORGED, extra={"calling_ae": FORGED}
        ),
    )
    assert out.count("\n") == 1 and "\x1b" not in out
    text = json.loads(out)["message"] if json_format else out
    assert "EVIL\\n2026-01-01" in text and "\\x1b[31m" in text
    if json_format:
        assert json.loads(out)["calling_ae"] == escape(FORGED)


def test_pydicom_decoder_tracebacks_only_at_debug(captured):
    def emit() -> None:
        try:
            raise ValueError("Unable to decode as exceptions were raised by all plugins")
        except ValueError as exc:
            logging.getLogger("pydicom.pixels.decoders.base").exception(exc)
        logging.getLogger("pydicom").error("a plain pydicom error stays")

    out = captured(False, emit)
    assert "Traceback" not in out and "Unable to decode" not in out
    assert "a plain pydicom error stays" in out


def test_pynetdicom_tracebacks_are_one_escaped_line(captured):
    """What stock pynetdicom logs when a peer's A-ASSOCIATE-RQ carries a forged AE title:
    the exception on one escaped line, no traceback with the raw bytes."""

    def emit() -> None:
        try:
            raise ValueError(f"Invalid value for an AE: {FORGED!s}")
        except ValueError as exc:
            logging.getLogger("pynetdicom.dul").exception(exc)

    out = captured(False, emit)
    assert out.count("\n") == 1 and "\x1b" not in out and "Traceback" not in out
    assert "Invalid value for an AE: EVIL\\n2026-01-01" in out


def test_a_python_warning_is_one_line(captured):
    text = warnings.formatwarning(
        "The string 'Covid0000' is unlikely to be a person name", UserWarning, "/x/base.py", 199
    )
    out = captured(False, lambda: logging.getLogger("py.warnings").warning("%s", text))
    assert out.count("\n") == 1 and "base.py" not in out
    assert "py.warnings: UserWarning: The string 'Covid0000'" in out
