"""Network tier: the SCP in-process on an ephemeral loopback port, pynetdicom as the peer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from helpers import NIH, Recorder, drain, fast_paths, peer_associate, send_raw_c_store, wait_for
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from node.analysis.model import load_classifier
from node.core.config import NodeConfig, ScpConfig
from node.jobs.delivery import Delivery
from node.jobs.worker import Worker
from node.net.scp import StoreStatus, start_server
from node.store.spool import Spool

pytestmark = pytest.mark.network


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[int, Spool]]:
    spool = Spool(tmp_path / "spool", fsync=False)
    server = start_server(
        ScpConfig(port=0, allowed_calling_aets=("TESTSCU",)), spool, fast_paths=fast_paths()
    )
    try:
        yield server.server_address[1], spool
    finally:
        server.shutdown()
        spool.close()


def _assoc(port: int, *contexts: str, called: str = "CXR_NODE"):
    ae = AE(ae_title="TESTSCU")
    for cx in contexts:
        ae.add_requested_context(cx, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return peer_associate(ae, "127.0.0.1", port, ae_title=called)


def _ct_dataset() -> pydicom.Dataset:
    ds = pydicom.dcmread(NIH)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    return ds


def test_echo_and_store_spools_before_success(scp):
    port, spool = scp
    assoc = _assoc(port, Verification, SecondaryCaptureImageStorage)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    ds = pydicom.dcmread(NIH)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == StoreStatus.SUCCESS
    [job] = spool.jobs()
    assert job.state == "received" and job.sop_instance_uid == ds.SOPInstanceUID
    stored = pydicom.dcmread(job.image)
    assert stored.PixelData == ds.PixelData
    assert stored.file_meta.TransferSyntaxUID in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )


def test_wrong_called_ae_is_rejected(scp):
    port, _ = scp
    assoc = _assoc(port, Verification, called="SOMEONE_ELSE")
    assert assoc.is_rejected


def test_garbage_dataset_gets_failure_status_and_node_keeps_serving(scp):
    port, spool = scp
    assoc = _assoc(port, ComputedRadiographyImageStorage)
    uid = generate_uid()
    status = send_raw_c_store(
        assoc, ComputedRadiographyImageStorage, uid, b"\xde\xad\xbe\xef" * 7 + b"\x01"
    )
    assoc.release()
    assert "Status" in status
    assert status.Status in (
        StoreStatus.CANNOT_UNDERSTAND,
        StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    )
    assert spool.jobs() == []
    assert list(spool.images.iterdir()) == []
    # the next association is served normally
    assoc = _assoc(port, SecondaryCaptureImageStorage)
    assert assoc.send_c_store(pydicom.dcmread(NIH)).Status == StoreStatus.SUCCESS
    assoc.release()


def _explicit_assoc(port: int, sop_class: str):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    return peer_associate(ae, "127.0.0.1", port, ae_title="CXR_NODE")


def _classifier(weights_dir: Path) -> tuple[NodeConfig, Any]:
    cfg = NodeConfig.model_validate(
        {"model": {"cache_dir": str(weights_dir), "allow_untrained": True, "allow_download": False}}
    )
    return cfg, load_classifier(cfg.model)


def test_a_non_conformant_uid_is_accepted_warned_and_referenced_as_it_is(scp, weights_dir, caplog):
    """A real CR's SOP Instance UID has a leading zero: safe (digits and dots), not
    conformant. It was refused with 0xC000; now it is spooled, classified and referenced."""
    port, spool = scp
    ds = pydicom.dcmread(NIH)
    uid = "999.999.01.23.45.6789"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    assoc = _assoc(port, ds.SOPClassUID)
    with caplog.at_level(logging.WARNING, logger="node"):
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == StoreStatus.SUCCESS
        assert f"UID {uid} is not conformant" in caplog.text
        cfg, classifier = _classifier(weights_dir)
        sent: list[pydicom.Dataset] = []  # the SR as the delivery hands it over
        dest = Recorder(lambda data: sent.append(pydicom.dcmread(BytesIO(data))))
        drain(Worker(spool, classifier, cfg), Delivery(spool, cfg, dest))
    [job] = spool.jobs()
    assert (job.sop_instance_uid, job.state) == (uid, "sent"), job.last_error
    [sr] = [d for d in sent if d.Modality == "SR"]  # the summary image goes with it
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid
    assert f"SOPInstanceUID {uid} is not a conformant UID" in caplog.text


@pytest.mark.parametrize(("uid", "refused"), [("1.2.3", False), ("1.02.3", False), ("1.2.x", True)])
def test_only_unsafe_request_uids_are_refused(uid, refused):
    from node.net.scp import _refusal

    payload = BytesIO(b"")  # an empty data set: what matters is that the UIDs pass
    status = _refusal(payload, ExplicitVRLittleEndian, 2**20, ("TESTSCU", uid, "1.2.3"))
    expected = (
        StoreStatus.CANNOT_UNDERSTAND if refused else StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    )
    assert status == expected


@pytest.mark.parametrize(
    ("tag", "at"),
    [(0x00080018, 0x00080019), (0x00080018, 0x00081030), (0x00080016, 0x00080061)],
)
def test_a_data_set_with_a_second_sop_uid_is_refused(scp, caplog, tag, at):
    """The receiver reads the first (0008,0018), pydicom's full read keeps the last: a
    data set naming two is refused (0xA900) before it is spooled."""
    from test_wire import with_element

    from node.dicom.wire import encoded_element

    port, spool = scp
    ds = pydicom.dcmread(NIH)
    other = "1.2.840.10008.5.1.4.1.1.1.1" if tag == 0x00080016 else generate_uid()
    payload = with_element(ds, encoded_element(tag, "UI", other.encode()), at)
    assoc = _explicit_assoc(port, ds.SOPClassUID)
    with caplog.at_level(logging.WARNING, logger="node.net.scp"):
        status = send_raw_c_store(assoc, ds.SOPClassUID, ds.SOPInstanceUID, payload)
        assoc.release()
    assert status.Status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "ambiguous SOP UIDs" in caplog.text and "repeated or out of order" in caplog.text
    assert spool.jobs() == [] and list(spool.images.iterdir()) == []


def test_ct_and_sr_are_accepted_but_not_classified(scp, weights_dir, tmp_path):
    import numpy as np

    from node.analysis.model import to_findings
    from node.sr.report import (  # an SR of our own, as if routed back
        ReportContext,
        build_sr,
    )

    port, spool = scp
    cfg = NodeConfig.model_validate(
        {
            "model": {
                "cache_dir": str(weights_dir),
                "allow_untrained": True,
                "allow_download": False,
            }
        }
    )
    classifier = load_classifier(cfg.model)
    findings = to_findings(np.full(18, 0.3, dtype=np.float32), classifier.info)
    sr = build_sr(
        pydicom.dcmread(NIH),
        findings,
        classifier.info,
        ReportContext(uid_root=cfg.report.uid_root, device_name="X"),
        __import__("datetime").datetime(2026, 1, 1),
    )
    ct = _ct_dataset()
    assoc = _assoc(port, CTImageStorage, sr.SOPClassUID)
    assert assoc.send_c_store(ct).Status == StoreStatus.SUCCESS
    assert assoc.send_c_store(sr).Status == StoreStatus.SUCCESS
    assoc.release()

    dest = Recorder()
    sent = dest.sent
    drain(Worker(spool, classifier, cfg), Delivery(spool, cfg, dest))
    states = {j.sop_instance_uid: (j.state, j.last_error) for j in spool.jobs()}
    assert states[ct.SOPInstanceUID][0] == "skipped"
    assert "Modality CT" in states[ct.SOPInstanceUID][1]
    assert states[sr.SOPInstanceUID][0] == "skipped"
    assert "not an image" in states[sr.SOPInstanceUID][1]
    assert sent == []
    assert list(spool.reports.iterdir()) == []


def test_association_reactor_serves_releases_survives_aborts_and_times_out(tmp_path):
    """node.net.fast.netopts.association_reactor replaces pynetdicom's loop: same endings."""
    from node.net.fast.netopts import association_reactor

    spool = Spool(tmp_path / "spool", fsync=False)
    # long enough for a loaded machine between two of the messages below
    cfg = ScpConfig(port=0, allowed_calling_aets=("TESTSCU",), network_timeout=3.0)
    server = start_server(cfg, spool)
    ended: list[str] = []
    server.bind(evt.EVT_RELEASED, lambda _e: ended.append("released"))
    server.bind(evt.EVT_ABORTED, lambda _e: ended.append("aborted"))
    port = server.server_address[1]
    try:
        ds = pydicom.dcmread(NIH)
        assoc = _assoc(port, SecondaryCaptureImageStorage)
        [acceptor] = server.active_associations
        assert acceptor._run_reactor.__func__ is association_reactor
        for _ in range(3):  # several messages on one association
            ds.SOPInstanceUID = generate_uid()
            assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
        assoc.release()
        wait_for(lambda: ended == ["released"], 5, "the release")

        _assoc(port, Verification).abort()
        wait_for(lambda: ended[-1:] == ["aborted"], 5, "the peer's abort")

        idle = _assoc(port, Verification)
        wait_for(lambda: not idle.is_established, 30, "the network timeout")
        assert idle.is_aborted
        assert len(spool.jobs()) == 3
        again = _assoc(port, Verification)  # still serving
        assert again.send_c_echo().Status == 0x0000
        again.release()
    finally:
        server.shutdown()
        spool.close()


def _storage_peer(
    contexts: list[tuple[str, list[str]]],
    received: dict[str, tuple[str, pydicom.Dataset]],
    *handlers: Any,
) -> Any:
    """A pynetdicom Storage SCP "PEER" taking ``contexts`` (SOP class, transfer syntaxes),
    that keeps each data set it receives, with its syntax, by SOP Instance UID."""

    def on_store(event: evt.Event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        received[uid] = (event.context.transfer_syntax, event.dataset)
        return int(StoreStatus.SUCCESS)

    ae = AE(ae_title="PEER")
    for sop_class, syntaxes in contexts:
        ae.add_supported_context(sop_class, syntaxes)
    handlers = ((evt.EVT_C_STORE, on_store), *handlers)
    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=list(handlers))


def _push_then_stop(server: Any, paths: list[Path], aet: str, **options: Any) -> Any:
    """``node.tools.push.push`` to ``server`` (no progress display), then the server shut down."""
    import node.tools.push
    from node.net.scu import Peer

    try:
        peer = Peer("127.0.0.1", server.server_address[1], aet, fast_paths=fast_paths())
        return node.tools.push.push(paths, peer, progress_stream=None, **options)
    finally:
        server.shutdown()


def test_push_keeps_one_association_across_chunks(tmp_path, monkeypatch):
    """Chunks whose contexts the open association already has reuse it; the reactor stays
    paused while the worker sends, and every file is acknowledged."""
    import node.tools.push

    spool = Spool(tmp_path / "spool", fsync=False)
    cfg = ScpConfig(port=0, allowed_calling_aets=("CXR_NODE",))
    server = start_server(cfg, spool, fast_paths=fast_paths())
    accepted: list[int] = []
    server.bind(evt.EVT_ACCEPTED, lambda _e: accepted.append(1))
    files = tmp_path / "files"
    files.mkdir()
    uids = []
    for i in range(5):
        ds = pydicom.dcmread(NIH)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        uids.append(ds.SOPInstanceUID)
        ds.save_as(files / f"{i}.dcm", enforce_file_format=True)
    monkeypatch.setattr(node.tools.push, "CHUNK_FILES", 2)
    summary = _push_then_stop(server, [files], "CXR_NODE", associations=1)
    assert (summary.sent, summary.failed) == (5, 0), summary.describe()
    assert len(accepted) == 1
    assert sorted(j.sop_instance_uid for j in spool.jobs()) == sorted(uids)
    spool.close()


def test_push_command_skips_pixel_libraries_and_still_converts_syntaxes(tmp_path):
    """``cxr-node push`` starts without numpy, Pillow and the JPEG plugins (node.core.imports),
    and a file the peer takes only in another uncompressed syntax is still converted by
    pydicom and pynetdicom, values intact."""
    import subprocess
    import sys

    ds = pydicom.dcmread(NIH)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "explicit.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    received: dict[str, tuple[str, pydicom.Dataset]] = {}
    server = _storage_peer([(SecondaryCaptureImageStorage, [ImplicitVRLittleEndian])], received)
    code = (
        "import sys; from node.cli import main; rc = main(sys.argv[1:]); "
        "print('loaded:', *(m for m in ('numpy', 'PIL', 'pylibjpeg') if m in sys.modules)); "
        "sys.exit(rc)"
    )
    port = str(server.server_address[1])
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, "push", str(path), "--port", port, "--aet", "PEER"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sent 1, warnings 0, failed 0" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "loaded:"
    [(syntax, got)] = received.values()
    assert syntax == ImplicitVRLittleEndian
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.PixelData == ds.PixelData


def test_push_names_the_classes_a_peer_refuses_and_sends_the_others(tmp_path, monkeypatch):
    """A chunk whose every context the peer refuses fails alone, without retries; the
    next chunk, of a class the peer takes, still goes."""
    import node.tools.push

    files = tmp_path / "files"
    files.mkdir()
    ds = pydicom.dcmread(NIH)  # Secondary Capture: refused
    ds.save_as(files / "a.dcm", enforce_file_format=True)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(files / "b.dcm", enforce_file_format=True)
    monkeypatch.setattr(node.tools.push, "CHUNK_FILES", 1)
    attempts: list[int] = []
    received: dict[str, tuple[str, pydicom.Dataset]] = {}
    server = _storage_peer(
        [(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])],
        received,
        (evt.EVT_REQUESTED, lambda _e: attempts.append(1)),
    )
    summary = _push_then_stop(server, [files], "PEER", associations=1)
    assert (summary.sent, summary.failed) == (1, 1), summary.describe()
    assert list(received) == [ds.SOPInstanceUID]
    assert (
        "refused every proposed presentation context "
        "(SOP classes 1.2.840.10008.5.1.4.1.1.7 (Secondary Capture Image Storage)"
        in summary.describe()
    )
    assert len(attempts) == 2  # one per chunk: the refused one was not retried


def test_push_inflates_a_deflated_file_for_a_peer_that_takes_it_uncompressed(tmp_path):
    """The fallback decodes the object (File Meta in front, so deflate is undone) and
    lets pynetdicom convert it; one file that cannot go fails alone, never its chunk."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

    files = tmp_path / "files"
    files.mkdir()
    ds = pydicom.dcmread(NIH)
    uids = {}
    for name, syntax in (
        ("a", ExplicitVRLittleEndian),
        ("b", DeflatedExplicitVRLittleEndian),
        ("c", ExplicitVRBigEndian),  # pynetdicom does not convert big endian: fails alone
        ("d", ExplicitVRLittleEndian),
    ):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = syntax
        big = syntax == ExplicitVRBigEndian
        pydicom.dcmwrite(
            files / f"{name}.dcm",
            ds,
            implicit_vr=False,
            little_endian=not big,
            enforce_file_format=not big,
            force_encoding=big,  # pydicom's save_as refuses to write big endian
        )
        uids[name] = ds.SOPInstanceUID
    received: dict[str, tuple[str, pydicom.Dataset]] = {}
    server = _storage_peer([(SecondaryCaptureImageStorage, [ImplicitVRLittleEndian])], received)
    summary = _push_then_stop(server, [files], "PEER", associations=1)
    assert (summary.sent, summary.failed) == (3, 1), summary.describe()
    assert "c.dcm" in summary.describe()
    assert set(received) == {uids["a"], uids["b"], uids["d"]}
    assert received[uids["b"]][1].PixelData == ds.PixelData


def test_push_worker_survives_an_unexpected_error(tmp_path, monkeypatch):
    """A bug in sending one chunk fails that chunk only; the push still ends."""
    import node.tools.push

    calls: list[int] = []
    real = node.tools.push._send_batch

    def flaky(link, batch, summary, progress):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        real(link, batch, summary, progress)

    spool = Spool(tmp_path / "spool", fsync=False)
    cfg = ScpConfig(port=0, allowed_calling_aets=("CXR_NODE",))
    server = start_server(cfg, spool, fast_paths=fast_paths())
    files = tmp_path / "files"
    files.mkdir()
    for i in range(3):
        ds = pydicom.dcmread(NIH)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(files / f"{i}.dcm", enforce_file_format=True)
    monkeypatch.setattr(node.tools.push, "CHUNK_FILES", 1)
    monkeypatch.setattr(node.tools.push, "_send_batch", flaky)
    summary = _push_then_stop(server, [files], "CXR_NODE")
    spool.close()
    assert (summary.sent, summary.failed) == (2, 1)
    assert "boom" in summary.describe()


def test_event_driven_reactors_wake_on_every_send_arrival_and_stop(tmp_path, monkeypatch):
    """node.net.fast.netopts makes pynetdicom's DUL reactors block in select instead of polling.
    With their idle wait set to 10 s, one missed wake-up (a queued PDU, the peer's data,
    a release or a stop) would stall this exchange by 10 s."""
    import time

    import node.net.fast.netopts
    from node.net.fast.netopts import EventDrivenSocket, association_reactor
    from node.net.scu import VERIFICATION, Peer, associate

    monkeypatch.setattr(node.net.fast.netopts, "IDLE_WAIT", 10.0)
    spool = Spool(tmp_path / "spool", fsync=False)
    server = start_server(ScpConfig(port=0, allowed_calling_aets=("TESTSCU",)), spool)
    peer = Peer("127.0.0.1", server.server_address[1], "CXR_NODE", calling_ae_title="TESTSCU")
    ds = pydicom.dcmread(NIH)
    contexts = [
        (VERIFICATION, [ExplicitVRLittleEndian]),
        (ds.SOPClassUID, [ImplicitVRLittleEndian]),
    ]
    start = time.monotonic()
    try:
        with associate(peer, contexts) as assoc:
            dul = assoc.dul
            assert isinstance(dul.socket, EventDrivenSocket)
            assert dul._run_loop_delay == 0
            [acceptor] = server.active_associations
            assert isinstance(acceptor.dul.socket, EventDrivenSocket)
            assert assoc._run_reactor.__func__ is association_reactor  # the requestor's too
            for _ in range(10):
                assert assoc.send_c_echo().Status == 0x0000
                assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
        assert not dul.is_alive()  # released, and the stopped reactor was joined
        assert dul.socket.waker.reader.fileno() == -1  # its self-pipe is closed
        wait_for(lambda: not server.active_associations, 5, "the acceptor to end")
        assert time.monotonic() - start < 5.0
        assert len(spool.jobs()) == 10
    finally:
        server.shutdown()
        spool.close()


def test_an_idle_association_does_not_poll(scp):
    """pynetdicom's own reactor turns ~1000 times a second while idle; ours waits in select."""
    import time

    from node.net.scu import VERIFICATION, Peer, associate

    port, _ = scp
    peer = Peer("127.0.0.1", port, "CXR_NODE", calling_ae_title="TESTSCU")
    with associate(peer, [(VERIFICATION, [ExplicitVRLittleEndian])]) as assoc:
        dul = assoc.dul
        check = dul._is_transport_event
        turns: list[float] = []

        def counted() -> bool:
            turns.append(time.monotonic())
            return check()

        dul._is_transport_event = counted
        time.sleep(0.5)
        dul._is_transport_event = check
    assert 1 <= len(turns) <= 25, len(turns)  # ~10 at one turn per 50 ms


def test_c_store_messages_are_encoded_directly_unless_someone_watches(tmp_path, monkeypatch):
    """The SCP's responses and send_raw's requests come from node.net.fast.cstore; with an
    EVT_DIMSE_SENT handler bound, pynetdicom encodes them (and the handler sees them)."""
    import node.net.fast.netopts
    import node.net.scu
    from node.dicom.wire import split_part10
    from node.net.scu import Peer, associate, reactor_paused, send_raw

    made: list[str] = []
    for module, name in (
        (node.net.fast.netopts, "store_response"),
        (node.net.fast.netopts, "store_request"),
    ):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name: made.append(_n) or _r(*a))
    spool = Spool(tmp_path / "spool", fsync=False)
    server = start_server(ScpConfig(port=0, allowed_calling_aets=("TESTSCU",)), spool)
    peer = Peer("127.0.0.1", server.server_address[1], "CXR_NODE", calling_ae_title="TESTSCU")
    data = NIH.read_bytes()
    sop_class, sop_uid, syntax, start = split_part10(data)
    try:
        with associate(peer, [(sop_class, [syntax])]) as assoc, reactor_paused(assoc):
            status = send_raw(assoc, sop_class, sop_uid, syntax, data[start:], 1, resume=False)
            assert status.Status == StoreStatus.SUCCESS
        assert made == ["store_request", "store_response"]
        seen: list[str] = []
        server.bind(evt.EVT_DIMSE_SENT, lambda e: seen.append(type(e.message).__name__))
        with associate(peer, [(sop_class, [syntax])]) as assoc:
            assoc.bind(evt.EVT_DIMSE_SENT, lambda e: seen.append(type(e.message).__name__))
            status = send_raw(assoc, sop_class, sop_uid, syntax, data[start:], 2)
            assert status.Status == StoreStatus.SUCCESS
        assert made == ["store_request", "store_response"]  # not called again
        assert seen == ["C_STORE_RQ", "C_STORE_RSP"]
        assert [j.sop_instance_uid for j in spool.jobs()] == [sop_uid, sop_uid]
    finally:
        server.shutdown()
        spool.close()


def test_the_reactor_takes_no_message_once_a_pause_was_asked_for():
    """The pause race of pynetdicom's loop: the reactor passes its checkpoint, the sending
    thread clears it, still sees ``_is_paused`` and sends; the reactor must then leave the
    response on the queue for it (pynetdicom's loop took it: "unexpected C-STORE")."""
    import queue
    import threading
    from types import SimpleNamespace

    from node.net.fast.netopts import association_reactor

    class Checkpoint(threading.Event):
        def wait(self, timeout=None):
            passed = super().wait(timeout)
            assoc._kill = True  # one turn
            self.clear()  # the sending thread asks for a pause right after the pass
            assert assoc._is_paused  # ... and sees the reactor shown as paused
            assoc.dimse.msg_queue.put((1, "its response"))  # the response arrives
            return passed

    served: list[object] = []
    assoc = SimpleNamespace(
        _kill=False,
        _is_paused=False,
        _reactor_checkpoint=Checkpoint(),
        dimse=SimpleNamespace(msg_queue=queue.Queue()),
        _serve_request=lambda msg, cx: served.append(msg),
        is_established=False,
        acse=SimpleNamespace(is_aborted=lambda: False),
        dul=SimpleNamespace(is_alive=lambda: True, idle_timer_expired=lambda: False),
    )
    assoc._reactor_checkpoint.set()
    association_reactor(assoc)
    assert served == []
    assert assoc.dimse.msg_queue.get_nowait() == (1, "its response")
