"""node.net.fast.sendnow: one-PDU messages sent by the answering thread, only where pynetdicom's DUL
thread would have sent them the same way at once."""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from helpers import NIH
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF

import node.net.fast.netopts
from node.core.config import ScpConfig
from node.net.fast.cstore import encoded_p_data, p_data, store_request
from node.net.fast.sendnow import SendGuard, guard, send_now, write_within
from node.net.scp import StoreStatus, start_server
from node.net.scu import Peer, associate
from node.store.spool import Spool

DX = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.mark.parametrize("context_id", [1, 255])
@pytest.mark.parametrize("dataset", [None, b"", b"x" * 7, bytes(range(256)) * 4099])
@pytest.mark.parametrize("max_pdu", [0, 7, 16384, 16390, 1 << 20])
def test_encoded_p_data_is_what_pynetdicom_encodes(context_id, dataset, max_pdu):
    command = store_request(7, DX, "1.2.3.4", 2)
    primitives = p_data(context_id, command, dataset, max_pdu)
    expected = b"".join(P_DATA_TF(primitive).encode() for primitive in primitives)
    pieces = list(encoded_p_data(context_id, command, dataset, max_pdu, chunk=65536))
    assert b"".join(pieces) == expected
    assert all(len(piece) < 65536 + max(max_pdu, len(dataset or b"")) + 12 for piece in pieces)


class _Socket(socket.socket):
    """A socket that keeps what is written to it, or fails to write when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.broken = False

    def send(self, data: Any, flags: int = 0) -> int:
        if self.broken:
            raise ConnectionResetError("peer gone")
        self.written.append(bytes(data))
        return len(data)


def _dul(sock: Any = None, state: str = "Sta6", watched: Any = None) -> Any:
    sock = sock or _Socket()
    written = sock.written if isinstance(sock, _Socket) else []
    return SimpleNamespace(
        socket=SimpleNamespace(socket=sock, send=lambda data: written.append(bytes(data))),
        sent=written,
        state_machine=SimpleNamespace(current_state=state, do_action=lambda e: None),
        _kill_thread=False,
        to_provider_queue=queue.Queue(),
        event_queue=queue.Queue(),
        assoc=SimpleNamespace(
            get_handlers=lambda e: [(print, None)] if e is watched else [], network_timeout=5.0
        ),
    )


def test_sent_at_once_in_sta6_with_nothing_queued_or_watched():
    dul = _dul()
    assert send_now(dul, SendGuard(), [b"pdu"])
    assert dul.sent == [b"pdu"]
    dul.socket.socket.close()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: setattr(d.state_machine, "current_state", "Sta8"),  # release requested
        lambda d: d.to_provider_queue.put("earlier primitive"),
        lambda d: d.event_queue.put("Evt10"),
        lambda d: setattr(d, "socket", None),
        lambda d: setattr(d, "_kill_thread", True),  # the reactor is being stopped
        *(
            lambda d, e=event: setattr(d.assoc, "get_handlers", lambda x: [1] if x is e else [])
            for event in (
                evt.EVT_PDU_SENT,
                evt.EVT_DATA_SENT,
                evt.EVT_FSM_TRANSITION,
                evt.EVT_DIMSE_RECV,
                evt.EVT_CONN_CLOSE,
            )
        ),
    ],
    ids=[
        "state",
        "send-queued",
        "event-queued",
        "no-socket",
        "stopping",
        "pdu",
        "data",
        "fsm",
        "dimse-recv",
        "conn-close",
    ],
)
def test_left_to_pynetdicom_otherwise(change):
    dul = _dul()
    change(dul)
    assert not send_now(dul, SendGuard(), [b"pdu"])
    assert dul.sent == []


def test_left_to_pynetdicom_over_tls():
    context = ssl.create_default_context()
    context.check_hostname = False
    tls = context.wrap_socket(socket.socket(), do_handshake_on_connect=False)
    dul = _dul(tls)
    assert not send_now(dul, SendGuard(), [b"pdu"])
    assert dul.sent == []
    tls.close()


def test_the_dul_thread_holds_the_lock_for_every_action_and_send():
    dul = _dul()
    held: list[bool] = []
    dul.state_machine.do_action = lambda event: held.append(sent.lock._is_owned())
    dul.socket.send = lambda data: held.append(sent.lock._is_owned())
    sent = guard(dul)
    dul.state_machine.do_action("Evt9")
    dul.socket.send(b"pdu")
    assert held == [True, True]
    assert not sent.lock._is_owned()
    dul.socket.socket.close()


def test_nothing_after_an_a_abort_sent_outside_the_state_machine():
    """pynetdicom's reactor answers a failed action with an A-ABORT written straight to
    the socket, in Sta6; a response must not follow it."""
    dul = _dul()
    sent = guard(dul)
    assert send_now(dul, sent, [b"\x04 first"])
    dul.socket.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")  # the reactor's A-ABORT
    assert not send_now(dul, sent, [b"\x04 second"])
    assert [p[:1] for p in dul.sent] == [b"\x04", b"\x07"]
    dul.socket.socket.close()


def test_a_failed_send_stops_the_message_and_wakes_the_reactor():
    dul = _dul()
    woken: list[bool] = []
    dul.socket.waker = SimpleNamespace(wake=lambda: woken.append(True))
    assert send_now(dul, SendGuard(), [b"pdu"]) and woken == []
    dul.socket.socket.broken = True
    pieces = iter([b"one", b"two"])
    assert send_now(dul, SendGuard(), pieces) and woken == [True]
    assert dul.event_queue.get_nowait() == "Evt17"  # as AssociationSocket.send queues it
    assert list(pieces) == [b"two"]  # nothing written after the failed piece
    dul.socket.socket.close()


def test_events_the_dul_thread_queues_meanwhile_do_not_cut_a_message_short():
    """The DUL thread keeps reading while a message is written (a peer's A-RELEASE-RQ is
    queued as Evt12 during the first piece): every piece is still written, as pynetdicom
    would in Sta6."""
    dul = _dul()
    sock = dul.socket.socket
    write = sock.send

    def write_while_the_peer_releases(data: Any, flags: int = 0) -> int:
        dul.event_queue.put("Evt12")
        return write(data)

    sock.send = dul.socket.send = write_while_the_peer_releases
    assert send_now(dul, SendGuard(), [b"one", b"two"])
    assert dul.sent == [b"one", b"two"]
    sock.close()


def test_requests_and_responses_go_from_their_own_threads_unless_pdus_are_watched(
    tmp_path, monkeypatch
):
    """Over a real association with 16 KB PDUs: each C-STORE request (~1 MB, 65 PDUs)
    is written by send_now from the requesting thread, in pieces, and each response from
    the thread that ran the handler; the images arrive intact. With an EVT_PDU_SENT
    handler bound on a side, pynetdicom's DUL thread sends there and the handler sees it."""
    results: list[tuple[bool, str, int]] = []

    def recorded(dul: Any, sent: Any, pdus: Any) -> bool:
        pieces = list(pdus)
        results.append((send_now(dul, sent, pieces), threading.current_thread().name, len(pieces)))
        return results[-1][0]

    monkeypatch.setattr(node.net.fast.netopts, "send_now", recorded)
    spool = Spool(tmp_path / "spool", fsync=False)
    cfg = ScpConfig(port=0, allowed_calling_aets=("TESTSCU",), max_pdu=16384)
    server = start_server(cfg, spool)
    peer = Peer("127.0.0.1", server.server_address[1], "CXR_NODE", calling_ae_title="TESTSCU")
    ds = pydicom.dcmread(NIH)
    me = threading.current_thread().name
    try:
        with associate(peer, [(ds.SOPClassUID, [ImplicitVRLittleEndian])]) as assoc:
            for _ in range(3):
                assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
            [acceptor] = server.active_associations
        assert sorted(results) == [(True, acceptor.name, 1)] * 3 + [(True, me, 2)] * 3
        for job in spool.jobs():
            assert pydicom.dcmread(job.image).PixelData == ds.PixelData
        pdus: list[str] = []
        server.bind(evt.EVT_PDU_SENT, lambda e: pdus.append(type(e.pdu).__name__))
        results.clear()
        with associate(peer, [(ds.SOPClassUID, [ImplicitVRLittleEndian])]) as assoc:
            assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
            assoc.bind(evt.EVT_PDU_SENT, lambda e: pdus.append("requestor"))
            assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
        requests = [sent for sent, name, _ in results if name == me]
        responses = [sent for sent, name, _ in results if name != me]
        assert requests == [True, False] and responses == [False, False]  # watched: refused
        assert "P_DATA_TF" in pdus and pdus.count("requestor") >= 65
        assert len(spool.jobs()) == 5
    finally:
        server.shutdown()
        spool.close()


def _tcp_pair(buffer: int) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair with small buffers (the writer's and the reader's)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.socket()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        ours.connect(listener.getsockname())
        theirs, _ = listener.accept()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    return ours, theirs


def test_a_write_fails_once_the_peer_has_read_nothing_for_the_timeout():
    ours, theirs = _tcp_pair(65536)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no byte written for 0\.3 s"):
            write_within(ours, bytes(8 * 2**20), 0.3)  # more than the buffers hold
        assert time.monotonic() - start < 2.0
    finally:
        ours.close()
        theirs.close()


def test_a_slow_reader_is_not_cut_off_while_the_write_progresses():
    """The limit is on progress, not on the whole write: 1 MiB read 64 KiB every 50 ms
    takes longer than the 0.3 s timeout, and is written whole (a socket timeout of 0.3 s
    on sendall would have failed it)."""
    ours, theirs = _tcp_pair(65536)
    data = bytes(range(256)) * 4096
    got = bytearray()

    def read_slowly() -> None:
        while len(got) < len(data):
            time.sleep(0.05)
            got.extend(theirs.recv(65536))

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    try:
        start = time.monotonic()
        write_within(ours, data, 0.3)
        assert time.monotonic() - start > 0.3
        reader.join(10)
        assert bytes(got) == data
    finally:
        ours.close()
        theirs.close()
