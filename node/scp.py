"""The Storage SCP: accept C-ECHO and C-STORE, spool what arrives, answer with a status.

The handler never classifies: it validates the header, writes the received bytes
durably and only then answers success. The worker does the rest.
"""

from __future__ import annotations

import logging
from enum import IntEnum
from io import BytesIO
from typing import Any, cast

import pydicom
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
from pynetdicom.transport import ThreadedAssociationServer

from node.config import ScpConfig
from node.errors import SpoolError
from node.metrics import Metrics
from node.netopts import NODELAY_HANDLER
from node.scu import VERIFICATION
from node.spool import Spool

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


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class EchoStatus(IntEnum):
    SUCCESS = 0x0000


def _header_uids(raw: bytes) -> tuple[str, str]:
    """Parse a received file's header; return its (SOP Instance, SOP Class) UIDs."""
    ds = pydicom.dcmread(
        BytesIO(raw),
        stop_before_pixels=True,
        specific_tags=["SOPClassUID", "SOPInstanceUID"],
    )
    return str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))


def handle_store(event: Event, spool: Spool, metrics: Metrics | None = None) -> int:
    """EVT_C_STORE handler: spool the bytes durably, then answer (and count the answer)."""
    status = _store(event, spool)
    if metrics is not None:
        metrics.c_store.labels(f"0x{int(status):04X}").inc()
    return status


def _store(event: Event, spool: Spool) -> StoreStatus:
    req = cast(C_STORE, event.request)
    calling = str(event.assoc.requestor.ae_title)
    sop_uid = str(req.AffectedSOPInstanceUID)
    raw = event.encoded_dataset()
    try:
        found_uid, found_class = _header_uids(raw)
    except (
        InvalidDicomError,
        ValueError,
        EOFError,
        KeyError,
        TypeError,
        OverflowError,
    ) as exc:
        log.warning(
            "C-STORE from %s of %s rejected: unreadable dataset: %s",
            calling,
            sop_uid,
            exc,
        )
        return StoreStatus.CANNOT_UNDERSTAND
    if found_uid != sop_uid or found_class != str(req.AffectedSOPClassUID):
        log.warning(
            "C-STORE from %s rejected: dataset UIDs (%s, %s) do not match the request (%s, %s)",
            calling,
            found_uid or "none",
            found_class or "none",
            sop_uid,
            req.AffectedSOPClassUID,
        )
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    try:
        job_id = spool.store(raw, sop_uid, found_class, calling)
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


def handle_echo(event: Event) -> int:
    log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return EchoStatus.SUCCESS


def build_ae(cfg: ScpConfig) -> AE:
    """An AE that accepts Verification and every storage SOP class in decodable syntaxes."""
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_pdu_size = cfg.max_pdu
    ae.network_timeout = cfg.network_timeout
    ae.acse_timeout = cfg.network_timeout
    ae.dimse_timeout = cfg.network_timeout
    ae.maximum_associations = cfg.max_associations
    ae.require_called_aet = True
    ae.add_supported_context(VERIFICATION)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), DECODABLE)
    return ae


def start_server(
    cfg: ScpConfig, spool: Spool, metrics: Metrics | None = None
) -> ThreadedAssociationServer:
    """Start listening in background threads; returns the server (``.shutdown()`` stops it)."""
    ae = build_ae(cfg)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [spool, metrics]),
        (evt.EVT_C_ECHO, handle_echo),
        NODELAY_HANDLER,
    ]
    if metrics is not None:
        handlers.append((evt.EVT_ACCEPTED, lambda _e: metrics.associations.inc()))
    server = ae.start_server((cfg.bind_address, cfg.port), block=False, evt_handlers=handlers)
    if server is None:  # pragma: no cover - block=False always returns the server
        raise RuntimeError("pynetdicom did not return a server")
    host, port = server.server_address[:2]
    log.info("listening as %s on %s:%s", cfg.ae_title, host, port)
    return server
