"""The push tool: C-STORE every DICOM object found in files, folders and zips to a peer.

Objects are read lazily (one chunk in memory at a time), sent as they are encoded — the
file's own SOP Class and Transfer Syntax are proposed, with uncompressed fallbacks — over as
few associations as DICOM's 128-presentation-context limit allows, optionally in parallel.

One bad file fails alone: what can be checked before sending is (:mod:`node.tools.precheck`); a
file the peer aborts the association on is tried once more on a new association, one it
never answers waits the DIMSE timeout once, and the others go on over a new association at
once. Every skipped and failed file is named, with its reason (``Summary.outcomes``).
"""

from __future__ import annotations

import csv
import logging
import queue
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, TextIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association

from node.core.errors import AssociationRejected, ContextsRefused, PreprocessError, SendError
from node.dicom.dicomio import Encoded, split_encoded
from node.dicom.wire import file_meta_bytes, split_part10
from node.net.scu import (
    SUCCESS,
    Peer,
    associate,
    lost_reason,
    reactor_paused,
    send_encoded,
    status_failure,
    usable,
)
from node.tools.archive import MAX_MEMBER_BYTES, Item, Rejected, iter_items
from node.tools.precheck import problem

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
CHUNK_FILES = 32  # files held in memory per association
ASSOCIATION_RETRIES = 3
DEFAULT_ASSOCIATIONS = 4  # in parallel they hide the peer's per-image latency (bench/RESULTS.md)


SENT, WARNING, FAILED, SKIPPED = "sent", "warning", "failed", "skipped"
DRY_RUN = "would be sent"
SHOWN = 20  # failed and skipped files named in the summary, of each kind; --report has all


@dataclass
class Summary:
    """What a push did; ``describe()`` is the final report, ``outcomes`` one row per input
    file: (file, outcome, reason), outcome one of sent, warning, failed, skipped (and
    :data:`DRY_RUN` in a dry run)."""

    sent: int = 0
    warnings: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outcomes: list[tuple[str, str, str]] = field(default_factory=list)
    unreachable: str = ""  # set once the peer refuses or cannot be reached: stop trying
    not_attempted: int = 0
    dry_run: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def describe(self) -> str:
        if self.dry_run:
            return self._describe_dry_run()
        mb = self.bytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        per_s = self.sent / self.seconds if self.seconds > 0 else 0.0
        head = (
            f"sent {self.sent}, warnings {self.warnings}, failed {self.failed}, "
            f"skipped {self.skipped}; {mb:.1f} MB in {self.seconds:.1f} s "
            f"({rate:.1f} MB/s, {per_s:.0f} files/s)"
        )
        nothing = [self._nothing()] if self.sent == 0 else []
        return "\n".join([head, *self._problems(), *nothing])

    def _describe_dry_run(self) -> str:
        """Every object that would be sent (file, SOP class, SOP instance UID), then the
        files that would fail or are skipped, then the counts."""
        rows = [(name, what) for name, how, what in self.outcomes if how == DRY_RUN]
        listed = [f"would send: {name}: {what}" for name, what in rows]
        head = (
            f"dry run, nothing sent: would send {self.sent}, would fail {self.failed}, "
            f"skipped {self.skipped}"
        )
        nothing = [self._nothing()] if self.sent == 0 else []
        return "\n".join([*listed, head, *self._problems(), *nothing])

    def _problems(self) -> list[str]:
        failed = [(name, why) for name, what, why in self.outcomes if what == FAILED]
        skipped = [(name, why) for name, what, why in self.outcomes if what == SKIPPED]
        return [
            *self._listed(failed, "failed"),
            *self._listed([row for row in skipped if row[1]], "skipped"),
            *self._listed([row for row in skipped if not row[1]], "skipped (not DICOM)"),
        ]

    def _nothing(self) -> str:
        verb = "would be sent" if self.dry_run else "sent"
        if self.failed:
            return f"nothing {verb}: every DICOM object failed (see above)"
        return f"nothing {verb}: no DICOM object found in the paths given"

    @staticmethod
    def _listed(rows: list[tuple[str, str]], label: str) -> list[str]:
        lines = [f"  {label}: {name}: {why}" if why else f"  {label}: {name}" for name, why in rows]
        if len(rows) > SHOWN:
            lines[SHOWN:] = [f"  ... and {len(rows) - SHOWN} more {label} (--report lists all)"]
        return lines

    def fail(self, name: str, reason: str) -> None:
        self.fail_all([name], reason)

    def fail_all(self, names: list[str], reason: str) -> None:
        with self.lock:
            self.failed += len(names)
            self.outcomes.extend((name, FAILED, reason) for name in names)

    def skip(self, name: str, reason: str = "") -> None:
        """``reason`` "": not DICOM."""
        with self.lock:
            self.skipped += 1
            self.outcomes.append((name, SKIPPED, reason))

    def stored(self, name: str, size: int, code: int) -> None:
        with self.lock:
            self.sent += 1
            self.bytes += size
            self.warnings += code != SUCCESS
            warning = f"warning status 0x{code:04X}" if code != SUCCESS else ""
            self.outcomes.append((name, WARNING if warning else SENT, warning))

    def write_report(self, fh: TextIO, *, tab: bool = False) -> None:
        """Every input file's outcome and reason, as CSV (TSV with ``tab``)."""
        out = csv.writer(fh, dialect="excel-tab" if tab else "excel")
        out.writerow(["file", "outcome", "reason"])
        with self.lock:
            out.writerows(self.outcomes)


@dataclass(frozen=True)
class Prepared:
    name: str
    size: int
    encoded: Encoded

    @property
    def context(self) -> tuple[str, str]:
        return self.encoded.sop_class_uid, self.encoded.transfer_syntax


def _contexts(batch: list[Prepared]) -> list[tuple[str, list[str]]]:
    """One context per (SOP Class, Transfer Syntax) the files use, so that each file can go
    exactly as it is encoded, plus one uncompressed fallback context per SOP Class."""
    pairs = sorted({p.context for p in batch})
    fallback: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    return [(c, [t]) for c, t in pairs] + [(c, fallback) for c in sorted({c for c, _ in pairs})]


def chunks(prepared: Iterator[Prepared], max_files: int = CHUNK_FILES) -> Iterator[list[Prepared]]:
    """Group objects so that each group needs at most 128 presentation contexts."""
    batch: list[Prepared] = []
    pairs: set[tuple[str, str]] = set()
    classes: set[str] = set()
    for p in prepared:
        new = (p.context not in pairs) + (p.context[0] not in classes)
        if len(batch) >= max_files or len(pairs) + len(classes) + new > MAX_CONTEXTS:
            yield batch
            batch, pairs, classes = [], set(), set()
        batch.append(p)
        pairs.add(p.context)
        classes.add(p.context[0])
    if batch:
        yield batch


class Progress:
    """tqdm's progress line on a terminal (files done, rate, failed, skipped, MB); silent
    otherwise. Every sending thread updates it: one lock keeps the line whole."""

    def __init__(self, stream: TextIO | None) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        if stream is not None and stream.isatty():
            from tqdm import tqdm  # only on a terminal: a scripted push starts without it

            self._bar = tqdm(unit="file", file=stream, dynamic_ncols=True, mininterval=0.2)

    def update(self, s: Summary) -> None:
        if self._bar is None:
            return
        with s.lock:
            done, failed, skipped, mb = s.sent + s.failed, s.failed, s.skipped, s.bytes / 1e6
        with self._lock:  # the bar's count is the files done when it last moved
            self._bar.update(max(0, done - self._bar.n))
            self._bar.set_postfix_str(
                f"{failed} failed, {skipped} skipped, {mb:.1f} MB", refresh=False
            )

    def close(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.close()


class _Link:
    """One worker's association, kept open across chunks whose contexts it already has,
    with its reactor paused while the worker sends (see ``scu.reactor_paused``)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.assoc: Association | None = None
        self._stack: ExitStack | None = None
        self._pairs: set[tuple[str, str]] = set()
        self._msg_id = 0

    def open_for(self, batch: list[Prepared]) -> Association:
        """The open association if it proposed every context ``batch`` needs, else a new
        one; raises :class:`SendError` when the peer cannot be associated with."""
        pairs = {p.context for p in batch}
        if self.assoc is not None and usable(self.assoc) and pairs <= self._pairs:
            return self.assoc
        self.close()
        stack = ExitStack()
        assoc = stack.enter_context(associate(self.peer, _contexts(batch)))
        stack.enter_context(reactor_paused(assoc))
        self._stack, self.assoc, self._pairs = stack, assoc, pairs
        return assoc

    def next_message_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    def close(self) -> None:
        """Let the reactor run again and release the association (if one is open)."""
        stack, self._stack, self.assoc = self._stack, None, None
        if stack is not None:
            stack.close()


def _send_batch(link: _Link, batch: list[Prepared], summary: Summary, progress: Progress) -> None:
    """Send one chunk over the worker's association, and over a new one each time the peer
    ends it: the file that was being sent then fails alone (see :func:`_send_over`) and
    the others go on at once. Only when no association can be opened does the chunk fail
    (and, the peer being unreachable, every later one, unattempted)."""
    pending = deque(batch)
    aborted_once: set[int] = set()  # id() of files the peer aborted the association on
    failures = 0
    while pending:
        names = [p.name for p in pending]
        if summary.unreachable:
            summary.fail_all(names, f"not attempted: {summary.unreachable}")
            with summary.lock:
                summary.not_attempted += len(names)
            return
        try:
            assoc = link.open_for(list(pending))
        except ContextsRefused as exc:  # these classes only: later chunks may still go
            link.close()
            summary.fail_all(names, str(exc))
            return
        except SendError as exc:  # refused, rejected or unreachable
            link.close()
            failures += 1
            if isinstance(exc, AssociationRejected) or failures == ASSOCIATION_RETRIES:
                summary.fail_all(names, str(exc))
                summary.unreachable = str(exc)
                return
            log.warning("%s; retrying (%d/%d)", exc, failures, ASSOCIATION_RETRIES)
            time.sleep(0.5 * failures)
            continue
        failures = 0
        _send_over(link, assoc, pending, aborted_once, summary, progress)


def _send_over(
    link: _Link,
    assoc: Association,
    pending: deque[Prepared],
    aborted_once: set[int],
    summary: Summary,
    progress: Progress,
) -> None:
    """Send ``pending`` in order over ``assoc``, removing each file once it has an outcome;
    return when none is left or the association has ended (it is then closed).

    A file the peer ends the association on is tried once more on a new one, then fails;
    one it never answers fails at once (it has waited the DIMSE timeout)."""
    while pending:
        p = pending[0]
        try:
            status = _store(assoc, p, link.next_message_id())
        except ValueError as exc:  # no accepted context for this file's syntax
            pending.popleft()
            summary.fail(p.name, str(exc))
            continue
        if "Status" in status:
            pending.popleft()
            _record(p, status, summary)
            progress.update(summary)
            continue
        lost = lost_reason(assoc)
        link.close()
        peer = f"{link.peer.ae_title}@{link.peer.host}:{link.peer.port}"
        if lost is None:
            pending.popleft()
            waited = f"{link.peer.timeout:g} s"
            summary.fail(p.name, f"no response from {peer} within {waited} (association aborted)")
        elif id(p) in aborted_once:
            pending.popleft()
            summary.fail(p.name, f"{peer}: {lost} while receiving it (twice, on new associations)")
        else:
            aborted_once.add(id(p))
            log.info("%s: %s while receiving it; trying it on a new association", p.name, lost)
        progress.update(summary)
        return


def _store(assoc: Association, p: Prepared, msg_id: int) -> Dataset:
    """Send the bytes as encoded; if the peer refused that syntax, let pynetdicom convert
    between uncompressed syntaxes (it refuses compressed ones: ``ValueError``)."""
    try:
        return send_encoded(assoc, p.encoded, msg_id)
    except ValueError:
        return _store_converted(assoc, p.encoded)


def _store_converted(assoc: Association, e: Encoded) -> Dataset:
    """The object decoded and handed to pynetdicom, which converts it to an accepted
    uncompressed syntax (deflated too); raises ``ValueError`` naming why it cannot."""
    part10 = file_meta_bytes(e.sop_class_uid, e.sop_instance_uid, e.transfer_syntax) + e.dataset
    try:
        ds = pydicom.dcmread(BytesIO(part10))
    except (InvalidDicomError, AttributeError, TypeError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot convert it to a syntax the peer accepts: {exc}") from exc
    if not usable(assoc):  # ended while the reactor was paused: no answer can come
        return Dataset()
    try:
        return assoc.send_c_store(ds)
    except (AttributeError, TypeError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot convert it to a syntax the peer accepts: {exc}") from exc


def _record(p: Prepared, status: Dataset, summary: Summary) -> None:
    failure = status_failure(status)
    if failure:
        summary.fail(p.name, failure)
    else:
        summary.stored(p.name, p.size, int(status.Status))


def _prepare(items: Iterator[Item | Rejected], summary: Summary) -> Iterator[Prepared]:
    """The objects to send; non-DICOM files and links not followed are skipped, and those
    that cannot be read (a zip member refused) or fail a check before sending
    (:mod:`node.tools.precheck`) fail here, never sent."""
    for item in items:
        if isinstance(item, Rejected):
            _rejected(item, summary)
            continue
        try:
            encoded = _split(item)
        except PreprocessError as exc:  # its message names the file already
            summary.fail(item.name, str(exc).removeprefix(f"{item.name}: "))
            continue
        if why := problem(encoded):
            summary.fail(item.name, f"not sent: {why}")
            continue
        yield Prepared(item.name, len(item.data), encoded)


def _rejected(item: Rejected, summary: Summary) -> None:
    if item.failed:
        summary.fail(item.name, item.reason)
    else:
        summary.skip(item.name, item.reason)
        log.debug("skipped %s: %s", item.name, item.reason or "not DICOM")


def _split(item: Item) -> Encoded:
    """The file's identity and data set bytes: from its File Meta group and first elements
    where they suffice (the cheap path), else through pydicom's full header read."""
    fast = split_part10(item.data)
    if fast is None:
        return split_encoded(item.data, item.name)
    sop_class, sop_uid, syntax, offset = fast
    return Encoded(sop_class, sop_uid, syntax, item.data[offset:])


def push(
    paths: list[Path],
    peer: Peer,
    *,
    recursive: bool = True,
    dry_run: bool = False,
    associations: int = DEFAULT_ASSOCIATIONS,
    max_member: int = MAX_MEMBER_BYTES,
    follow_symlinks: bool = False,
    progress_stream: TextIO | None = sys.stderr,
) -> Summary:
    """Send every DICOM object under ``paths``; bad files are counted, never fatal.
    ``max_member`` and ``follow_symlinks``: see :mod:`node.tools.archive`.

    Raises :class:`~node.core.errors.ArchiveError` for an unreadable path or archive.
    """
    summary = Summary()
    start = time.perf_counter()
    progress = Progress(progress_stream)
    items = iter_items(
        paths, recursive=recursive, max_member=max_member, follow_symlinks=follow_symlinks
    )
    prepared = _prepare(items, summary)
    if dry_run:
        summary.dry_run = True
        for p in prepared:
            summary.sent += 1
            summary.outcomes.append((p.name, DRY_RUN, _identity(p.encoded)))
    else:  # files are read and parsed here while worker threads send
        n = max(1, associations)
        _parallel(peer, chunks(prepared, CHUNK_FILES // n or 1), n, summary, progress)
    progress.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _identity(e: Encoded) -> str:
    """An object's SOP class (named) and SOP instance UID, for the dry run's listing."""
    sop_class = UID(e.sop_class_uid)
    named = sop_class.name if sop_class.is_valid and sop_class.name != sop_class else ""
    return f"{named or 'SOP class ' + sop_class} {e.sop_instance_uid}"


def _send_guarded(link: _Link, batch: list[Prepared], summary: Summary, progress: Progress) -> None:
    """:func:`_send_batch` in a worker thread: an unexpected error fails this chunk (and
    drops the association) instead of killing the worker, which would leave the reading
    thread blocked on a full queue."""
    try:
        _send_batch(link, batch, summary, progress)
    except Exception as exc:  # recorded in the summary and logged, never swallowed
        log.error("sending a chunk of %d file(s) failed: %s", len(batch), exc)
        log.debug("the chunk's traceback", exc_info=exc)
        with summary.lock:
            done = {name for name, _, _ in summary.outcomes}
        summary.fail_all([p.name for p in batch if p.name not in done], f"not sent: {exc}")
        link.close()


def _parallel(
    peer: Peer, batches: Iterator[list[Prepared]], n: int, summary: Summary, progress: Progress
) -> None:
    work: queue.Queue[list[Prepared] | None] = queue.Queue(maxsize=n)

    def run() -> None:
        link = _Link(peer)
        try:
            while (batch := work.get()) is not None:
                _send_guarded(link, batch, summary, progress)
        finally:
            link.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        for batch in batches:
            work.put(batch)
    finally:
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join()
