"""The SCP's front door: which TCP connections get a thread, and TLS off the accept thread.

pynetdicom 3.0's server gives every accepted connection two threads (association and DUL)
before the peer has said anything, counts them against ``maximum_associations``, reads
from them without a time limit, and runs the TLS handshake in the listening thread. A few
silent sockets then lock every sender out. Here:

* a connection is *pending* until its association is established; at most
  ``scp.max_pending_connections`` are pending, at most ``scp.max_pending_per_host`` from
  one address. A connection beyond a cap takes the place of the oldest pending one of that
  host (or of all) that has waited at least :data:`MIN_PENDING_AGE`, else it is closed at
  once: a flood of idle sockets cannot keep a sender that completes its association
  request within that time out;
* a pending connection that has not completed its A-ASSOCIATE-RQ within
  ``scp.association_request_timeout`` is closed (the DICOM ARTIM timer, enforced by the
  fast paths' reader, :mod:`node.net.fast.netopts`, or by pynetdicom's own timer without them);
  accepted sockets never block without a timeout;
* the TLS handshake runs in the connection's own thread, bounded by the same timeout.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

MIN_PENDING_AGE = 0.5
"""Seconds a pending connection is safe from being displaced by a newer one."""


@dataclass
class _Pending:
    sock: socket.socket
    host: str
    since: float


class ConnectionGate:
    """Counts pending connections by host; admits, displaces or refuses new ones."""

    def __init__(
        self,
        max_pending: int,
        per_host: int,
        allowed: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_pending = max_pending
        self.per_host = per_host
        self._networks = [ipaddress.ip_network(a, strict=False) for a in allowed]
        self._clock = clock
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()

    def admit(self, sock: socket.socket, host: str, settled: set[socket.socket]) -> bool:
        """Whether a new connection from ``host`` may go on; ``settled``: the sockets of
        established associations (no longer pending)."""
        if self._networks and not self._allowed(host):
            log.warning("connection from %s refused: not in scp.allowed_hosts", host)
            return False
        with self._lock:
            self._prune(settled)
            if not self._room(host):
                log.warning(
                    "connection from %s refused: %d connections pending (%d from it) without "
                    "an association (scp.max_pending_connections, scp.max_pending_per_host)",
                    host,
                    len(self._pending),
                    sum(p.host == host for p in self._pending.values()),
                )
                return False
            self._pending[id(sock)] = _Pending(sock, host, self._clock())
            return True

    def replace(self, old: socket.socket, new: socket.socket) -> None:
        """The TLS socket that took over ``old`` (the handshake detaches the raw one)."""
        with self._lock:
            entry = self._pending.pop(id(old), None)
            if entry is not None:
                self._pending[id(new)] = _Pending(new, entry.host, entry.since)

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._pending.pop(id(sock), None)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self._networks)

    def _prune(self, settled: set[socket.socket]) -> None:
        for key, entry in list(self._pending.items()):
            if entry.sock.fileno() == -1 or entry.sock in settled:
                del self._pending[key]

    def _room(self, host: str) -> bool:
        mine = [p for p in self._pending.values() if p.host == host]
        if len(mine) >= self.per_host:
            return self._displace(mine)
        if len(self._pending) >= self.max_pending:
            return self._displace(list(self._pending.values()))
        return True

    def _displace(self, entries: list[_Pending]) -> bool:
        oldest = min(entries, key=lambda p: p.since)
        waited = self._clock() - oldest.since
        if waited < MIN_PENDING_AGE:
            return False
        log.warning(
            "closing a connection from %s pending for %.1f s without an association, "
            "to admit a new one",
            oldest.host,
            waited,
        )
        _hang_up(oldest.sock)
        del self._pending[id(oldest.sock)]
        return True


def _hang_up(sock: socket.socket) -> None:
    """End a connection another thread may be blocked reading (``close`` alone would not
    wake it)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:  # already gone
        log.debug("shutdown of a pending connection: %s", exc)


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server behind a :class:`ConnectionGate`, with read timeouts
    on accepted sockets and the TLS handshake in each connection's own thread."""

    # socketserver's listen backlog is 5: a burst of connections beyond it waits a second
    # each for the client's SYN retransmission before the gate can even judge it
    request_queue_size = 128

    def __init__(
        self,
        *args: Any,
        gate: ConnectionGate,
        tls: ssl.SSLContext | None,
        handshake_timeout: float,
        **kwargs: Any,
    ) -> None:
        self.gate = gate
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()  # type: ignore[union-attr]
        sock.settimeout(self.handshake_timeout)  # never a read without a time limit
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        settled = {
            a.dul.socket.socket
            for a in self.active_associations
            if a.is_established and a.dul.socket is not None and a.dul.socket.socket
        }
        return self.gate.admit(request, str(client_address[0]), settled)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            request = self._handshake(request, client_address)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        assert self.tls is not None
        try:
            tls_sock = self.tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # TimeoutError is an OSError
            log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
            self.gate.forget(sock)
            sock.close()
            return None
        self.gate.replace(sock, tls_sock)
        return tls_sock

    def shutdown_request(self, request: Any) -> None:
        self.gate.forget(request)
        super().shutdown_request(request)
