"""network.fast_paths: the switch really routes through stock pynetdicom, the guard turns
the fast paths off (one WARNING) on a pynetdicom they were not written for and the node
still serves and sends, and every write to a peer that stops reading is bounded."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from helpers import NIH, ROOT, free_port, wait_for
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

import node.net.scu
import node.tools.push
from node.core.config import ScpConfig
from node.core.errors import AssociationRejected, Unreachable
from node.dicom.dicomio import Encoded, split_encoded
from node.net.fast import fastpaths
from node.net.fast.sockopts import MeteredSocket
from node.net.scp import StoreStatus, start_server
from node.net.scu import Peer, associate, echo, store_encoded
from node.store.spool import Spool

pytestmark = pytest.mark.network

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
FAST_PATHS_ENV = "CXR_NODE_NETWORK__FAST_PATHS"
PRETEND = "CXR_TEST_PYNETDICOM_VERSION"  # tests/pretend_pynetdicom.py


def patched(obj: Any) -> list[str]:
    """The methods of ``obj``'s class that ``obj`` carries replacements for, other than
    pynetdicom's own (its ACSE swaps ``Association.abort`` for another of its methods)."""
    return sorted(
        name
        for name, value in vars(obj).items()
        if callable(getattr(type(obj), name, None))
        and not getattr(getattr(value, "__func__", None), "__module__", "").startswith("pynetdicom")
    )


def patches(assoc: Any) -> list[str]:
    """Every pynetdicom method replaced on an association or the objects it drives, and
    any pynetdicom class swapped for another."""
    dul = assoc.dul
    found = [f"assoc.{n}" for n in patched(assoc)]
    found += [f"dul.{n}" for n in patched(dul)]
    found += [f"dimse.{n}" for n in patched(assoc.dimse)]
    found += [f"state_machine.{n}" for n in patched(dul.state_machine)]
    found += [f"to_provider_queue.{n}" for n in patched(dul.to_provider_queue)]
    if dul.socket is not None:
        found += [f"socket.{n}" for n in patched(dul.socket)]
        if type(dul.socket) not in (AssociationSocket, MeteredSocket):
            found.append(f"socket class {type(dul.socket).__name__}")
    return found


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", fsync=False)
    yield s
    s.close()


def _serve(spool: Spool, fast: bool, aet: str = "TESTSCU") -> Any:
    return start_server(ScpConfig(port=0, allowed_calling_aets=(aet,)), spool, fast_paths=fast)


def _encoded(path: Path) -> Encoded:
    return split_encoded(path.read_bytes(), str(path))


def _sr(tmp_path: Path) -> Path:
    """A small SR (the node's own SR builder is not what these tests are about)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = SR_CLASS
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("fast", [False, True], ids=["stock", "fast"])
def test_the_switch_routes_through_stock_pynetdicom(spool, tmp_path, fast):
    """fast_paths=False: neither end of an association carries a replaced pynetdicom
    method or class (the check finds them with fast_paths=True), but for the SCP's read
    limits (MeteredSocket: pynetdicom's socket, its recv() counted), and an image and an
    SR go over it and are stored."""
    server = _serve(spool, fast)
    peer = Peer("127.0.0.1", server.server_address[1], "CXR_NODE", "TESTSCU", 10.0, None, fast)
    items = [_encoded(NIH), _encoded(_sr(tmp_path))]
    seen: dict[str, list[str]] = {}
    try:
        with associate(peer, [(e.sop_class_uid, [e.transfer_syntax]) for e in items]) as assoc:
            [acceptor] = server.active_associations
            seen = {"requestor": patches(assoc), "acceptor": patches(acceptor)}
            sockets = {"requestor": type(assoc.dul.socket), "acceptor": type(acceptor.dul.socket)}
        result = store_encoded(peer, items)
        echo(peer)
        contexts = server.ae.supported_contexts
    finally:
        server.shutdown()
    if fast:
        assert (
            "assoc._run_reactor" in seen["requestor"] and "dul._read_pdu_data" in seen["acceptor"]
        )
        assert "socket class EventDrivenSocket" in seen["acceptor"]
    else:
        assert seen == {"requestor": [], "acceptor": []}
        assert {type(cx) for cx in contexts} == {PresentationContext}
        assert sockets == {"requestor": AssociationSocket, "acceptor": MeteredSocket}
    assert result.failures == ["", ""] and not result.lost
    stored = {pydicom.dcmread(job.image).SOPClassUID for job in spool.jobs()}
    assert stored == {pydicom.dcmread(NIH).SOPClassUID, SR_CLASS}


def _wrap_decode_pdu(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's ``_decode_pdu`` with one more parameter: it still works, but it is not
    the method the fast paths were written against."""
    real = DULServiceProvider._decode_pdu

    def _decode_pdu(self: Any, bytestream: bytearray, strict: bool = True) -> Any:
        return real(self, bytestream)

    monkeypatch.setattr(DULServiceProvider, "_decode_pdu", _decode_pdu)


@pytest.mark.parametrize(
    ("cause", "named"),
    [
        (lambda mp: mp.setattr(pynetdicom, "__version__", "4.0.0"), "version 4.0.0 is not 3.0.x"),
        (_wrap_decode_pdu, "DULServiceProvider._decode_pdu(self, bytestream, strict=True)"),
        (
            lambda mp: mp.setattr(
                fastpaths, "METHODS", (*fastpaths.METHODS, ("pynetdicom.dul.DUL", "_gone", "()"))
            ),
            "DUL._gone is missing",
        ),
        (
            lambda mp: mp.setattr(
                fastpaths,
                "ASSOCIATION_ATTRIBUTES",
                ("dul._gone", *fastpaths.ASSOCIATION_ATTRIBUTES),
            ),
            "Association.dul._gone is missing",
        ),
    ],
    ids=["version", "signature", "method", "attribute"],
)
def test_an_unknown_pynetdicom_turns_the_fast_paths_off_and_the_node_serves_and_sends(
    spool, monkeypatch, caplog, cause, named
):
    assert fastpaths.resolve(True)  # the installed pynetdicom: on
    cause(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="node.net.fast.fastpaths"):
        fast = fastpaths.resolve(True)
    assert fast is False
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"pynetdicom {pynetdicom.__version__}: network fast paths off" in line
    assert named in line
    server = _serve(spool, fast)
    peer = Peer("127.0.0.1", server.server_address[1], "CXR_NODE", "TESTSCU", 10.0, None, fast)
    try:
        echo(peer)  # C-ECHO
        with associate(peer, [(pydicom.dcmread(NIH).SOPClassUID, [ImplicitVRLittleEndian])]) as a:
            assert patches(a) == [] and patches(server.active_associations[0]) == []
            assert a.send_c_store(pydicom.dcmread(NIH)).Status == StoreStatus.SUCCESS
    finally:
        server.shutdown()
    assert len(spool.jobs()) == 1


def test_fast_paths_off_by_configuration_are_not_checked_and_warn_nothing(caplog, monkeypatch):
    monkeypatch.setattr(pynetdicom, "__version__", "4.0.0")
    with caplog.at_level(logging.DEBUG, logger="node.net.fast.fastpaths"):
        assert fastpaths.resolve(False) is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "network.fast_paths = false" in caplog.text


# -- every write bounded ------------------------------------------------------------------
class _Deaf(AssociationSocket):
    """An association socket that never reads again."""

    @property
    def ready(self) -> bool:
        time.sleep(0.005)
        return False


@pytest.fixture
def deaf_peer() -> Iterator[int]:
    """A Storage SCP that accepts the association, then stops reading (a tiny receive
    buffer: the sender's writes stall after a few hundred kB)."""

    def small_buffer(event: evt.Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def deafen(event: evt.Event) -> None:
        event.assoc.dul.socket.__class__ = _Deaf

    ae = AE(ae_title="DEAF")
    ae.network_timeout = ae.dimse_timeout = 60
    ae.add_supported_context(pydicom.dcmread(NIH).SOPClassUID, ImplicitVRLittleEndian)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_CONN_OPEN, small_buffer), (evt.EVT_ACCEPTED, deafen)],
    )
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()  # aborts: a sender still blocked would see the connection close


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "stock"])
def test_a_peer_that_stops_reading_holds_the_sender_for_the_timeout_only(
    deaf_peer, monkeypatch, fast
):
    """32 MiB to a peer that reads nothing: the write stalls, and after ``timeout``
    seconds without progress the association ends, its threads too, and store_encoded
    returns (send_now's write holds the DUL's lock: unbounded, it kept the sender, the DUL
    thread and kill() waiting for ever; stock pynetdicom's DUL thread, on a socket without
    a timeout, too)."""
    timeout = 1.0
    peer = Peer("127.0.0.1", deaf_peer, "DEAF", "TESTSCU", timeout, None, fast)
    ds = pydicom.dcmread(NIH)
    item = Encoded(str(ds.SOPClassUID), "1.2.3.4", ImplicitVRLittleEndian, bytes(32 * 2**20))
    opened: list[Any] = []
    real = node.net.scu.associate

    @contextmanager
    def recorded(*args: Any) -> Iterator[Any]:
        with real(*args) as assoc:
            opened.append(assoc)
            yield assoc

    monkeypatch.setattr(node.net.scu, "associate", recorded)
    outcome: list[Any] = []

    def send() -> None:
        start = time.monotonic()
        outcome.append(store_encoded(peer, [item]))
        outcome.append(time.monotonic() - start)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(timeout + 10)
    assert not sender.is_alive(), "the sender is still blocked writing to the peer"
    result, took = outcome
    assert result.failures == [] and result.lost, result
    assert took < timeout + 5
    [assoc] = opened
    wait_for(lambda: not (assoc.is_alive() or assoc.dul.is_alive()) or None, 5, "its threads")


# -- AssociationRejected --------------------------------------------------------------------
def test_a_rejected_association_raises_its_own_type(spool):
    server = _serve(spool, True)
    port = server.server_address[1]
    try:
        with pytest.raises(AssociationRejected, match="rejected"):
            echo(Peer("127.0.0.1", port, "NOT_US", "TESTSCU", 5.0))
    finally:
        server.shutdown()
    with pytest.raises(Unreachable) as refused:
        echo(Peer("127.0.0.1", free_port(), "ANY", "TESTSCU", 5.0))
    assert not isinstance(refused.value, AssociationRejected)


def test_push_retries_an_unreachable_peer_even_when_its_message_says_rejected(
    tmp_path, monkeypatch, caplog
):
    """push tells a rejection by its type: an unreachable peer whose AE title is
    "rejected" is retried (matching the message's text gave up at once)."""
    monkeypatch.setattr(node.tools.push.time, "sleep", lambda s: None)
    peer = Peer("127.0.0.1", free_port(), "rejected", "CXR_PUSH", 2.0)
    with caplog.at_level(logging.WARNING, logger="node.tools.push"):
        summary = node.tools.push.push([NIH], peer, associations=1, progress_stream=None)
    assert summary.failed == 1 and "connection refused" in summary.unreachable
    assert "retrying (2/3)" in caplog.text


# -- the node as a process ------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({FAST_PATHS_ENV: "false"}, None),
        ({FAST_PATHS_ENV: "true", PRETEND: "4.0.0"}, "pynetdicom 4.0.0: network fast paths off"),
    ],
    ids=["configured", "unknown-pynetdicom"],
)
def test_the_node_without_fast_paths_receives_classifies_and_delivers(
    node_factory, tmp_path, env, expected
):
    """The node as a process with stock pynetdicom (configured so, or by the guard on a
    pynetdicom that says it is 4.0.0): it answers C-ECHO, takes a C-STORE and C-STOREs
    the SR to the destination (an in-process SCP, stock too)."""
    spool = Spool(tmp_path / "pacs", fsync=False)  # the node's is tmp_path / "spool"
    pacs = start_server(
        ScpConfig(ae_title="ORTHANC", port=0, allowed_calling_aets=("CXR_NODE",)),
        spool,
        fast_paths=False,
    )
    try:
        proc = node_factory(
            pacs.server_address[1],
            entry=(str(ROOT / "tests" / "pretend_pynetdicom.py"),),  # the stand-in model
            env=env,
        )
        node_peer = Peer("127.0.0.1", proc.port, "CXR_NODE", "TESTSCU", 10.0, None, False)
        echo(node_peer)
        assert store_encoded(node_peer, [_encoded(NIH)]).failures == [""]
        wait_for(lambda: _modalities(spool) == ["SR"] or None, 30, "the SR delivered")
    finally:
        pacs.shutdown()
        spool.close()
    log = proc.log.read_text()
    assert "listening as CXR_NODE" in log and "(stock pynetdicom)" in log
    warned = [ln for ln in log.splitlines() if "network fast paths off" in ln]
    assert warned == ([] if expected is None else [warned[0]])
    assert expected is None or (expected in warned[0] and " WARNING " in warned[0])


def _modalities(spool: Spool) -> list[str]:
    return sorted(
        str(pydicom.dcmread(j.image, stop_before_pixels=True).Modality) for j in spool.jobs()
    )


def test_metered_socket_overrides_nothing_of_pynetdicom_but_recv():
    overridden = {
        n for n, v in vars(MeteredSocket).items() if callable(v) and not n.startswith("_")
    }
    assert overridden == {"recv"} and issubclass(MeteredSocket, AssociationSocket)


@pytest.mark.parametrize("kind", ["pynetdicom", "metered", "fast"])
def test_a_connection_shut_down_and_gone_is_closed_all_the_same(kind):
    """The gate hung up on a pending connection (shutdown) and the peer closed its end
    before the state machine's AA-5 shut it down again: that second shutdown raises
    ENOTCONN, and pynetdicom's ``_shutdown_socket`` then skips the close (the descriptor
    stays open until the garbage collector comes; the network-edge flood test saw 2 of
    them now and then, and waited ~30 s for the collector without the fast paths). The
    SCP's sockets, with the fast paths (EventDrivenSocket) or without (MeteredSocket),
    close it."""
    from pynetdicom.association import Association

    from node.net.fast.netopts import EventDrivenSocket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
    wrapper = AssociationSocket(Association(AE(), "acceptor"), client_socket=served)
    wrapper.__class__ = {
        "pynetdicom": AssociationSocket,
        "metered": MeteredSocket,
        "fast": EventDrivenSocket,
    }[kind]
    served.shutdown(socket.SHUT_RDWR)  # the gate's hang-up
    client.close()

    def gone() -> bool:
        try:
            served.getpeername()
        except OSError:
            return True
        return False

    wait_for(gone, 10, "the peer's end closed")
    try:
        wrapper._shutdown_socket()
        assert (served.fileno() == -1) is (kind != "pynetdicom")
    finally:
        served.close()
