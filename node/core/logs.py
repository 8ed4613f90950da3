"""Logging for the node's commands: one line per event on stderr, text or JSON.

Every message is escaped (non-printable characters as ``\\xNN``), so that a peer-supplied
value (an AE title, a UID, a comment, a library's warning that echoes a value) can neither
forge a log line nor send terminal escapes. Library noise is kept to what an operator needs:
pydicom's decoders log each failed plugin's traceback at ERROR, though the caller reports
the failure once, so those come only at DEBUG; Python warnings become one log line each.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Any

CONTEXT_FIELDS = ("calling_ae", "sop_instance_uid", "job_id", "sr_uid")
_NOISY = ("pynetdicom", "highdicom")


def escape(text: str) -> str:
    """``text`` with every non-printable character (newlines and ESC too) as ``\\xNN``,
    ``\\uNNNN``; printable Unicode (names in any script) is kept."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, with the event's context fields when it has them."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        out.update(
            {k: escape(str(getattr(record, k))) for k in CONTEXT_FIELDS if hasattr(record, k)}
        )
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _DecoderTracebacks(logging.Filter):
    """pydicom's decoder tracebacks (logged at ERROR before its own exception, which the
    caller reports): kept at DEBUG, dropped otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pydicom") or record.exc_info is None:
            return True
        if record.levelno < logging.ERROR:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class _PeerTracebacks(logging.Filter):
    """pynetdicom's tracebacks (``LOGGER.exception`` on what a peer sent that it cannot
    decode, say): the exception's message on one escaped line, its traceback only at DEBUG.
    A traceback is not escaped, and would carry the peer's bytes as they came."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("pynetdicom") and record.exc_info is not None:
            if not logging.getLogger().isEnabledFor(logging.DEBUG):
                record.exc_info, record.exc_text = None, None
        return True


class _OneLineWarnings(logging.Filter):
    """A captured Python warning as ``Category: message`` (no file, line or source)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings" and isinstance(record.args, tuple) and record.args:
            text = str(record.args[0])
            # warnings.formatwarning: "file:line: Category: message\n  source line\n"
            head = text.splitlines()[0] if text else ""
            parts = head.split(": ", 1)
            record.msg, record.args = (parts[1] if len(parts) == 2 else head), ()
        return True


def setup_logging(level: str, json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if json_format
        else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(_DecoderTracebacks())  # on the handler: it sees every logger's records
    handler.addFilter(_PeerTracebacks())
    handler.addFilter(_OneLineWarnings())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # pydicom logs each of its warnings too: its Python warning would be the same line twice
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    logging.captureWarnings(True)
