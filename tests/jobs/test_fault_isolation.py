"""One image never stops the node: per-image failures, worker rounds, poison-job quarantine.

The worker runs in-process with a real spool and model and a recording destination; faults are
injected by replacing one stage for one image.
"""

from __future__ import annotations

import sqlite3
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import Recorder, chest_images, drain, wait_for
from pydicom.dataset import Dataset

import node.jobs.worker
import node.process.pipeline
from node.analysis.model import load_classifier
from node.core.config import NodeConfig
from node.jobs.delivery import Delivery
from node.jobs.worker import Worker
from node.store.spool import Spool


@pytest.fixture(scope="module")
def classifier(weights_dir: Path):
    return load_classifier(_cfg(weights_dir).model)


def _cfg(weights_dir: Path, **worker: object) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "model": {"cache_dir": str(weights_dir), "allow_untrained": True, "batch_size": 4},
            "worker": {"backoff_base": 0.0001, "backoff_max": 0.0001, **worker},
            # the SRs alone: the summary image's own failures, tests/sr/test_summary.py
            "report": {"summary_image": False},
        }
    )


def _bytes(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _store(spool: Spool, datasets: list[Dataset]) -> list[str]:
    for ds in datasets:
        spool.store(_bytes(ds), ds.SOPInstanceUID, ds.SOPClassUID, "TEST")
    return [str(ds.SOPInstanceUID) for ds in datasets]


def _drain(worker: Worker, delivery: Delivery) -> None:
    drain(worker, delivery)


def _states(spool: Spool) -> dict[str, tuple[str, str]]:
    return {j.sop_instance_uid: (j.state, j.last_error) for j in spool.jobs()}


@pytest.fixture
def node_parts(tmp_path: Path, weights_dir: Path, classifier):
    cfg = _cfg(weights_dir)
    spool = Spool(tmp_path / "spool", fsync=False)
    dest = Recorder()
    yield cfg, spool, Worker(spool, classifier, cfg), dest.sent, Delivery(spool, cfg, dest)
    spool.close()


def _raise_for(uid: str, exc: BaseException, real):
    def stage(ds, *args, **kwargs):
        if str(ds.SOPInstanceUID) == uid:
            raise exc
        return real(ds, *args, **kwargs)

    return stage


@pytest.mark.parametrize(
    ("target", "exc", "stage"),
    [
        ("preprocess", IndexError("arrays used as indices must be of integer type"), "prepro"),
        ("preprocess", RecursionError("maximum recursion depth exceeded"), "prepro"),
        ("preprocess", TypeError("object of type 'NoneType' has no len()"), "prepro"),
        ("skip_reason", TypeError("'NoneType' object is not subscriptable"), "header"),
    ],
)
def test_whatever_one_image_raises_fails_that_image_alone(
    node_parts, monkeypatch, target, exc, stage
):
    _cfg, spool, worker, sent, delivery = node_parts
    uids = _store(spool, chest_images(3, seed=target))
    module = node.process.pipeline if target == "preprocess" else node.jobs.worker
    monkeypatch.setattr(module, target, _raise_for(uids[1], exc, getattr(module, target)))
    _drain(worker, delivery)  # before: the exception left the worker (its thread died)
    states = _states(spool)
    assert [states[u][0] for u in uids] == ["sent", "failed", "sent"]
    reason = states[uids[1]][1]
    assert type(exc).__name__ in reason and str(exc) in reason and stage in reason
    series = [pydicom.dcmread(BytesIO(b)).SeriesNumber for b in sent]
    # the failed image's not-analysed notice, where its header could be read
    assert sorted(series) == [9901, 9901, *([9903] if stage == "prepro" else [])]


def test_an_sr_that_cannot_be_built_fails_that_image_alone(node_parts, monkeypatch):
    _cfg, spool, worker, _sent, delivery = node_parts
    uids = _store(spool, chest_images(2, seed="sr"))
    real = worker.reports.encode

    def encode(ds, findings, now, summary=None):
        if str(ds.SOPInstanceUID) == uids[0]:
            raise KeyError("1.2.840.10008.5.1.4.1.1.6")
        return real(ds, findings, now, summary)

    monkeypatch.setattr(worker.reports, "encode", encode)
    _drain(worker, delivery)
    states = _states(spool)
    assert states[uids[0]][0] == "failed" and "KeyError" in states[uids[0]][1]
    assert "SR" in states[uids[0]][1] and states[uids[1]][0] == "sent"


def test_a_failing_batch_inference_retries_image_by_image(node_parts, monkeypatch):
    _cfg, spool, worker, _sent, delivery = node_parts
    uids = _store(spool, chest_images(3, seed="batch"))
    real = worker.classifier.predict
    poison = 7.0  # the second image's input is marked so that the model 'fails' on it

    def predict(batch: np.ndarray) -> np.ndarray:
        if (batch[:, 0, 0, 0] == poison).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(batch)

    real_pre = node.process.pipeline.preprocess

    def mark(ds, *a, **k):
        out = real_pre(ds, *a, **k)
        if str(ds.SOPInstanceUID) == uids[1]:
            out.array[0, 0, 0] = poison
        return out

    monkeypatch.setattr(worker.classifier, "predict", predict)
    monkeypatch.setattr(node.process.pipeline, "preprocess", mark)
    _drain(worker, delivery)
    states = _states(spool)
    assert [states[u][0] for u in uids] == ["sent", "failed", "sent"]
    assert "inference failed: RuntimeError: CUDA error" in states[uids[1]][1]


def test_the_worker_thread_survives_a_failed_round(node_parts, monkeypatch):
    _cfg, spool, worker, sent, delivery = node_parts
    _store(spool, chest_images(1, seed="round"))
    real, failed = spool.due, set()

    def flaky(state, *args, **kwargs):  # the first round of each thread fails
        if state not in failed:
            failed.add(state)
            raise sqlite3.OperationalError("database is locked")
        return real(state, *args, **kwargs)

    real_deliveries = spool.due_deliveries

    def flaky_deliveries(*args, **kwargs):  # the delivery's query (SRs and notices)
        if "classified" not in failed:
            failed.add("classified")
            raise sqlite3.OperationalError("database is locked")
        return real_deliveries(*args, **kwargs)

    monkeypatch.setattr(spool, "due", flaky)
    monkeypatch.setattr(spool, "due_deliveries", flaky_deliveries)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    delivering = threading.Thread(target=delivery.run, args=(stop,), daemon=True)
    thread.start()
    delivering.start()
    try:
        wait_for(lambda: sent, 90, "the SR after a failed round")
        assert thread.is_alive() and delivering.is_alive()
        assert failed == {"received", "classified"}
    finally:
        stop.set()
        thread.join(10)
        delivering.join(10)


def test_a_job_that_kept_killing_the_process_is_quarantined(node_parts):
    cfg, spool, worker, _sent, delivery = node_parts
    uids = _store(spool, chest_images(3, seed="poison"))
    poison = spool.jobs()[1]
    for _ in range(cfg.worker.max_crash_attempts):  # three starts that never finished
        spool.begin([poison.id])
    _drain(worker, delivery)
    states = _states(spool)
    assert [states[u][0] for u in uids] == ["sent", "quarantined", "sent"]
    assert "never finished in 3 attempt(s)" in states[uids[1]][1]
    assert spool.counts()["quarantined"] == 1
    assert spool.requeue("quarantined") == 1  # `jobs retry --state quarantined`
    [again] = spool.jobs("received")
    assert again.id == poison.id and again.attempts == 0


def test_a_job_started_before_is_worked_on_alone(node_parts, monkeypatch):
    _cfg, spool, worker, _sent, delivery = node_parts
    _store(spool, chest_images(4, seed="suspect"))
    suspect = spool.jobs()[2]
    spool.begin([suspect.id])  # the process died once while this batch ran
    batches: list[list[str]] = []
    real = node.jobs.worker.model_batch

    def recording(datasets, *args):
        batches.append([str(ds.SOPInstanceUID) for ds in datasets])
        return real(datasets, *args)

    monkeypatch.setattr(node.jobs.worker, "model_batch", recording)
    _drain(worker, delivery)
    assert batches[0] == [suspect.sop_instance_uid] and len(batches[1]) == 3
    assert spool.counts()["sent"] == 4


def test_attempts_are_counted_before_the_work(node_parts, monkeypatch):
    _cfg, spool, worker, _sent, _delivery = node_parts
    _store(spool, chest_images(1, seed="count"))
    seen: list[int] = []

    def look(datasets, *args):
        seen.append(spool.jobs()[0].attempts)  # what a crash here would leave behind
        raise SystemExit  # the process 'dies' mid-batch

    monkeypatch.setattr(node.jobs.worker, "model_batch", look)
    with pytest.raises(SystemExit):
        worker.step()
    assert seen == [1] and spool.jobs()[0].state == "received"


def test_a_data_set_with_another_sop_instance_uid_than_received_fails(node_parts):
    _cfg, spool, worker, sent, delivery = node_parts
    [ds] = chest_images(1, seed="two-uids")
    spool.store(_bytes(ds), "1.2.3.4.5", ds.SOPClassUID, "TEST")
    _drain(worker, delivery)
    [job] = spool.jobs()
    assert job.state == "failed" and "not the one it was received as" in job.last_error
    assert not sent


def test_a_real_cr_with_a_modality_lut_sequence_is_classified(node_parts):
    _cfg, spool, worker, sent, delivery = node_parts
    [ds] = chest_images(1, seed="mlut")
    px = ds.pixel_array.astype(np.uint16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 8, 7
    ds.PixelData, ds.PhotometricInterpretation, ds.Modality = px.tobytes(), "MONOCHROME1", "CR"
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.ModalityLUTType = "OD"
    table = [int(v) for v in np.round(np.sqrt(np.arange(256) / 255) * 4095)]
    item.add_new(0x00283006, "US", table)
    ds.ModalityLUTSequence = [item]
    _store(spool, [ds])
    _drain(worker, delivery)  # before: IndexError in preprocess._value_range, the worker died
    [job] = spool.jobs()
    assert job.state == "sent", job.last_error
    assert pydicom.dcmread(BytesIO(sent[0])).Modality == "SR"
