"""Unit: the pipeline's per-batch summary stage (node.process.pipeline)."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest

from node.core.errors import PreprocessError
from node.process import pipeline


class Recording:
    """A Summarizer stand-in: remembers which thread summarised which image."""

    def __init__(self, threads: int, fail: str = "") -> None:
        self.threads, self.fail = threads, fail
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def encode(self, ds: Any, prep: Any, findings: Any, features: Any, now: Any) -> str:
        time.sleep(0.05)
        with self.lock:
            self.seen.append((ds.SOPInstanceUID, threading.current_thread().name))
        if ds.SOPInstanceUID == self.fail:
            raise ValueError("no pixels for this one")
        return f"summary of {ds.SOPInstanceUID}"


def items(n: int) -> list[Any]:
    out: list[Any] = []
    for i in range(n):
        ds = SimpleNamespace(SOPInstanceUID=f"1.2.{i}", get=lambda k, d=None, i=i: f"1.2.{i}")
        out.append(pipeline._Classified(ds, None, (), object()))  # type: ignore[arg-type]
    out.insert(2, PreprocessError("cannot decode"))  # a failed image keeps its place
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_summaries_come_back_in_order_from_as_many_threads_as_asked(threads):
    s = Recording(threads)
    got = pipeline._summaries(s, items(6), datetime(2026, 1, 1))  # type: ignore[arg-type]
    assert got == [f"summary of 1.2.{i}" for i in range(2)] + [None] + [
        f"summary of 1.2.{i}" for i in range(2, 6)
    ]
    assert len({name for _, name in s.seen}) == threads


def test_a_summary_that_fails_in_a_thread_is_none_and_the_others_are_built():
    s = Recording(2, fail="1.2.3")
    got = pipeline._summaries(s, items(6), datetime(2026, 1, 1))  # type: ignore[arg-type]
    assert got[4] is None and got.count(None) == 2  # the failed one, and the error's place
    assert len(s.seen) == 6
