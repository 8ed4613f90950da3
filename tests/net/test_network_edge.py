"""The network edge against a hostile peer, with the node as a real process on loopback:
idle and half-open sockets never lock a sender out, oversized PDUs and endless messages
are aborted before they are read, and a silent TLS client never stops the others."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from helpers import NIH, free_port, wait_for

from node.net.gate import MIN_PENDING_AGE

log = logging.getLogger(__name__)

pytestmark = pytest.mark.integration
ARTIM = 2.0  # scp.association_request_timeout, scaled down


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _storescu(port: int, *tls: str, timeout: float = 30) -> tuple[bool, float]:
    """Whether dcmtk's storescu stored the sample, and how long it took (its output is
    logged: pytest shows it for a failing test)."""
    start = time.monotonic()
    done = subprocess.run(
        ["storescu", *tls, "-aet", "TESTSCU", "-aec", "CXR_NODE", "127.0.0.1", str(port), str(NIH)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        log.warning("storescu exited %d: %s", done.returncode, done.stdout + done.stderr)
    return done.returncode == 0, time.monotonic() - start


def _accept_backlog(port: int) -> int:
    """Connections waiting in the kernel for the listening socket on ``port`` to accept
    them (the receive queue of a LISTEN entry in /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


def _warm(node: object) -> None:
    """Store one image and wait until the node has classified it: its worker has built the
    SR template, opened its database connection and touched what a first image touches,
    so that what is measured next is the test's own (on a loaded machine all that comes
    seconds after the store is answered)."""
    ok, _ = _storescu(node.port)  # type: ignore[attr-defined]
    assert ok
    wait_for(lambda: node.jobs() == {"classified": 1}, 180, "the first image classified")  # type: ignore[attr-defined]


def _connect(port: int, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if first:
        s.sendall(first)
    return s


@pytest.fixture
def edge_node(node_factory):
    return lambda **scp: node_factory(
        free_port(),  # no PACS: only the SCP is under test
        scp={"association_request_timeout": ARTIM, "max_dataset_mb": 4, **scp},
        model=False,  # the network edge is under test, not the model
    )


def test_idle_and_half_open_sockets_never_lock_a_sender_out(edge_node):
    node = edge_node()
    pid = node.proc.pid
    _warm(node)
    threads, fds = _proc_status(pid, "Threads"), _fds(pid)
    header_only = [_connect(node.port, b"\x01\x00\x00\x00\x10\x00") for _ in range(10)]
    silent = [_connect(node.port) for _ in range(10)]
    idle = []
    for _ in range(300):
        try:
            idle.append(_connect(node.port))
        except OSError:  # the backlog is full: the flood is as big as it gets
            break
    # the node has taken the whole flood off its listen backlog; then the flood is open
    # and idle (not renewing itself) for as long as a newcomer needs to displace it
    wait_for(lambda: _accept_backlog(node.port) == 0, 30, "the flood accepted")
    time.sleep(MIN_PENDING_AGE + 0.1)
    try:
        for _ in range(3):  # at every attempt, within ARTIM + 2 s
            ok, took = _storescu(node.port)
            assert ok and took < ARTIM + 2, took
            assert _proc_status(pid, "Threads") < threads + 2 * 40  # bounded, not 600
    finally:
        for s in header_only + silent + idle:
            s.close()
    # back to where it was: every flood socket closed (within seconds; a loaded machine
    # may take longer to close 300 of them)
    deadline = time.monotonic() + ARTIM + 30
    while time.monotonic() < deadline:
        if _proc_status(pid, "Threads") <= threads and _fds(pid) <= fds:
            break
        time.sleep(0.2)
    open_now = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    assert _proc_status(pid, "Threads") <= threads and _fds(pid) <= fds, open_now
    assert node.proc.poll() is None


def _associate_rq(called: bytes = b"CXR_NODE", calling: bytes = b"TESTSCU") -> bytes:
    """A minimal A-ASSOCIATE-RQ: Verification in Implicit VR Little Endian, max PDU 16 KiB."""

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    abstract = item(0x30, b"1.2.840.10008.1.1")
    syntax = item(0x40, b"1.2.840.10008.1.2")
    context = item(0x20, bytes([1, 0, 0, 0]) + abstract + syntax)
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
    body += app + context + user
    return struct.pack(">BBI", 1, 0, len(body)) + body


def _stream(s: socket.socket, total: int, chunk: bytes) -> None:
    """Send up to ``total`` bytes; stop when the node has closed the connection."""
    sent = 0
    try:
        while sent < total:
            s.sendall(chunk)
            sent += len(chunk)
    except OSError:
        return


def _aborted(s: socket.socket) -> bytes:
    s.settimeout(ARTIM + 5)
    try:
        return s.recv(64)
    except OSError:
        return b""


def _ac(s: socket.socket) -> None:
    head = s.recv(6)
    assert head[:1] == b"\x02", head  # A-ASSOCIATE-AC
    (length,) = struct.unpack(">I", head[2:6])
    while length:
        length -= len(s.recv(length))


def _p_data_header(length: int) -> bytes:
    return struct.pack(">BBI", 4, 0, length)


def _c_store_command() -> bytes:
    from node.net.fast.cstore import store_request

    cmd = store_request(1, "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5", 0)
    pdv = struct.pack(">IB", len(cmd) + 2, 1) + bytes([0x03]) + cmd
    return _p_data_header(len(pdv)) + pdv


@pytest.mark.parametrize("attack", ["4 GiB associate", "256 MiB P-DATA", "endless data set"])
def test_oversized_pdus_and_endless_messages_are_aborted_in_bounded_memory(edge_node, attack):
    node = edge_node(accept_any_calling_aet=True)
    pid = node.proc.pid
    _warm(node)  # the first store's memory is not the attack's
    before = _proc_status(pid, "VmHWM")
    s = _connect(node.port)
    with s:
        if attack == "4 GiB associate":
            s.sendall(b"\x01\x00\xff\xff\xff\xff")
            _stream(s, 256 * 2**20, bytes(2**20))
        else:
            s.sendall(_associate_rq())
            _ac(s)
            if attack == "256 MiB P-DATA":
                s.sendall(_p_data_header(256 * 2**20))
                _stream(s, 256 * 2**20, bytes(2**20))
            else:  # fragments that never end, each within the PDU limit
                s.sendall(_c_store_command())
                body = struct.pack(">IB", 16000 + 2, 1) + b"\x00" + bytes(16000)
                _stream(s, 256 * 2**20, _p_data_header(len(body)) + body)
        reply = _aborted(s)
    assert reply[:1] in (b"\x07", b""), reply  # A-ABORT, or the connection closed
    grown = (_proc_status(pid, "VmHWM") - before) / 1024
    assert grown <= 64, f"peak RSS grew by {grown:.0f} MiB"
    ok, _ = _storescu(node.port)
    assert ok and node.proc.poll() is None


def test_a_silent_tls_connection_never_stops_other_tls_senders(node_factory, certs):
    tls = {
        "enabled": True,
        "cert_file": str(certs / "server.pem"),
        "key_file": str(certs / "server.key"),
        "ca_file": str(certs / "ca.pem"),
    }
    node = node_factory(
        free_port(), scp={"association_request_timeout": ARTIM}, tls=tls, model=False
    )
    client = [
        "+tls",
        str(certs / "client.key"),
        str(certs / "client.pem"),
        "+cf",
        str(certs / "ca.pem"),
    ]
    with _connect(node.port), _connect(node.port, b"\x16\x03\x01"):  # silent, half a hello
        for _ in range(2):
            ok, took = _storescu(node.port, *client)
            assert ok and took < ARTIM + 2, took
    assert node.proc.poll() is None


def test_a_calling_ae_title_with_control_characters_is_logged_escaped(edge_node):
    node = edge_node()
    with _connect(node.port, _associate_rq(calling=b"EV\nFORGED\x1b[31m")) as s:
        reply = _aborted(s)
    assert reply[:1] in (b"\x03", b"\x07", b"")  # rejected (or aborted)
    time.sleep(0.5)
    text = node.log_text()
    assert "\x1b" not in text and "\nFORGED" not in text
    assert "EV\\nFORGED\\x1b[31m" in text
