"""The hang watchdog: a batch that runs past its time ends the process.

A decoder stuck in a loop cannot be interrupted from Python, and may hold the GIL, so the
timer is faulthandler's, which runs in a C thread: past the limit it writes every thread's
stack to ``hang.txt`` in the spool and calls ``_exit(1)``. A supervisor (systemd, Docker)
restarts the node; the job counted one attempt before it started (``Spool.begin``), and at
the limit it is quarantined. The next start reports the hang (:func:`report_last_hang`).
"""

from __future__ import annotations

import faulthandler
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from node.store.spool import Job

log = logging.getLogger(__name__)

HANG_FILE = "hang.txt"
_HEADER = "cxr-node hang watchdog: jobs "


class HangWatchdog:
    """Arms faulthandler's exit timer around each round (``image_timeout`` per image in
    flight: the batch in the model and the one completing beside it)."""

    def __init__(self, spool_root: Path, image_timeout: float) -> None:
        self.path = spool_root / HANG_FILE
        self.image_timeout = image_timeout
        self._file: IO[str] = self.path.open("w", encoding="ascii")

    @contextmanager
    def __call__(self, jobs: Sequence[Job]) -> Iterator[None]:
        if not jobs:
            yield
            return
        self._file.seek(0)
        self._file.truncate()
        ids = " ".join(str(j.id) for j in jobs)
        self._file.write(f"{_HEADER}{ids} started {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        self._file.flush()
        faulthandler.dump_traceback_later(
            self.image_timeout * len(jobs), repeat=False, file=self._file, exit=True
        )
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._file.close()


def report_last_hang(spool_root: Path) -> list[int]:
    """If the last run ended on the watchdog, log it, keep its stacks beside the spool
    (``hang-<time>.txt``) and return the ids of the jobs it was working on."""
    path = spool_root / HANG_FILE
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return []
    if "Timeout" not in text:
        return []
    kept = spool_root / f"hang-{time.strftime('%Y%m%dT%H%M%S')}.txt"
    path.rename(kept)
    first = text.splitlines()[0] if text else ""
    ids = [int(t) for t in first.removeprefix(_HEADER).split(" started")[0].split() if t.isdigit()]
    log.error(
        "the last run exceeded worker.image_timeout on job(s) %s and exited; thread stacks in %s",
        ", ".join(map(str, ids)) or "?",
        kept,
    )
    return ids
