"""The loop of the node's background threads (worker, delivery): one round after another
until told to stop; a round that fails is logged (type and message) and the next one tried,
waiting longer after each failure so that a lasting fault does not flood the log."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

MAX_WAIT = 30.0


def run_rounds(
    step: Callable[[], int],
    stop: threading.Event,
    poll: float,
    name: str,
    log: logging.Logger,
) -> None:
    """Call ``step`` (returns the work done) until ``stop`` is set; when it did nothing, or
    failed, wait ``poll`` seconds (doubled per consecutive failure, at most 30 s)."""
    failures = 0
    while not stop.is_set():
        try:
            busy = step()
            failures = 0
        except Exception as exc:  # never let the thread die of one round
            log.error("%s round failed: %s: %s", name, type(exc).__name__, exc)
            log.debug("%s round failed", name, exc_info=True)
            busy, failures = 0, failures + 1
        if not busy:
            stop.wait(min(MAX_WAIT, max(poll, poll * 2.0**failures)))
