"""Unit: one batch completed in a thread of its own while the caller goes on
(node.process.overlap); ``complete`` itself is replaced by a stand-in."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import pytest

from node.process import overlap

NOW = datetime(2026, 11, 29, 12, 0, 0)


class Completing:
    """A ``complete`` stand-in: records its thread; waits for ``go`` where given."""

    def __init__(self, go: threading.Event | None = None, fail: bool = False) -> None:
        self.go, self.fail = go, fail
        self.threads: list[str] = []
        self.went: list[bool] = []

    def __call__(self, batch: Any, reports: Any, now: Any, summaries: Any) -> list[Any]:
        self.threads.append(threading.current_thread().name)
        if self.go is not None:
            self.went.append(self.go.wait(5))
        if self.fail:
            raise ValueError("broken encoder")
        return [f"done {batch} at {now:%H:%M}"]


def test_a_batch_completes_beside_the_caller_and_comes_back_with_its_key(monkeypatch):
    go = threading.Event()
    stand_in = Completing(go)
    monkeypatch.setattr(overlap, "complete", stand_in)
    o: overlap.Overlap[str] = overlap.Overlap(None, None)  # type: ignore[arg-type]
    o.submit("jobs 1-4", "batch 1", NOW)  # type: ignore[arg-type]
    assert o.pending == "jobs 1-4"
    go.set()  # the caller goes on while the batch waits: a synchronous submit never returns
    assert o.collect() == ("jobs 1-4", ["done batch 1 at 12:00"])
    assert stand_in.went == [True] and stand_in.threads == ["complete"]
    assert o.pending is None and o.collect() is None


def test_one_batch_in_flight_at_a_time(monkeypatch):
    monkeypatch.setattr(overlap, "complete", Completing())
    o: overlap.Overlap[int] = overlap.Overlap(None, None)  # type: ignore[arg-type]
    o.submit(1, "batch 1", NOW)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="collect it first"):
        o.submit(2, "batch 2", NOW)  # type: ignore[arg-type]
    assert o.collect() == (1, ["done batch 1 at 12:00"])


def test_switched_off_a_batch_completes_in_the_callers_thread(monkeypatch):
    stand_in = Completing()
    monkeypatch.setattr(overlap, "complete", stand_in)
    o: overlap.Overlap[int] = overlap.Overlap(None, None, enabled=False)  # type: ignore[arg-type]
    o.submit(1, "batch 1", NOW)  # type: ignore[arg-type]
    assert stand_in.threads == [threading.current_thread().name]
    assert o.pending == 1
    assert o.collect() == (1, ["done batch 1 at 12:00"]) and o.pending is None


@pytest.mark.parametrize("enabled", [True, False])
def test_what_completing_raised_is_raised_by_collect_and_the_batch_is_gone(monkeypatch, enabled):
    monkeypatch.setattr(overlap, "complete", Completing(fail=True))
    o: overlap.Overlap[int] = overlap.Overlap(None, None, enabled)  # type: ignore[arg-type]
    o.submit(1, "batch 1", NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="broken encoder"):
        o.collect()
    assert o.pending is None and o.collect() is None
    monkeypatch.setattr(overlap, "complete", Completing())
    o.submit(2, "batch 2", NOW)  # type: ignore[arg-type]
    assert o.collect() == (2, ["done batch 2 at 12:00"])
