"""Storage SCU: associate with a remote AE and C-STORE datasets, checking every response."""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE, DimseServiceType
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from pynetdicom.transport import AddressInformation, AssociationSocket

from node.core.errors import (
    AssociationRejected,
    ConfigError,
    ContextsRefused,
    PreprocessError,
    SendError,
    Unreachable,
)
from node.dicom.assocwords import (
    aborted,
    connect_failure,
    no_answer,
    rejection,
    titles,
    unknown_host,
)
from node.dicom.dicomio import Encoded, uncompressed
from node.net.fast.netopts import NODELAY_HANDLER, quiet_pynetdicom
from node.net.fast.sockopts import PLAIN_HANDLER
from node.net.fast.uidmemo import remember_uid_checks

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
STORED = frozenset({STATUS_SUCCESS, STATUS_WARNING})  # pynetdicom.status categories


@dataclass(frozen=True)
class Peer:
    """A remote Application Entity."""

    host: str
    port: int
    ae_title: str
    calling_ae_title: str = "CXR_NODE"
    timeout: float = 30.0
    tls: ssl.SSLContext | None = None
    fast_paths: bool = True
    """``network.fast_paths`` as :func:`node.net.fast.fastpaths.resolve` allows it: the
    associations get :mod:`node.net.fast.netopts`'s workarounds, else stock pynetdicom."""


def client_ssl_context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """TLS for the SCU: verify the peer against ``ca_file`` (system CAs if None), and
    present a client certificate when given."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS: cannot load the CA file {ca_file}: {_why(exc)}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            files = f"{cert_file}" + (f", {key_file}" if key_file else "")
            raise ConfigError(f"TLS: cannot load our certificate ({files}): {_why(exc)}") from exc
    return ctx


def _why(exc: OSError) -> str:
    """ "No such file or directory", or the SSL library's reason."""
    return str(exc) if isinstance(exc, ssl.SSLError) or not exc.strerror else exc.strerror


def check_status(status: Dataset | None, what: str) -> int:
    """Return the status code of a C-STORE response, or raise :class:`SendError`.

    An empty response (association aborted, timeout) is a failure.
    """
    failure = status_failure(status)
    if failure:
        raise SendError(f"{what}: {failure}")
    return int(cast(Dataset, status).Status)


def status_failure(status: Dataset | None) -> str:
    """Why a C-STORE response is a failure ("" for success and warning statuses, as
    :func:`pynetdicom.status.code_to_category` tells them: 0x0001, 0xB000-0xBFFF...)."""
    if status is None or "Status" not in status:
        return "no response (association aborted, rejected or timed out)"
    code = int(status.Status)
    if code_to_category(code) in STORED:
        return ""
    comment = status.get("ErrorComment", "")
    return f"C-STORE failed with status 0x{code:04X} {comment}".rstrip()


class _AE(AE):
    """An AE for one association that keeps why its connection failed (pynetdicom logs the
    ``OSError`` and drops it): refused and timed out are told apart in the message. Its
    association socket stays pynetdicom's own class (node.net.fast.netopts swaps that one)."""

    connect_error: OSError | None = None

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        if tls_args is not None:  # the TLS socket made from ours connects: it records
            tls_args = (cast(ssl.SSLContext, _RecordingContext(tls_args[0], self)), tls_args[1])
        sock = super()._create_socket(assoc, address, tls_args)
        plain = cast(socket.socket, sock.socket)
        recording = _RecordingSocket(plain.family, plain.type, plain.proto, plain.detach())
        recording.settimeout(plain.gettimeout())
        recording.owner = self
        sock.socket = recording
        return sock


class _RecordingSocket(socket.socket):
    """A TCP socket that hands the error of a failed connect() to its :class:`_AE`, and
    closes itself then.

    pynetdicom 3.0 closes a socket that failed to connect in the same ``try`` as its
    shutdown, which raises ENOTCONN for a socket never connected, so the close is skipped;
    and the error kept here refers to the socket (its traceback's frame), a cycle: each
    refused attempt (a PACS down, probed and retried for hours) left a descriptor open
    until the garbage collector came."""

    owner: _AE | None = None

    def connect(self, address: object) -> None:
        try:
            super().connect(address)  # type: ignore[arg-type]
        except OSError as exc:
            if self.owner is not None:
                self.owner.connect_error = exc
            self.close()  # pynetdicom's own close is skipped (see above)
            raise


class _RecordingContext:
    """Wraps an SSL context: the TLS socket it makes records a failed connect() too."""

    def __init__(self, context: ssl.SSLContext, owner: _AE) -> None:
        self._context, self._owner = context, owner

    def wrap_socket(self, sock: socket.socket, **kwargs: object) -> ssl.SSLSocket:
        tls = self._context.wrap_socket(sock, **kwargs)  # type: ignore[arg-type]
        connect, owner = tls.connect, self._owner

        def recording(address: object) -> None:
            try:
                connect(address)  # type: ignore[arg-type]
            except OSError as exc:
                owner.connect_error = exc
                tls.close()  # see _RecordingSocket
                raise

        tls.connect = recording  # type: ignore[method-assign,assignment]
        return tls


def _ae(peer: Peer) -> _AE:
    quiet_pynetdicom()
    if peer.fast_paths:
        remember_uid_checks()
    ae = _AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = peer.timeout
    ae.dimse_timeout = peer.timeout
    ae.network_timeout = peer.timeout
    ae.connection_timeout = peer.timeout
    return ae


@contextmanager
def associate(peer: Peer, contexts: Iterable[tuple[str, list[str]]]) -> Iterator[Association]:
    """Open an association proposing ``contexts`` (abstract syntax, transfer syntaxes).

    Raises :class:`AssociationRejected` when the peer rejects the request (A-ASSOCIATE-RJ),
    :class:`ContextsRefused` when it accepts none of the contexts, and :class:`Unreachable`
    when it cannot be connected to, does not answer or aborts."""
    ae = _ae(peer)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    tls_args = (peer.tls, peer.host) if peer.tls is not None else None
    where = f"association to {peer.ae_title}@{peer.host}:{peer.port}"
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            evt_handlers=[NODELAY_HANDLER if peer.fast_paths else PLAIN_HANDLER],
            tls_args=tls_args,
        )
    except socket.gaierror as exc:  # the host name, looked up before any connection
        raise Unreachable(f"{where}: {unknown_host(peer.host, exc)}") from exc
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts and not assoc.is_rejected:
            raise ContextsRefused(f"{where}: {_refused(assoc)}")
        why = _not_established(assoc, peer, ae.connect_error)
        if assoc.is_rejected:
            raise AssociationRejected(f"{where}: {why}")
        raise Unreachable(f"{where}: {why}")
    try:
        yield assoc
    finally:
        if usable(assoc):
            assoc.release()
        elif assoc.is_established:  # ended while its reactor was paused: nothing to release
            assoc.kill()


def _not_established(assoc: Association, peer: Peer, connect_error: OSError | None) -> str:
    """Why an association request failed: refused, timed out, aborted, or rejected (the
    peer's reason in words, with both AE titles)."""
    address = f"{peer.host}:{peer.port}"
    if connect_error is not None:
        return connect_failure(connect_error, address, peer.timeout)
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected and rsp is not None:
        why = rejection(rsp.result, rsp.result_source, rsp.diagnostic)
        return f"{why} ({titles(peer.calling_ae_title, peer.ae_title)})"
    if assoc._sent_abort:  # we gave up waiting for the A-ASSOCIATE-AC/RJ
        return no_answer(address, peer.timeout)
    return aborted(address)


def usable(assoc: Association) -> bool:
    """Whether messages can still be exchanged on ``assoc``.

    ``assoc.is_established`` is kept up to date by the association's reactor; while that is
    paused (:func:`reactor_paused`) an A-ABORT or a closed connection only shows in its DUL
    provider, which has then stopped or left Sta6 (association established).
    """
    dul = assoc.dul
    return assoc.is_established and dul.is_alive() and dul.state_machine.current_state == "Sta6"


def lost_reason(assoc: Association) -> str | None:
    """Why a message sent on ``assoc`` got no response: the peer aborted the association or
    the connection closed; None when neither happened (the DIMSE timeout ran out, and the
    association was aborted on our side)."""
    if assoc._sent_abort:  # by send_raw or pynetdicom, once the DIMSE timeout ran out
        return None
    if assoc.acse.is_aborted("a-p-abort"):
        return "peer closed the connection"
    if assoc.acse.is_aborted("a-abort") or assoc.is_aborted:
        return "peer aborted the association"
    if not usable(assoc):
        return "peer ended the association"
    return None


def _refused(assoc: Association) -> str:
    """The SOP classes of an association whose every presentation context was refused."""
    classes = sorted({UID(str(cx.abstract_syntax)) for cx in assoc.rejected_contexts})
    named = ", ".join(f"{uid} ({uid.name})" if uid.name != uid else uid for uid in classes)
    return (
        f"the peer refused every proposed presentation context (SOP classes {named}: "
        "it does not accept them or their transfer syntaxes)"
    )


def store_datasets(peer: Peer, datasets: Iterable[Dataset]) -> int:
    """C-STORE each dataset over one association; returns how many were stored.

    Raises :class:`SendError` on the first failure.
    """
    items = list(datasets)
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in items}
    proposed = [
        (cls, list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        for cls, ts in sorted(contexts)
    ]
    with associate(peer, proposed) as assoc:
        for ds in items:
            what = f"C-STORE of {ds.SOPInstanceUID} to {peer.ae_title}"
            code = check_status(assoc.send_c_store(ds), what)
            if code != SUCCESS:
                log.warning("%s: warning status 0x%04X", what, code)
    return len(items)


def store_files(peer: Peer, paths: Iterable[Path]) -> int:
    """C-STORE files as they are; see :func:`store_datasets`."""
    from node.dicom.dicomio import read_dataset

    return store_datasets(peer, (read_dataset(p) for p in paths))


@dataclass(frozen=True)
class BatchResult:
    """What became of a batch sent over one association (:func:`store_encoded`)."""

    failures: list[str]
    """One per object answered, in order: "" when stored (success or warning), else the
    failure status. Objects after these got no answer (see ``lost``) or were not sent."""
    lost: str = ""
    """Why the association ended before every object was answered; "" if it did not."""


def store_encoded(
    peer: Peer, items: Sequence[Encoded], stop: Callable[[], bool] = lambda: False
) -> BatchResult:
    """C-STORE every object as it is encoded (its bytes, no decode or re-encode) over ONE
    association, proposing exactly each object's (SOP Class, Transfer Syntax), and for a
    compressed one also Explicit VR Little Endian: an object whose compressed syntax the
    peer refuses goes decompressed. Each response is checked. Stops early, with the rest
    unsent, once ``stop()`` is true.

    Raises :class:`Unreachable` when no association can be had, and
    :class:`ContextsRefused` when the peer takes none of the objects' contexts.
    """
    contexts = sorted({(e.sop_class_uid, e.transfer_syntax) for e in items})
    contexts += sorted(  # and uncompressed beside each compressed one, for a fallback
        {(c, ExplicitVRLittleEndian) for c, t in contexts if UID(t).is_compressed} - set(contexts)
    )
    failures: list[str] = []
    with associate(peer, [(c, [t]) for c, t in contexts]) as assoc, reactor_paused(assoc):
        for msg_id, e in enumerate(items, start=1):
            if stop():
                break
            status = _store_one(assoc, e, msg_id)
            if status is None:
                return BatchResult(failures, _lost(assoc, peer))
            failures.append(_answer(status, f"C-STORE of {e.sop_instance_uid} to {peer.ae_title}"))
    return BatchResult(failures)


def _store_one(assoc: Association, e: Encoded, msg_id: int) -> Dataset | None:
    """The response status to one object, None when none came (the association ended);
    an object whose context the peer refused gets 0xC000-like failure status text."""
    try:
        status = send_encoded(assoc, e, msg_id)
    except ValueError as exc:  # this (class, syntax) refused while others were accepted
        if UID(e.transfer_syntax).is_compressed:
            return _store_uncompressed(assoc, e, msg_id)
        return _cannot_send(f"presentation context refused by the peer: {exc}")
    return status if "Status" in status else None


def _cannot_send(comment: str) -> Dataset:
    """A failure status, as if the peer had answered, for an object the node cannot send."""
    failed = Dataset()
    failed.Status = CANNOT_UNDERSTAND
    failed.ErrorComment = comment
    return failed


def _store_uncompressed(assoc: Association, e: Encoded, msg_id: int) -> Dataset | None:
    """The peer refused ``e``'s compressed transfer syntax: send it decompressed (a summary
    image to a PACS without JPEG), or a failure status saying why not."""
    try:
        plain = uncompressed(e)
    except PreprocessError as exc:
        return _cannot_send(f"its transfer syntax was refused and {exc}")
    log.info(
        "%s: the peer refused %s: sent uncompressed",
        e.sop_instance_uid,
        UID(e.transfer_syntax).name,
    )
    return _store_one(assoc, plain, msg_id)


def _answer(status: Dataset, what: str) -> str:
    failure = status_failure(status)
    if not failure and int(status.Status) != SUCCESS:
        log.warning("%s: warning status 0x%04X", what, int(status.Status))
    return f"{what}: {failure}" if failure else ""


def _lost(assoc: Association, peer: Peer) -> str:
    where = f"association to {peer.ae_title}@{peer.host}:{peer.port}"
    reason = lost_reason(assoc)
    return f"{where}: {reason}" if reason else f"{where}: no response within {peer.timeout:g} s"


def echo(peer: Peer) -> None:
    """C-ECHO ``peer``; raises :class:`SendError` unless it answers success."""
    with associate(peer, [(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as a:
        status = a.send_c_echo()
        if status is None or "Status" not in status or int(status.Status) != SUCCESS:
            raise SendError(f"C-ECHO to {peer.ae_title}@{peer.host}:{peer.port}: no success")


@contextmanager
def reactor_paused(assoc: Association) -> Iterator[Association]:
    """Keep the association's reactor paused while we exchange several messages ourselves.

    pynetdicom's ``send_c_store`` pauses the reactor, sends, reads the response and lets the
    reactor run again, once per message; the reactor then naps 1 ms before it can be paused
    again, so every image waited out that nap. Inside this block :func:`send_raw` (with
    ``resume=False``) pauses it once and leaves it paused until the block ends.
    """
    try:
        yield assoc
    finally:
        assoc._reactor_checkpoint.set()


def _pause_reactor(assoc: Association) -> None:
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused and assoc.is_alive():
        time.sleep(0.0001)


def send_encoded(assoc: Association, e: Encoded, msg_id: int) -> Dataset:
    """:func:`send_raw` of an :class:`Encoded` object, the reactor left paused (several
    objects go in a row); raises ``ValueError`` when no accepted context fits it."""
    return send_raw(
        assoc,
        e.sop_class_uid,
        e.sop_instance_uid,
        e.transfer_syntax,
        e.dataset,
        msg_id,
        resume=False,
    )


def send_raw(
    assoc: Association,
    sop_class: str,
    sop_uid: str,
    syntax: str,
    payload: bytes,
    msg_id: int = 1,
    *,
    resume: bool = True,
) -> Dataset:
    """C-STORE an already-encoded data set (the bytes after a file's meta group) as is.

    No decode or re-encode: the bytes go on the wire in the presentation context accepted
    for exactly (``sop_class``, ``syntax``). Mirrors ``Association.send_c_store`` (pynetdicom
    3.x), whose file-path mode does the same from disk; raises ``ValueError`` when no such
    context was accepted. Returns the response status (empty Dataset if none came).
    ``resume=False`` leaves the reactor paused for the next message (see
    :func:`reactor_paused`, which must then enclose the calls).
    """
    context = assoc._get_valid_context(sop_class, syntax, "scu", allow_conversion=False)
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_uid
    req.DataSet = BytesIO(payload)
    if not usable(assoc):  # ended while the reactor was paused: no answer can come
        log.debug("C-STORE of %s not sent: the association has ended", sop_uid)
        return Dataset()
    _pause_reactor(assoc)
    try:
        assoc.dimse.send_msg(req, cast(int, context.context_id))  # see netopts.send_msg
        rsp = _response(assoc)
    finally:
        if resume:
            assoc._reactor_checkpoint.set()
    if rsp is None:
        if usable(assoc):  # the DIMSE timeout ran out: abort, as pynetdicom does
            assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)


RESPONSE_POLL = 0.2
"""While waiting for a response, how often :func:`_response` checks that the association's
DUL provider still runs."""


def _response(assoc: Association) -> DimseServiceType | None:
    """The next DIMSE message (the response to ours), or None once the DIMSE timeout has run
    out or the association has ended.

    pynetdicom's ``dimse.get_msg(block=True)`` waits the whole DIMSE timeout; an A-ABORT or a
    closed connection puts an empty message on the queue to end that wait, and where the
    DUL provider stops without one, the check every :data:`RESPONSE_POLL` seconds does.
    """
    timeout = assoc.dimse_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = RESPONSE_POLL
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - time.monotonic()))
        try:
            return assoc.dimse.msg_queue.get(timeout=wait)[1]
        except queue.Empty:
            pass
        if not assoc.dul.is_alive() or (deadline is not None and time.monotonic() >= deadline):
            return None
