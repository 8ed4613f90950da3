"""The Storage SCP: accept C-ECHO and C-STORE, spool what arrives, answer with a status.

The handler never classifies: it validates the header, writes the received bytes
durably and only then answers success. The worker does the rest.
"""

from __future__ import annotations

import copy
import logging
import ssl
import struct
import threading
import zlib
from enum import IntEnum
from io import SEEK_END, BytesIO
from typing import Any, cast

from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from node.core.config import ScpConfig, TlsConfig
from node.core.errors import ConfigError, MalformedDataset, SpoolError
from node.core.metrics import Metrics
from node.dicom.assocwords import reason_label, rejection, titles
from node.dicom.uids import is_safe_uid, is_valid_uid
from node.dicom.wire import dataset_uids, file_meta_bytes
from node.net.fast.netopts import ReadLimits, quiet_pynetdicom, set_nodelay
from node.net.fast.sockopts import metered_socket
from node.net.fast.uidmemo import remember_uid_checks
from node.net.gate import ConnectionGate, NodeAssociationServer
from node.net.intake import Intake
from node.net.scu import VERIFICATION
from node.store.spool import Spool

log = logging.getLogger(__name__)

UNCOMPRESSED = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
# Every syntax the pylibjpeg plugins (and pydicom's RLE decoder) can decode.
DECODABLE = [
    *UNCOMPRESSED,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


COMMAND_SLACK = 64 * 1024
"""Bytes a C-STORE message may carry beyond its data set (its command set)."""


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class EchoStatus(IntEnum):
    SUCCESS = 0x0000


_UNREADABLE = (
    InvalidDicomError,
    ValueError,
    EOFError,
    KeyError,
    TypeError,
    OverflowError,
    struct.error,
    RecursionError,
    zlib.error,
)
"""What pydicom's reader (and zlib, for deflated data sets) raises on malformed bytes."""


def handle_store(
    event: Event,
    spool: Spool,
    metrics: Metrics | None = None,
    max_bytes: int = 2**31,
    intake: Intake | None = None,
) -> int:
    """EVT_C_STORE handler: spool the bytes durably, then answer (and count the answer).
    Once the node is stopping (``intake`` closed) a C-STORE is refused with 0xA700: the
    sender keeps the image, and nothing touches the job store being closed."""
    if intake is None:
        status = _store(event, spool, max_bytes)
    elif not intake.enter():
        log.warning(
            "C-STORE from %s of %s refused: the node is shutting down",
            event.assoc.requestor.ae_title,
            cast(C_STORE, event.request).AffectedSOPInstanceUID,
        )
        status = StoreStatus.OUT_OF_RESOURCES
    else:
        try:
            status = _store(event, spool, max_bytes)
        finally:
            intake.leave()
    if metrics is not None:
        metrics.c_store.labels(f"0x{int(status):04X}").inc()
    return status


def _store(event: Event, spool: Spool, max_bytes: int) -> StoreStatus:
    req = cast(C_STORE, event.request)
    calling = str(event.assoc.requestor.ae_title)
    sop_uid = str(req.AffectedSOPInstanceUID)
    sop_class = str(req.AffectedSOPClassUID)
    received = cast(BytesIO, req.DataSet)
    syntax = str(event.context.transfer_syntax)
    refused = _refusal(received, syntax, max_bytes, (calling, sop_uid, sop_class))
    if refused is not None:
        _remember_refusal(spool, sop_uid, refused, calling)
        return refused
    meta = file_meta_bytes(sop_class, sop_uid, syntax)
    # the received bytes as they are: no copy (Event.encoded_dataset() would make two)
    with received.getbuffer() as dataset:
        try:
            job_id = spool.store((meta, dataset), sop_uid, sop_class, calling)
        except SpoolError as exc:
            log.error("C-STORE from %s of %s refused: %s", calling, sop_uid, exc)
            return StoreStatus.OUT_OF_RESOURCES
    log.info(
        "received %s from %s as job %d",
        sop_uid,
        calling,
        job_id,
        extra={"calling_ae": calling, "sop_instance_uid": sop_uid, "job_id": job_id},
    )
    return StoreStatus.SUCCESS


def _remember_refusal(spool: Spool, sop_uid: str, status: StoreStatus, calling: str) -> None:
    """Record a refusal decided by the data set itself (too large, invalid UIDs, unreadable
    or mismatched header): sending it again cannot succeed, so the catch-up never fetches it.
    A full spool or a stopping node (0xA700, transient) is not recorded."""
    try:
        spool.record_refusal(sop_uid, int(status), status.name.lower(), calling)
    except SpoolError as exc:
        log.warning("refusal of %s not recorded: %s", sop_uid, exc)


def _refusal(
    received: BytesIO, syntax: str, max_bytes: int, ids: tuple[str, str, str]
) -> StoreStatus | None:
    """The status refusing a received data set (too large, unsafe or mismatched UIDs,
    unreadable or ambiguous header), or None when it may be spooled."""
    calling, sop_uid, sop_class = ids
    size = received.seek(0, SEEK_END)
    if size > max_bytes:
        log.warning(
            "C-STORE from %s of %s refused: %d bytes exceed scp.max_dataset_mb",
            calling,
            sop_uid,
            size,
        )
        return StoreStatus.OUT_OF_RESOURCES
    if not is_safe_uid(sop_uid) or not is_safe_uid(sop_class):
        log.warning(
            "C-STORE from %s refused: invalid UID in request %r (class %r)",
            calling,
            sop_uid,
            sop_class,
        )
        return StoreStatus.CANNOT_UNDERSTAND
    for uid in (sop_uid, sop_class):
        if not is_valid_uid(uid):
            log.warning(
                "C-STORE from %s: UID %s is not conformant (a leading zero or an empty "
                "component): accepted as it is",
                calling,
                uid,
            )
    return _header_refusal(received, syntax, ids)


def _header_refusal(
    received: BytesIO, syntax: str, ids: tuple[str, str, str]
) -> StoreStatus | None:
    """The status refusing a data set whose header is unreadable, ambiguous or names other
    UIDs than the request, or None."""
    calling, sop_uid, sop_class = ids
    try:
        received.seek(0)
        found_uid, found_class = dataset_uids(received, syntax)
    except MalformedDataset as exc:
        log.warning("C-STORE from %s of %s rejected: ambiguous SOP UIDs: %s", calling, sop_uid, exc)
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    except _UNREADABLE as exc:
        log.warning("C-STORE from %s of %s rejected: unreadable dataset: %s", calling, sop_uid, exc)
        return StoreStatus.CANNOT_UNDERSTAND
    if found_uid != sop_uid or found_class != sop_class:
        log.warning(
            "C-STORE from %s rejected: dataset UIDs (%s, %s) do not match the request (%s, %s)",
            calling,
            found_uid or "none",
            found_class or "none",
            sop_uid,
            sop_class,
        )
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    return None


def handle_echo(event: Event) -> int:
    log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return EchoStatus.SUCCESS


def build_ae(cfg: ScpConfig, fast_paths: bool = True) -> AE:
    """An AE that accepts Verification and every storage SOP class in decodable syntaxes,
    from the allowed calling AE titles only, addressed to our own AE title only; with
    ``fast_paths``, its contexts are :class:`CheapCopyContext` and the process's UID checks
    are remembered (:mod:`node.net.fast.uidmemo`)."""
    quiet_pynetdicom()
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_pdu_size = cfg.max_pdu
    ae.network_timeout = cfg.network_timeout
    ae.dimse_timeout = cfg.network_timeout
    ae.acse_timeout = cfg.association_request_timeout  # the ARTIM timer (PS3.8 9.1.5)
    # pynetdicom counts pending connections too: the gate bounds those
    ae.maximum_associations = cfg.max_associations + cfg.max_pending_connections
    ae.require_called_aet = True
    if not cfg.accept_any_calling_aet:
        ae.require_calling_aet = list(cfg.allowed_calling_aets)
    ae.add_supported_context(VERIFICATION)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), DECODABLE)
    if fast_paths:
        for supported in ae.supported_contexts:  # the server gets these very objects
            supported.__class__ = CheapCopyContext
        remember_uid_checks()
    return ae


class CheapCopyContext(PresentationContext):
    """A supported presentation context that pynetdicom can copy quickly.

    pynetdicom deep-copies the server's supported contexts for every association (every
    storage SOP class, each with every transfer syntax the node decodes), and Orthanc's
    route opens an association per image, so that copy is paid per image (measured in
    bench/RESULTS.md, "What changed, and what each change bought", Ingest: association
    setup). Its state is immutable UIDs, ints, bools and one list of transfer syntaxes, so
    a shallow copy with its own list is an equivalent deep copy.
    """

    def __deepcopy__(self, memo: dict[int, object]) -> CheapCopyContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """TLS for the SCP: our certificate, and client certificates checked against ``ca_file``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def start_server(
    cfg: ScpConfig,
    spool: Spool,
    metrics: Metrics | None = None,
    tls: TlsConfig | None = None,
    intake: Intake | None = None,
    fast_paths: bool = True,
) -> ThreadedAssociationServer:
    """Start listening in background threads; returns the server (``.shutdown()`` stops it).

    Connections go through a :class:`node.net.gate.ConnectionGate` (pending caps, TLS in the
    connection's thread). PDU and message sizes are enforced as they stream in: with
    ``fast_paths`` (``network.fast_paths`` as :func:`node.net.fast.fastpaths.resolve` allows it) by
    the fast paths' reader (:class:`node.net.fast.netopts.ReadLimits`, with the read deadlines),
    without by :class:`node.net.fast.sockopts.MeteredSocket` on stock pynetdicom's reads (the
    deadlines then are pynetdicom's ARTIM timer and the sockets' time limits)."""
    ae = build_ae(cfg, fast_paths)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [spool, metrics, cfg.max_dataset_mb * 2**20, intake]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REJECTED, _log_rejection),
        _socket_handler(cfg, fast_paths),
    ]
    if metrics is not None:
        handlers.append((evt.EVT_ACCEPTED, lambda _e: metrics.associations.inc()))
        handlers.append((evt.EVT_REJECTED, _count_rejection, [metrics]))
    context = server_ssl_context(tls) if tls is not None and tls.enabled else None
    gate = ConnectionGate(cfg.max_pending_connections, cfg.max_pending_per_host, cfg.allowed_hosts)
    try:
        server = ae.make_server(
            (cfg.bind_address, cfg.port),
            evt_handlers=handlers,
            server_class=NodeAssociationServer,
            gate=gate,
            tls=context,
            handshake_timeout=cfg.association_request_timeout,
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {cfg.bind_address}:{cfg.port} (scp.bind_address, scp.port): "
            f"{exc.strerror or exc}" + (" - another cxr-node?" if exc.errno == 98 else "")
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="scp-listener", daemon=True)
    thread.start()
    ae._servers.append(server)  # as ae.start_server does: server.shutdown() removes it
    host, port = server.server_address[:2]
    log.info(
        "listening as %s on %s:%s%s%s",
        cfg.ae_title,
        host,
        port,
        " (TLS)" if context else "",
        "" if fast_paths else " (stock pynetdicom)",
    )
    return server


def _socket_handler(cfg: ScpConfig, fast_paths: bool) -> tuple[Any, ...]:
    """The EVT_CONN_OPEN handler: the fast paths with their reader's limits, or the
    socket options every association gets with the same limits on stock pynetdicom's
    reads (:class:`node.net.fast.sockopts.MeteredSocket`)."""
    message_bytes = cfg.max_dataset_mb * 2**20 + COMMAND_SLACK
    if not fast_paths:
        return (evt.EVT_CONN_OPEN, metered_socket, [cfg.max_pdu, message_bytes])
    limits = ReadLimits(message_bytes, request_timeout=cfg.association_request_timeout)
    return (evt.EVT_CONN_OPEN, set_nodelay, [limits])


def _count_rejection(event: Event, metrics: Metrics) -> None:
    rj = event.assoc.acceptor.primitive
    reason = reason_label(getattr(rj, "result_source", None), getattr(rj, "diagnostic", None))
    metrics.rejected.labels(reason).inc()


def _log_rejection(event: Event) -> None:
    """Why we rejected a peer, in the words its SCU shows, with both AE titles it sent."""
    assoc = event.assoc
    rq, rj = assoc.requestor.primitive, assoc.acceptor.primitive
    calling = str(rq.calling_ae_title) if rq is not None else str(assoc.requestor.ae_title)
    called = str(rq.called_ae_title) if rq is not None else "?"
    why = rejection(rj.result, rj.result_source, rj.diagnostic) if rj is not None else "rejected"
    log.warning(
        "association from %s %s (%s; we are %s)",
        assoc.requestor.address,
        why,
        titles(calling, called),
        assoc.acceptor.ae_title,
        extra={"calling_ae": calling},
    )
