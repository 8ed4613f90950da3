"""node.sendnow: one-PDU messages sent by the answering thread, only where pynetdicom's DUL
thread would have sent them the same way at once."""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from helpers import NIH
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

import node.netopts
from node.config import ScpConfig
from node.cstore import store_response
from node.scp import StoreStatus, start_server
from node.scu import Peer, associate
from node.sendnow import SendGuard, guard, p_data_tf, send_now
from node.spool import Spool

DX = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.mark.parametrize("context_id", [1, 127, 255])
@pytest.mark.parametrize(
    "fragment", [b"\x03" + store_response(7, DX, "1.2.3", 0), b"\x02", b"\x00" + bytes(999)]
)
def test_a_p_data_tf_pdu_is_encoded_as_pynetdicom_encodes_it(context_id, fragment):
    primitive = P_DATA()
    primitive.presentation_data_value_list.append((context_id, fragment))
    assert p_data_tf(context_id, fragment) == P_DATA_TF(primitive).encode()


def _dul(sock: Any = None, state: str = "Sta6", watched: Any = None) -> Any:
    sent: list[bytes] = []
    return SimpleNamespace(
        socket=SimpleNamespace(socket=sock or socket.socket(), send=sent.append),
        sent=sent,
        state_machine=SimpleNamespace(current_state=state, do_action=lambda e: None),
        _kill_thread=False,
        to_provider_queue=queue.Queue(),
        event_queue=queue.Queue(),
        assoc=SimpleNamespace(get_handlers=lambda e: [(print, None)] if e is watched else []),
    )


def test_sent_at_once_in_sta6_with_nothing_queued_or_watched():
    dul = _dul()
    assert send_now(dul, SendGuard(), b"pdu")
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
    assert not send_now(dul, SendGuard(), b"pdu")
    assert dul.sent == []


def test_left_to_pynetdicom_over_tls():
    context = ssl.create_default_context()
    context.check_hostname = False
    tls = context.wrap_socket(socket.socket(), do_handshake_on_connect=False)
    dul = _dul(tls)
    assert not send_now(dul, SendGuard(), b"pdu")
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
    assert send_now(dul, sent, b"\x04 first")
    dul.socket.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")  # the reactor's A-ABORT
    assert not send_now(dul, sent, b"\x04 second")
    assert [p[:1] for p in dul.sent] == [b"\x04", b"\x07"]
    dul.socket.socket.close()


def test_a_failed_send_wakes_the_reactor():
    dul = _dul()
    woken: list[bool] = []
    dul.socket.waker = SimpleNamespace(wake=lambda: woken.append(True))
    assert send_now(dul, SendGuard(), b"pdu") and woken == []
    dul.socket.send = lambda data: dul.event_queue.put("Evt17")  # as AssociationSocket.send
    assert send_now(dul, SendGuard(), b"pdu") and woken == [True]
    dul.socket.socket.close()


def test_the_scp_answers_from_its_acceptor_thread_unless_pdus_are_watched(tmp_path, monkeypatch):
    """Over a real association: each C-STORE response is sent by send_now (in the thread
    that ran the handler); with an EVT_PDU_SENT handler bound, pynetdicom's DUL thread
    sends it and the handler sees it."""
    results: list[tuple[bool, str]] = []

    def recorded(*args: Any) -> bool:
        results.append((send_now(*args), threading.current_thread().name))
        return results[-1][0]

    monkeypatch.setattr(node.netopts, "send_now", recorded)
    spool = Spool(tmp_path / "spool", fsync=False)
    server = start_server(ScpConfig(port=0, allowed_calling_aets=("TESTSCU",)), spool)
    peer = Peer("127.0.0.1", server.server_address[1], "CXR_NODE", calling_ae_title="TESTSCU")
    ds = pydicom.dcmread(NIH)
    try:
        with associate(peer, [(ds.SOPClassUID, [ImplicitVRLittleEndian])]) as assoc:
            for _ in range(3):
                assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
            [acceptor] = server.active_associations
        assert [sent for sent, _ in results] == [True] * 3
        assert {name for _, name in results} == {acceptor.name}
        pdus: list[str] = []
        server.bind(evt.EVT_PDU_SENT, lambda e: pdus.append(type(e.pdu).__name__))
        results.clear()
        with associate(peer, [(ds.SOPClassUID, [ImplicitVRLittleEndian])]) as assoc:
            assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
        assert [sent for sent, _ in results] == [False]
        assert "P_DATA_TF" in pdus
        assert len(spool.jobs()) == 4
    finally:
        server.shutdown()
        spool.close()
