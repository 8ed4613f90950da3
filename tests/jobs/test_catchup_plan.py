"""The catch-up's pure part (node/jobs/catchup.py): the set arithmetic of a round, the grace
period with the clock passed in, StudyDate ranges and the studies not queried again."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

import pytest
from pydicom.dataset import Dataset

from node.jobs.catchup import (
    Done,
    Instance,
    QRSession,
    Study,
    date_range,
    newly_done,
    plan_round,
    split_done,
    study_dates,
    wanted,
)


def _inst(n: int, study: str = "1.1") -> Instance:
    return Instance(study, study + ".1", f"1.2.{n}")


def test_plan_subtracts_known_and_refused_and_waits_out_the_grace_period():
    found = [_inst(i) for i in range(6)] + [_inst(0)]  # a duplicate match counts once
    known, refused = {"1.2.0", "1.2.1"}, {"1.2.2"}
    plan = plan_round(found, known, refused, {}, {}, now=100.0, grace=30.0, limit=10)
    assert (plan.found, plan.known, plan.refused, plan.waiting) == (6, 2, 1, 3)
    assert plan.due == ()  # first seen missing now: live routing may still deliver them
    assert dict(plan.first_seen) == {"1.2.3": 100.0, "1.2.4": 100.0, "1.2.5": 100.0}

    # 20 s later one of them arrived; the others are still within the grace period
    plan = plan_round(found, {*known, "1.2.3"}, refused, plan.first_seen, {}, 120.0, 30.0, 10)
    assert plan.due == () and plan.waiting == 2 and set(plan.first_seen) == {"1.2.4", "1.2.5"}

    # 30 s after they were first seen missing: due, first seen first
    seen = {"1.2.4": 100.0, "1.2.5": 90.0}
    plan = plan_round(found, {*known, "1.2.3"}, refused, seen, {}, 130.0, 30.0, 10)
    assert [i.sop for i in plan.due] == ["1.2.5", "1.2.4"] and plan.waiting == 0


def test_plan_is_bounded_and_puts_failed_fetches_last():
    found = [_inst(i) for i in range(5)]
    seen = {i.sop: 0.0 for i in found}
    plan = plan_round(found, set(), set(), seen, {"1.2.0": 2, "1.2.1": 1}, 10.0, 0.0, 3)
    assert [i.sop for i in plan.due] == ["1.2.2", "1.2.3", "1.2.4"]
    plan = plan_round(found, set(), set(), seen, {"1.2.0": 2, "1.2.1": 1}, 10.0, 0.0, 5)
    assert [i.sop for i in plan.due][-2:] == ["1.2.1", "1.2.0"]


def test_a_refused_instance_is_never_due_and_no_grace_means_at_once():
    found = [_inst(1), _inst(2)]
    for now in (0.0, 100.0, 10_000.0):
        plan = plan_round(found, set(), {"1.2.1"}, {}, {}, now, 0.0, 10)
        assert [i.sop for i in plan.due] == ["1.2.2"] and plan.refused == 1


def test_study_dates_cover_the_window_and_stay_open_ended():
    now = datetime(2024, 3, 2, 1, 30)
    assert study_dates(now, 24.0) == "20240301-"
    assert study_dates(now, 1.0) == "20240302-"
    assert study_dates(now, 24.0 * 40) == "20240122-"
    assert date_range(date(2019, 1, 1), None) == "20190101-"
    assert date_range(date(2019, 1, 1), date(2019, 2, 1)) == "20190101-20190201"
    assert date_range(None, date(2019, 2, 1)) == "-20190201"
    assert date_range(None, None) == ""


def test_studies_known_complete_are_not_queried_again_until_they_change():
    a, b = Study("1.1", "3", ("DX", "SR")), Study("1.2", "2", ())
    assert (
        wanted(a, ("CR", "DX"))
        and wanted(b, ("CR",))
        and not wanted(Study("1.3", "", ("CT",)), ("CR", "DX"))
    )
    found = [_inst(1, "1.1"), _inst(2, "1.1"), _inst(3, "1.2")]
    done = newly_done([a, b], found, missing={"1.2.3"})
    assert done == {"1.1": Done("3", 2)}  # 1.2 still has a missing instance
    todo, unchanged = split_done([a, b], done)
    assert todo == [b] and unchanged == {"1.1": Done("3", 2)}
    todo, unchanged = split_done([Study("1.1", "4", ("DX", "SR")), b], done)  # an SR arrived
    assert [s.uid for s in todo] == ["1.1", "1.2"] and unchanged == {}
    assert newly_done([Study("1.4", "", ())], [], set()) == {}  # size unknown: always queried


def test_a_failed_round_is_logged_and_the_next_one_runs(tmp_path, caplog):
    """No PACS listening: each round fails (type and message logged, one error counted,
    saved for ``status``), and the thread goes on to the next round."""
    import json
    import threading

    from helpers import free_port, wait_for

    from node.core.config import load_config
    from node.core.metrics import Metrics
    from node.jobs.catchup import STATUS_FILE, CatchUp
    from node.store.spool import Spool

    cfg = load_config(
        None,
        {},
        {"destination.port": free_port(), "destination.timeout": 2.0, "catchup.interval": 0.05},
    )
    spool, metrics, stop = Spool(tmp_path / "spool"), Metrics(), threading.Event()
    thread = threading.Thread(target=CatchUp(cfg, spool, metrics).run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: metrics.catchup_rounds._value.get() >= 3, 30, "3 rounds")
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert metrics.catchup_errors._value.get() >= 3
    assert "association to ORTHANC@127.0.0.1" in caplog.text
    last = json.loads((spool.root / STATUS_FILE).read_text())
    assert last["errors"] == 1 and last["error"].startswith("Unreachable: association to")
    spool.close()


class _Pacs:
    """An association whose C-FINDs answer from ``series`` ({uid: (modality, count, sops)})
    and ``study_series`` (the study's NumberOfStudyRelatedSeries); '' leaves a count out."""

    def __init__(self, series: dict[str, tuple[str, str, list[str]]]) -> None:
        self.series = series

    def send_c_find(self, query: Dataset, model: str) -> Iterator[tuple[Dataset, Any]]:
        if query.QueryRetrieveLevel == "SERIES":
            matches = [
                _ds(SeriesInstanceUID=uid, Modality=mod, NumberOfSeriesRelatedInstances=count)
                for uid, (mod, count, _) in self.series.items()
            ]
        else:
            sops = self.series[query.SeriesInstanceUID][2]
            matches = [_ds(SOPInstanceUID=sop) for sop in sops]
        for m in matches:
            yield _ds(Status=0xFF00), m
        yield _ds(Status=0x0000), None


def _ds(**values: Any) -> Dataset:
    ds = Dataset()
    for k, v in values.items():
        if v != "":
            setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("study_series", "dx_count", "dx_listed", "complete"),
    [
        ("2", "3", 3, True),  # every series and every instance listed
        ("3", "3", 3, False),  # a series' answer lost
        ("2", "3", 2, False),  # an instance's answer lost
        ("", "3", 3, False),  # the PACS gives no series count: never remembered as done
        ("2", "", 3, False),  # nor an instance count
    ],
)
def test_a_study_is_complete_only_where_the_pacs_counts_agree(
    study_series, dx_count, dx_listed, complete
):
    sops = [f"1.2.{i}" for i in range(3)][:dx_listed]
    pacs = _Pacs({"1.1.1": ("DX", dx_count, sops), "1.1.2": ("SR", "1", ["1.3.1"])})
    qr = QRSession(pacs, "PACS", "CXR_NODE")  # type: ignore[arg-type]
    listing = qr.instances(Study("1.1", "4", ("DX", "SR"), study_series), ("CR", "DX"))
    assert [i.sop for i in listing.instances] == sops
    assert listing.complete is complete


@pytest.mark.parametrize("complete", [True, False])
def test_a_study_answered_incompletely_is_queried_again_next_round(tmp_path, monkeypatch, complete):
    """Remembered as done (not queried while its count stays) only after complete answers."""
    import threading
    from contextlib import contextmanager

    from node.core.config import load_config
    from node.jobs import catchup
    from node.store.spool import Spool

    queried: list[str] = []

    class Session:
        def studies(self, dates: str, uids: Any = ()) -> list[Study]:
            return [Study("1.1", "1", ("DX", "SR"), "1")]  # one SR series: nothing to fetch

        def instances(self, study: Study, modalities: Any) -> catchup.Listing:
            queried.append(study.uid)
            return catchup.Listing([], complete)

    @contextmanager
    def session(*args: Any, **kwargs: Any) -> Iterator[Session]:
        yield Session()

    monkeypatch.setattr(catchup, "open_session", session)
    spool = Spool(tmp_path / "spool")
    rounds = catchup.CatchUp(load_config(None, {}, {}), spool)
    for _ in range(3):
        rounds.round(threading.Event())
    # incomplete: asked again within each round, then again the next round
    assert queried == ["1.1"] * (1 if complete else 3 * catchup.LISTING_TRIES)
    spool.close()


@pytest.mark.parametrize(
    ("answers", "series", "calls", "complete"),
    [
        ([False, True], "1", 2, True),  # a lost answer: asked again, then complete
        ([False] * 5, "1", 3, False),  # never complete: three tries, then what was listed
        ([False] * 5, "", 1, False),  # no counts from the PACS: nothing says it is short
        ([True], "1", 1, True),
    ],
)
def test_backfill_asks_again_for_a_study_answered_incompletely(
    caplog, answers, series, calls, complete
):
    from node.jobs.catchup import Listing, listed_fully

    asked: list[bool] = []

    class Session:
        def instances(self, study: Study, modalities: Any) -> Listing:
            asked.append(answers[len(asked)])
            return Listing([_inst(len(asked))], asked[-1])

    listing = listed_fully(Session(), Study("1.1", "1", ("DX",), series), ("DX",))  # type: ignore[arg-type]
    assert len(asked) == calls and listing.complete is complete
    assert ("stayed incomplete" in caplog.text) == (calls == 3)
