"""SR delivery (node.jobs.delivery) with a real spool: an outage never dead-letters (simulated
clock), a status refusal does only after destination.retry_for, the C-ECHO probe sends
everything at once when the destination answers again, and every due SR goes over ONE
association to an in-process pynetdicom peer, byte for byte as stored."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from helpers import Recorder, fast_paths, free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.core.config import NodeConfig
from node.core.errors import Unreachable
from node.core.metrics import Metrics
from node.jobs.delivery import STATE_FILE, Delivery, PeerDestination, encoded, read_state
from node.net.scu import BatchResult, Peer
from node.store.spool import Spool

HOUR = 3600.0
REFUSED = "C-STORE of 1.2.3 to PACS: C-STORE failed with status 0xA700 out of resources"


def _sr_file(path: Path, pixels: int = 0) -> str:
    """A small SR as the node stores it: a Part 10 file, Explicit VR Little Endian (with
    ``pixels`` bytes of Pixel Data: a stand-in for an image of that size)."""
    ds = Dataset()
    if pixels:
        ds.BitsAllocated, ds.PixelData = 8, bytes(pixels)
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "DELIVERY"
    ds.ContentDate = "20260101"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _classified(spool: Spool, n: int) -> list[Path]:
    """``n`` jobs with their SR written, waiting for delivery."""
    files = []
    for i in range(n):
        job_id = spool.store(b"image", f"1.2.826.0.1.{i}", "1.2.840.10008.5.1.4.1.1.1", "TEST")
        path = spool.reports / f"{job_id}.dcm"
        spool.mark_classified(job_id, path, _sr_file(path))
        files.append(path)
    return files


def _cfg(**destination: object) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "destination": {"probe_interval": 5.0, "retry_for": "72h", **destination},
            "worker": {"max_attempts": 3, "backoff_base": 2.0, "backoff_max": 60.0},
            "spool": {"keep_delivered": True},
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", fsync=False)
    yield s
    s.close()


class Refusing(Recorder):
    """Answers every C-STORE with a failure status while ``refuse`` is set."""

    refuse = True

    def store(self, items, stop):  # type: ignore[no-untyped-def]
        if self.refuse and self.down is None:
            self.associations += 1
            return BatchResult([REFUSED] * len(items))
        return super().store(items, stop)


def test_an_outage_of_days_counts_nothing_then_a_refusal_dead_letters_only_after_retry_for(
    spool,
):
    clock, dest, metrics = Clock(), Refusing(), Metrics()
    dest.down = Unreachable("association to PACS@127.0.0.1:4242 aborted or unreachable")
    _classified(spool, 3)
    delivery = Delivery(spool, _cfg(), dest, clock=clock, rng=lambda: 1.0, metrics=metrics)
    for _ in range(200):  # 100 hours of outage, probed each time one is due
        delivery.step()
        clock.now += 0.5 * HOUR
    jobs = spool.jobs()
    assert [(j.state, j.attempts, j.last_error) for j in jobs] == [("classified", 0, "")] * 3
    state = read_state(spool.root, "?")
    assert state.up is False and "aborted or unreachable" in state.reason
    assert metrics.destination_up._value.get() == 0
    assert metrics.sr_send_failures.labels("connection")._value.get() == 200
    dest.down = None  # it answers again, but refuses the SRs with a failure status
    delivery.step()
    assert [(j.state, j.attempts) for j in spool.jobs()] == [("classified", 1)] * 3
    assert read_state(spool.root, "?").up is True and dest.associations == 1
    first = clock.now
    while clock.now - first < 72 * HOUR - 1200:  # max_attempts spent many times over
        clock.now += 600.0
        delivery.step()
    assert {j.state for j in spool.jobs()} == {"classified"}
    assert min(j.attempts for j in spool.jobs()) > 3
    clock.now = first + 72 * HOUR + 60
    delivery.step()
    jobs = spool.jobs()
    assert {j.state for j in jobs} == {"dead"} and "0xA700" in jobs[0].last_error
    assert metrics.sr_send_failures.labels("status")._value.get() == sum(j.attempts for j in jobs)
    assert spool.requeue("dead") == 3  # `cxr-node jobs retry` still works for dead jobs
    dest.refuse = False
    delivery.step()
    assert [j.state for j in spool.jobs()] == ["sent"] * 3


def test_the_probe_sends_every_pending_sr_at_once_when_the_destination_answers(spool):
    clock, dest = Clock(), Recorder()
    dest.down = Unreachable("connection refused")
    _classified(spool, 70)
    delivery = Delivery(spool, _cfg(probe_interval=5.0), dest, clock=clock)
    delivery.step()  # finds it down
    dest.down = None
    clock.now += 4.0
    assert delivery.step() == 0  # no probe before probe_interval
    clock.now += 1.0
    assert delivery.step() == 64 and dest.associations == 1  # probed, and a full batch sent
    assert delivery.step() == 6 and dest.associations == 2
    assert spool.counts()["sent"] == 70


def test_a_round_reads_a_bounded_number_of_bytes_summary_images_included(spool, monkeypatch):
    import node.jobs.delivery
    from node.store.spool import summary_path

    files = _classified(spool, 6)
    for path in files[:3]:  # three jobs with a (stand-in) summary image of 3 MiB
        _sr_file(summary_path(path), pixels=3 * 2**20)
    monkeypatch.setattr(node.jobs.delivery, "BATCH_BYTES", 5 * 2**20)
    dest = Recorder()
    delivery = Delivery(spool, _cfg(), dest, clock=Clock())
    sent = []
    while n := delivery.step():
        sent.append((n, len(dest.sent)))
    # one job with its image (the first of a round always goes), then one more image would
    # pass 5 MiB; the last three SRs are small and go together
    assert sent == [(1, 2), (1, 4), (4, 9)] and dest.associations == 3
    assert spool.counts()["sent"] == 6


def test_an_sr_lost_in_flight_goes_to_the_back_of_the_line_uncounted(spool):
    clock = Clock()

    class AbortsOnSecond(Recorder):
        def store(self, items, stop):  # type: ignore[no-untyped-def]
            self.associations += 1
            return BatchResult([""], lost="association to PACS: peer aborted the association")

    files = _classified(spool, 3)
    delivery = Delivery(spool, _cfg(), AbortsOnSecond(), clock=clock)
    delivery.step()
    jobs = spool.jobs()
    assert [j.state for j in jobs] == ["sent", "classified", "classified"]
    assert [j.attempts for j in jobs] == [0, 0, 0]
    assert jobs[1].next_attempt > jobs[2].next_attempt  # the one in flight waits its turn
    assert delivery.state.up is False and files[1].exists()


def _peer(port: int, ae_title: str = "PACS", timeout: float = 5.0) -> Peer:
    return Peer("127.0.0.1", port, ae_title, "CXR_NODE", timeout, fast_paths=fast_paths())


@contextmanager
def _pacs(*sc_syntaxes: str) -> Iterator[dict[str, object]]:
    """An in-process pynetdicom Storage SCP: counts associations, keeps the data set bytes
    of every C-STORE as received, answers 0xA700 for SOP Instance UIDs in ``refuse``; takes
    SRs, and Secondary Captures in ``sc_syntaxes``."""
    seen: dict[str, object] = {"associations": 0, "received": {}, "refuse": set(), "syntax": {}}
    lock = threading.Lock()

    def accepted(_event: evt.Event) -> None:
        with lock:
            seen["associations"] = int(str(seen["associations"])) + 1

    def stored(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        received, syntax = seen["received"], seen["syntax"]
        assert isinstance(received, dict) and isinstance(syntax, dict)
        received[uid] = event.request.DataSet.getvalue()
        syntax[uid] = str(event.context.transfer_syntax)
        return 0xA700 if uid in seen["refuse"] else 0x0000  # type: ignore[operator]

    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    ae.add_supported_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
    if sc_syntaxes:
        ae.add_supported_context(SecondaryCaptureImageStorage, list(sc_syntaxes))
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_ACCEPTED, accepted), (evt.EVT_C_STORE, stored)],
    )
    seen["port"] = port
    try:
        yield seen
    finally:
        server.shutdown()


@pytest.fixture
def pacs() -> Iterator[dict[str, object]]:
    with _pacs() as seen:
        yield seen


@pytest.mark.network
@pytest.mark.parametrize("takes_jpeg", [True, False])
def test_a_jpeg_summary_goes_as_stored_or_decompressed_to_a_pacs_without_jpeg(spool, takes_jpeg):
    import numpy as np
    from helpers import NIH
    from test_summary import CTX, NOW, _model

    from node.analysis.preprocess import preprocess
    from node.dicom.wire import file_meta_bytes
    from node.sr.summary import render
    from node.sr.summarysc import encode_summary
    from node.store.spool import summary_path

    [sr] = _classified(spool, 1)
    src = pydicom.dcmread(NIH)
    pixels = render(preprocess(src, display_max=256).display, [], untrained=True)
    summary = encode_summary(src, pixels, _model(False), CTX, NOW, "jpeg")
    summary_path(sr).write_bytes(summary.data)
    stored = encoded(summary.data, "summary")
    assert stored.transfer_syntax == JPEGBaseline8Bit and len(summary.data) < 60_000
    plain = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    syntaxes = [JPEGBaseline8Bit, *plain] if takes_jpeg else plain
    with _pacs(*syntaxes) as seen:
        peer = _peer(int(str(seen["port"])))
        assert Delivery(spool, _cfg(), PeerDestination(peer)).step() == 1
    [job] = spool.jobs()
    assert job.state == "sent" and seen["associations"] == 1
    received = seen["received"][summary.sop_instance_uid]  # type: ignore[index]
    syntax = seen["syntax"][summary.sop_instance_uid]  # type: ignore[index]
    if takes_jpeg:  # as stored
        assert (syntax, received) == (JPEGBaseline8Bit, stored.dataset)
        return
    assert syntax == ExplicitVRLittleEndian  # decompressed, as RGB
    meta = file_meta_bytes(SecondaryCaptureImageStorage, summary.sop_instance_uid, syntax)
    got = pydicom.dcmread(BytesIO(meta + received))
    assert got.PhotometricInterpretation == "RGB" and got.pixel_array.shape == pixels.shape
    assert np.abs(got.pixel_array.astype(int) - pixels).mean() < 3  # JPEG at quality 95


def test_due_srs_go_over_one_association_as_stored_bytes(spool, pacs):
    files = _classified(spool, 12)
    refused = encoded(files[4].read_bytes(), "x").sop_instance_uid
    pacs["refuse"].add(refused)  # type: ignore[attr-defined]
    peer = _peer(int(str(pacs["port"])))
    delivery = Delivery(spool, _cfg(), PeerDestination(peer))
    assert delivery.step() == 12
    assert pacs["associations"] == 1
    received = pacs["received"]
    assert isinstance(received, dict) and len(received) == 12
    for path in files:  # the data set bytes exactly as in the file (after its meta group)
        e = encoded(path.read_bytes(), path.name)
        assert received[e.sop_instance_uid] == e.dataset
        assert path.read_bytes().endswith(e.dataset) and len(e.dataset) > 100
    states = {j.sr_uid: (j.state, j.attempts) for j in spool.jobs()}
    assert states.pop(refused) == ("classified", 1)  # a status failure counts
    assert set(states.values()) == {("sent", 0)}
    status = json.loads((spool.root / STATE_FILE).read_text())
    assert status["up"] is True and status["name"] == f"PACS@127.0.0.1:{pacs['port']}"


def test_an_unreachable_peer_counts_nothing_and_the_echo_probe_finds_it_back(spool, pacs):
    _classified(spool, 2)
    down = _peer(free_port(), timeout=2.0)
    clock = Clock()
    delivery = Delivery(spool, _cfg(probe_interval=1.0), PeerDestination(down), clock=clock)
    delivery.step()
    refused = f"connection refused by 127.0.0.1:{down.port}"  # the same words as echo, push
    assert delivery.state.up is False and refused in delivery.state.reason
    assert [(j.state, j.attempts) for j in spool.jobs()] == [("classified", 0)] * 2
    delivery.destination = PeerDestination(_peer(int(str(pacs["port"]))))
    clock.now += 1.0
    assert delivery.step() == 2 and pacs["associations"] == 2  # the C-ECHO, then the SRs
    assert spool.counts()["sent"] == 2 and delivery.state.up is True


def test_a_rejected_association_is_a_connection_failure(spool, pacs):
    _classified(spool, 1)
    wrong = _peer(int(str(pacs["port"])), "NOT_PACS")
    delivery = Delivery(spool, _cfg(), PeerDestination(wrong))
    delivery.step()
    [job] = spool.jobs()
    assert (job.state, job.attempts) == ("classified", 0)
    assert (  # the same words as echo and push, with both AE titles
        "rejected (permanent) by the service user: called AE title not recognised "
        "(calling AE CXR_NODE, called AE NOT_PACS)" in delivery.state.reason
    )
    lines = read_state(spool.root, "?").lines(pending=1, dead=0)
    assert lines[0].startswith(f"destination NOT_PACS@127.0.0.1:{pacs['port']}: unreachable since")
