"""The worker's two batches in flight (``worker.overlap``): the batch before is saved in the
next round, the hang watchdog covers both, a job started before is never in flight with
another, and a stop saves the batch in flight. Real spool and model, a recording
destination."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pytest
from helpers import Recorder, chest_images, drain

import node.process.overlap
from node.analysis.model import load_classifier
from node.core.config import NodeConfig
from node.jobs.delivery import Delivery
from node.jobs.worker import Worker
from node.store.spool import Job, Spool


def _cfg(weights_dir: Path, overlap: bool = True, summary: bool = False) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "model": {"cache_dir": str(weights_dir), "allow_untrained": True, "batch_size": 4},
            "worker": {"overlap": overlap, "backoff_base": 0.0001, "backoff_max": 0.0001},
            "report": {"summary_image": summary},
        }
    )


@pytest.fixture(scope="module")
def classifier(weights_dir: Path):
    return load_classifier(_cfg(weights_dir).model)


class Watched:
    """A watchdog stand-in: the job ids of every round it guarded."""

    def __init__(self) -> None:
        self.rounds: list[list[int]] = []

    @contextmanager
    def __call__(self, jobs: Sequence[Job]) -> Iterator[None]:
        if jobs:
            self.rounds.append([j.id for j in jobs])
        yield


@pytest.fixture
def parts(tmp_path: Path, weights_dir: Path, classifier):
    def make(
        n: int, overlap: bool = True, summary: bool = False
    ) -> tuple[Spool, Worker, Watched, Delivery]:
        cfg = _cfg(weights_dir, overlap, summary)
        spool = Spool(tmp_path / "spool", fsync=False)
        for ds in chest_images(n, seed=f"overlap-{n}"):
            out = BytesIO()
            ds.save_as(out)
            spool.store(out.getvalue(), ds.SOPInstanceUID, ds.SOPClassUID, "TEST")
        watched = Watched()
        worker = Worker(spool, classifier, cfg, watchdog=watched)
        return spool, worker, watched, Delivery(spool, cfg, Recorder())

    made: list[Spool] = []
    yield lambda n, overlap=True, summary=False: (
        made.append((p := make(n, overlap, summary))[0]),
        p,
    )[1]
    for spool in made:
        spool.close()


def _classified(spool: Spool) -> int:
    return sum(j.state == "classified" for j in spool.jobs())


def test_a_batch_is_saved_in_the_next_round_and_the_watchdog_guards_both(parts):
    spool, worker, watched, _delivery = parts(8)
    ids = [j.id for j in spool.jobs()]
    assert worker.step() == 4 and _classified(spool) == 0  # batch 1 in flight
    assert worker.step() == 8 and _classified(spool) == 4  # batch 2 classified, 1 saved
    assert worker.step() == 4 and _classified(spool) == 8  # nothing new: batch 2 saved
    assert worker.step() == 0
    assert watched.rounds == [ids[:4], ids, ids[4:]]


def test_switched_off_a_batch_is_saved_in_its_own_round(parts):
    spool, worker, watched, _delivery = parts(8, overlap=False)
    assert worker.step() == 8 and _classified(spool) == 4
    assert worker.step() == 8 and _classified(spool) == 8
    assert all(len(r) == 4 for r in watched.rounds)


def test_a_job_started_before_is_never_in_flight_with_another(parts):
    spool, worker, watched, delivery = parts(9)
    jobs = spool.jobs()
    suspect = jobs[5]
    spool.begin([suspect.id])  # the process died once while it was in flight
    drain(worker, delivery)
    assert spool.counts()["sent"] == 9
    with_suspect = [r for r in watched.rounds if suspect.id in r]
    assert with_suspect and all(r == [suspect.id] for r in with_suspect)


def test_a_stop_saves_the_batch_in_flight(parts):
    spool, worker, _watched, _delivery = parts(4)
    stop = threading.Event()
    real = worker.step

    def one_round() -> int:
        done = real()
        stop.set()  # SIGTERM after the first round: its batch is still in flight
        return done

    worker.step = one_round  # type: ignore[method-assign]
    worker.run(stop)
    assert _classified(spool) == 4 and worker.overlap.pending is None


def _first_completion_fails(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first batch's completion raises; returns the sizes of the batches completed."""
    real = node.process.overlap.complete
    calls: list[int] = []

    def first_fails(batch, *args):
        calls.append(len(batch.items))
        if len(calls) == 1:
            raise MemoryError("out of memory building the SRs")
        return real(batch, *args)

    monkeypatch.setattr(node.process.overlap, "complete", first_fails)
    return calls


def test_a_batch_whose_completion_raised_is_tried_again_job_by_job(parts, monkeypatch):
    spool, worker, _watched, delivery = parts(3)
    calls = _first_completion_fails(monkeypatch)
    worker.step()
    with pytest.raises(MemoryError):  # the round fails; the worker's loop logs it
        worker.step()
    assert worker.overlap.pending is None
    assert [(j.state, j.attempts) for j in spool.jobs()] == [("received", 1)] * 3
    drain(worker, delivery)
    assert spool.counts()["sent"] == 3 and calls == [3, 1, 1, 1]


def test_with_summary_images_every_job_gets_its_sr_and_summary_image(parts):
    spool, worker, watched, delivery = parts(6, summary=True)
    ids = [j.id for j in spool.jobs()]
    drain(worker, delivery)
    sent = delivery.destination.sent
    assert spool.counts()["sent"] == 6 and len(sent) == 12  # an SR and a summary image each
    assert watched.rounds[:2] == [ids[:4], ids]  # the summary images beside the model


def test_a_job_started_before_is_not_counted_again_until_the_batch_before_is_saved(
    parts, monkeypatch
):
    spool, worker, _watched, _delivery = parts(5)
    *first, suspect = spool.jobs()
    spool.begin([suspect.id])  # the process died once while it was in flight

    def dies(*_args):
        raise SystemExit("the process dies completing jobs 1-4")

    monkeypatch.setattr(node.process.overlap, "complete", dies)
    assert worker.step() == 4  # jobs 1-4 in flight (the suspect is the newest)
    with pytest.raises(SystemExit):
        worker.step()  # the suspect is next: first the batch before it is saved
    attempts = {j.id: j.attempts for j in spool.jobs()}
    assert attempts[suspect.id] == 1  # it was not worked on: no attempt counted
    assert all(attempts[j.id] == 1 for j in first)


def test_a_batch_that_failed_to_save_leaves_the_next_in_flight(parts, monkeypatch):
    spool, worker, _watched, delivery = parts(8)
    calls = _first_completion_fails(monkeypatch)
    jobs = spool.jobs()
    worker.step()
    with pytest.raises(MemoryError):
        worker.step()
    assert [j.id for j in worker._in_flight()] == [j.id for j in jobs[4:]]
    drain(worker, delivery)
    assert spool.counts()["sent"] == 8
    # jobs 5-8 completed from the model's results; jobs 1-4 tried again, each alone
    assert calls == [4, 4, 1, 1, 1, 1]
