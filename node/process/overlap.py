"""Two batches at once: one batch's summary images and SRs are built in a thread of its own
while the caller runs the model on the next.

The model's OpenMP threads leave part of the cores idle between their parallel regions,
and building summary images is mostly single-threaded work (Pillow, numpy, highdicom):
side by side, they share the cores better than one after the other (bench/RESULTS.md). At
most one batch is in flight: the caller collects it before it submits the next, so results
come back in order and the caller alone decides what happens to them (the worker saves
them in its own thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Generic, TypeVar

from node.core.errors import NodeError
from node.process.pipeline import Classified, Outcome, complete
from node.process.summarize import Summarizer
from node.sr.srtemplate import ReportEncoder

K = TypeVar("K")
Results = list[Outcome | NodeError]


class _Call:
    """A call, in a daemon thread (an interpreter exiting never waits for it) or at once in
    the caller's, and its result, or its exception raised again where the result is asked
    for."""

    def __init__(self, fn: Callable[[], Results], name: str, thread: bool) -> None:
        self._fn = fn
        self._done = threading.Event()
        self._value: Results = []
        self._error: BaseException | None = None
        if thread:
            threading.Thread(target=self._run, name=name, daemon=True).start()
        else:
            self._run()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc
        finally:
            self._done.set()

    def result(self) -> Results:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class Overlap(Generic[K]):
    """Completes batches (:func:`~node.process.pipeline.complete`) one at a time, in a
    thread of its own when ``enabled``, else at once in the caller's thread. ``key`` is the
    caller's name for a batch (its jobs, its rows) and comes back with its results."""

    def __init__(
        self, reports: ReportEncoder, summaries: Summarizer | None, enabled: bool = True
    ) -> None:
        self.reports = reports
        self.summaries = summaries
        self.enabled = enabled
        self._pending: tuple[K, _Call] | None = None

    @property
    def pending(self) -> K | None:
        """The key of the batch not collected yet, if any."""
        return None if self._pending is None else self._pending[0]

    def submit(self, key: K, batch: Classified, now: datetime) -> None:
        """Start completing ``batch``; the one before must have been collected."""
        if self._pending is not None:
            raise RuntimeError("a batch is still in flight: collect it first")
        fn = partial(complete, batch, self.reports, now, self.summaries)
        self._pending = (key, _Call(fn, "complete", thread=self.enabled))

    def collect(self) -> tuple[K, Results] | None:
        """The batch in flight and its results once complete (None if there is none); what
        completing it raised is raised here, and the batch is no longer in flight."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        key, call = pending
        return key, call.result()
