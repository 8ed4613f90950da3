"""Catch-up over DICOM query/retrieve: nothing the PACS holds is lost to the route.

Orthanc's route (config/route-to-node.lua) sends each image once and never retries: an
image routed while the node is down, or refused while its spool is full (0xA700), would never
arrive. So the node asks the PACS itself, every ``catchup.interval`` seconds, with standard
Study Root query/retrieve (any PACS that speaks it, not only Orthanc):

1. C-FIND, STUDY level: the studies whose StudyDate is on or after the date
   ``catchup.window_hours`` ago (an open range: a modality whose clock runs ahead still
   matches). PACS do not say over DICOM when they *stored* an instance, so an instance whose
   StudyDate is older, or absent, is not seen by the catch-up: ``cxr-node backfill`` is for
   those;
2. C-FIND, SERIES level in each study: the series whose Modality is one of
   ``filter.modalities`` (compared here: not every PACS matches ModalitiesInStudy);
3. C-FIND, IMAGE level in those series: their SOP Instance UIDs;
4. minus the instances the job table knows (any state) and those the SCP refused for good
   (the data set itself was refused: 0xC000, 0xA900, too large);
5. an instance seen missing for at least ``catchup.grace`` seconds (live routing wins) is
   C-MOVEd to the node's own AE title: the PACS C-STOREs it to the SCP, the normal path. At
   most ``catchup.max_per_round`` per round; a round stops after
   :data:`MAX_FAILED_IN_A_ROW` failed C-MOVEs in a row (the node refusing for lack of space,
   say: the rest wait for the next round).

A study whose every instance was known is remembered with the NumberOfStudyRelatedInstances
the PACS reported; while it reports the same number, the study is not queried again (one
C-FIND per round on a quiet day). Only where the answers were complete: as many series as
its NumberOfStudyRelatedSeries, and in each series of interest as many instances as its
NumberOfSeriesRelatedInstances. A lost C-FIND response (stock pynetdicom's association loop
can take one) or a PACS that does not return the counts leaves the study queried each round.

The pure part (:func:`plan_round`, :func:`study_dates`, :func:`date_range`) takes the clock
as an argument; :class:`CatchUp` is the node's thread; :func:`backfill` the CLI's run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.status import STATUS_PENDING, STATUS_SUCCESS, code_to_category

from node.core.errors import NodeError, SendError, SpoolError
from node.net.scu import Peer, associate, client_ssl_context

if TYPE_CHECKING:
    from node.core.config import NodeConfig
    from node.core.metrics import Metrics
    from node.store.spool import Spool

log = logging.getLogger(__name__)

QR_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
QR_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Query/Retrieve Information Model - MOVE
MAX_FAILED_IN_A_ROW = 3
STATUS_FILE = "catchup.json"
"""The last round's summary, in the spool: what ``cxr-node status`` shows."""


class RetrieveError(SendError):
    """A query/retrieve exchange with the PACS failed (association, C-FIND or C-MOVE)."""


class MoveFailed(RetrieveError):
    """One C-MOVE did not deliver its instance (the association is still usable)."""


class KnownIndex(Protocol):
    """What the node already has: the spool (the node) or a read-only view (backfill)."""

    def known_uids(self, uids: Collection[str]) -> set[str]: ...

    def refused_uids(self, uids: Collection[str]) -> set[str]: ...


# -- the pure part ------------------------------------------------------------------------
@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str


@dataclass(frozen=True)
class Study:
    uid: str
    related: str  # NumberOfStudyRelatedInstances as the PACS wrote it; "" if not returned
    modalities: tuple[str, ...]  # ModalitiesInStudy; () if not returned
    series: str = ""  # NumberOfStudyRelatedSeries as the PACS wrote it; "" if not returned


@dataclass(frozen=True)
class Listing:
    """A study's instances of interest, and whether the answers were complete: every
    series the study counts was listed, and every instance each of those series counts."""

    instances: list[Instance]
    complete: bool


def related_count(value: object) -> int | None:
    """A Number Of ... Related ... value as a count; None if not returned or not a count."""
    text = str(value if value is not None else "").strip()
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class Plan:
    """One round's arithmetic: what was found, known, refused, and what to fetch now."""

    found: int
    known: int
    refused: int
    waiting: int  # missing, still within the grace period
    due: tuple[Instance, ...]
    first_seen: Mapping[str, float]  # every missing instance: when it was first seen missing


def plan_round(
    found: Sequence[Instance],
    known: Collection[str],
    refused: Collection[str],
    first_seen: Mapping[str, float],
    failures: Mapping[str, int],
    now: float,
    grace: float,
    limit: int,
) -> Plan:
    """Subtract what is known and refused; fetch what has been missing for ``grace`` seconds
    (fewest failed fetches first, then longest missing), at most ``limit``."""
    unique = list({i.sop: i for i in found}.values())
    missing = [i for i in unique if i.sop not in known and i.sop not in refused]
    seen = {i.sop: first_seen.get(i.sop, now) for i in missing}
    ripe = [i for i in missing if now - seen[i.sop] >= grace]
    ripe.sort(key=lambda i: (failures.get(i.sop, 0), seen[i.sop], i.sop))
    n_known = sum(1 for i in unique if i.sop in known)
    return Plan(
        found=len(unique),
        known=n_known,
        refused=len(unique) - n_known - len(missing),
        waiting=len(missing) - len(ripe),
        due=tuple(ripe[:limit]),
        first_seen=seen,
    )


def study_dates(now: datetime, window_hours: float) -> str:
    """The StudyDate range covering the last ``window_hours``: from that day on, open-ended."""
    return f"{now - timedelta(hours=window_hours):%Y%m%d}-"


def date_range(since: date | None, until: date | None) -> str:
    """A StudyDate range query value ("" matches any date)."""
    if since is None and until is None:
        return ""
    first = f"{since:%Y%m%d}" if since else ""
    last = f"{until:%Y%m%d}" if until else ""
    return f"{first}-{last}"


def wanted(study: Study, modalities: Collection[str]) -> bool:
    """Whether a study may hold instances of ``modalities`` (unknown: yes)."""
    return not study.modalities or bool(set(study.modalities) & set(modalities))


@dataclass(frozen=True)
class Done:
    """A study whose answers were complete and every instance of interest known (or
    refused) at ``related``."""

    related: str
    instances: int


def split_done(
    studies: Sequence[Study], done: Mapping[str, Done]
) -> tuple[list[Study], dict[str, Done]]:
    """The studies to query, and those unchanged since all their instances were known."""
    todo: list[Study] = []
    unchanged: dict[str, Done] = {}
    for s in studies:
        prev = done.get(s.uid)
        if s.related and prev is not None and prev.related == s.related:
            unchanged[s.uid] = prev
        else:
            todo.append(s)
    return todo, unchanged


def newly_done(
    queried: Sequence[Study], found: Sequence[Instance], missing: Collection[str]
) -> dict[str, Done]:
    """The queried studies none of whose instances is missing (and whose size is known)."""
    count: dict[str, int] = {}
    incomplete: set[str] = set()
    for i in {i.sop: i for i in found}.values():
        count[i.study] = count.get(i.study, 0) + 1
        if i.sop in missing:
            incomplete.add(i.study)
    return {
        s.uid: Done(s.related, count.get(s.uid, 0))
        for s in queried
        if s.related and s.uid not in incomplete
    }


# -- query/retrieve over one association --------------------------------------------------
def _code(status: Dataset | None, what: str) -> int:
    if status is None or "Status" not in status:
        raise RetrieveError(f"{what}: no response (association aborted or timed out)")
    return int(status.Status)


def _failure(status: Dataset, code: int) -> str:
    category = code_to_category(code).lower()
    text = f"{category} status 0x{code:04X}"
    failed = status.get("NumberOfFailedSuboperations")
    if failed:
        text += f", {failed} failed sub-operation(s)"
    comment = str(status.get("ErrorComment", "")).strip()
    return f"{text} {comment}".rstrip()


class QRSession:
    """C-FIND and C-MOVE (Study Root) on one established association."""

    def __init__(self, assoc: Association, where: str, destination: str) -> None:
        self.assoc = assoc
        self.where = where
        self.destination = destination

    def find(self, query: Dataset) -> list[Dataset]:
        what = f"C-FIND {query.QueryRetrieveLevel} at {self.where}"
        matches: list[Dataset] = []
        for status, identifier in self.assoc.send_c_find(query, QR_FIND):
            code = _code(status, what)
            category = code_to_category(code)
            if category == STATUS_PENDING:
                if identifier is not None:
                    matches.append(identifier)
            elif category == STATUS_SUCCESS:
                return matches
            else:
                raise RetrieveError(f"{what}: {_failure(status, code)}")
        raise RetrieveError(f"{what}: the responses ended without a final status")

    def studies(self, dates: str, uids: Sequence[str] = ()) -> list[Study]:
        """Studies in the StudyDate range ``dates`` ("" any), of ``uids`` if given."""
        out: list[Study] = []
        for uid in uids or [""]:
            query = _query("STUDY", StudyInstanceUID=uid, StudyDate=dates)
            query.ModalitiesInStudy = ""
            query.NumberOfStudyRelatedInstances = ""
            query.NumberOfStudyRelatedSeries = ""
            for m in self.find(query):
                out.append(
                    Study(
                        str(m.get("StudyInstanceUID", "")),
                        str(m.get("NumberOfStudyRelatedInstances", "") or ""),
                        tuple(_values(m.get("ModalitiesInStudy"))),
                        str(m.get("NumberOfStudyRelatedSeries", "") or ""),
                    )
                )
        return [s for s in out if s.uid]

    def instances(self, study: Study, modalities: Collection[str]) -> Listing:
        """The instances of ``modalities`` in ``study``; complete only where the PACS's
        counts say nothing was left out (a lost response, a PACS that stops early)."""
        series = self.find(
            _query(
                "SERIES",
                StudyInstanceUID=study.uid,
                SeriesInstanceUID="",
                Modality="",
                NumberOfSeriesRelatedInstances="",
            )
        )
        complete = related_count(study.series) == len(series)
        out: list[Instance] = []
        for s in series:
            uid = str(s.get("SeriesInstanceUID", ""))
            if not uid or str(s.get("Modality", "")) not in modalities:
                continue
            query = _query(
                "IMAGE", StudyInstanceUID=study.uid, SeriesInstanceUID=uid, SOPInstanceUID=""
            )
            listed = [
                Instance(study.uid, uid, str(m.SOPInstanceUID))
                for m in self.find(query)
                if m.get("SOPInstanceUID")
            ]
            expected = related_count(s.get("NumberOfSeriesRelatedInstances"))
            complete = complete and expected == len({i.sop for i in listed})
            out += listed
        return Listing(out, complete)

    def move(self, inst: Instance) -> None:
        """C-MOVE one instance to our SCP; raises :class:`MoveFailed` unless it arrived."""
        what = f"C-MOVE of {inst.sop} from {self.where} to {self.destination}"
        query = _query(
            "IMAGE",
            StudyInstanceUID=inst.study,
            SeriesInstanceUID=inst.series,
            SOPInstanceUID=inst.sop,
        )
        for status, _identifier in self.assoc.send_c_move(query, self.destination, QR_MOVE):
            code = _code(status, what)
            category = code_to_category(code)
            if category == STATUS_PENDING:
                continue
            if category == STATUS_SUCCESS:
                if status.get("NumberOfCompletedSuboperations") == 0:
                    raise MoveFailed(f"{what}: nothing moved (the PACS no longer has it)")
                return
            raise MoveFailed(f"{what}: {_failure(status, code)}")
        raise RetrieveError(f"{what}: the responses ended without a final status")


def _values(value: object) -> list[str]:
    """A multi-valued attribute's values (pydicom gives a str for one, a MultiValue for
    several)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, Iterable):
        return [str(v) for v in value if v]
    return [str(value)]


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for name, value in keys.items():
        setattr(ds, name, value)
    return ds


_SYNTAXES: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@contextmanager
def open_session(
    peer: Peer, destination: str, hold: Callable[[Association | None], None] | None = None
) -> Iterator[QRSession]:
    """An association to ``peer`` for C-FIND and C-MOVE (to ``destination``). ``hold`` is
    given the association while it is open (so that a stop can abort it), then None."""
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    with associate(peer, [(QR_FIND, _SYNTAXES), (QR_MOVE, _SYNTAXES)]) as assoc:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for uid, name in ((QR_FIND, "C-FIND"), (QR_MOVE, "C-MOVE")):
            if uid not in accepted:
                raise RetrieveError(f"{where} refused Study Root query/retrieve {name}")
        if hold is not None:
            hold(assoc)
        try:
            yield QRSession(assoc, where, destination)
        finally:
            if hold is not None:
                hold(None)


@dataclass
class Tally:
    fetched: int = 0
    errors: int = 0
    last_error: str = ""


def fetch(
    qr: QRSession,
    due: Sequence[Instance],
    stop: threading.Event | None = None,
    failures: dict[str, int] | None = None,
    advance: Callable[[], None] | None = None,
) -> Tally:
    """C-MOVE each instance in turn; stop after :data:`MAX_FAILED_IN_A_ROW` failures in a
    row, at the first association failure, or when ``stop`` is set."""
    tally = Tally()
    in_a_row = 0
    for inst in due:
        if stop is not None and stop.is_set():
            break
        try:
            qr.move(inst)
        except MoveFailed as exc:
            log.warning("%s", exc)
            tally.errors += 1
            tally.last_error = str(exc)
            in_a_row += 1
            if failures is not None:
                failures[inst.sop] = failures.get(inst.sop, 0) + 1
        except RetrieveError as exc:
            log.warning("%s", exc)
            tally.errors += 1
            tally.last_error = str(exc)
            break
        else:
            tally.fetched += 1
            in_a_row = 0
        if advance is not None:
            advance()
        if in_a_row >= MAX_FAILED_IN_A_ROW:
            log.warning("%d C-MOVEs failed in a row: the rest wait", in_a_row)
            break
    return tally


# -- the node's thread --------------------------------------------------------------------
def qr_peer(cfg: NodeConfig) -> Peer:
    """The query/retrieve peer: the [destination] PACS, with [catchup]'s overrides."""
    d, c = cfg.destination, cfg.catchup
    tls = client_ssl_context(d.tls_ca_file, d.tls_cert_file, d.tls_key_file) if d.tls else None
    return Peer(
        c.host or d.host,
        c.port or d.port,
        c.ae_title or d.ae_title,
        c.calling_ae_title or d.calling_ae_title,
        d.timeout,
        tls,
        cfg.network.fast_paths,
    )


@dataclass(frozen=True)
class RoundSummary:
    time: float
    seconds: float
    studies: int = 0
    found: int = 0
    known: int = 0
    refused: int = 0
    waiting: int = 0
    fetched: int = 0
    errors: int = 0
    error: str = ""

    def describe(self) -> str:
        return (
            f"{self.studies} studies, {self.found} instances found, {self.known} already "
            f"known, {self.refused} refused, {self.waiting} waiting (grace), {self.fetched} "
            f"fetched, {self.errors} errors in {self.seconds:.1f} s"
        )


class CatchUp:
    """The catch-up thread: ``run`` until ``stop`` is set; ``round`` does one round."""

    def __init__(
        self,
        cfg: NodeConfig,
        spool: Spool,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        today: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.metrics = metrics
        self.clock = clock
        self.today = today
        self.peer = qr_peer(cfg)
        self._first_seen: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._done: dict[str, Done] = {}
        self._lock = threading.Lock()
        self._assoc: Association | None = None

    def run(self, stop: threading.Event) -> None:
        c = self.cfg.catchup
        log.info(
            "catch-up every %g s from %s@%s:%d (StudyDate within %g h, grace %g s)",
            c.interval,
            self.peer.ae_title,
            self.peer.host,
            self.peer.port,
            c.window_hours,
            c.grace,
        )
        while not stop.is_set():
            began = time.monotonic()
            self.guarded_round(stop)
            if stop.wait(max(0.0, c.interval - (time.monotonic() - began))):
                return

    def interrupt(self) -> None:
        """Abort the round's association (a stopping node does not wait for the PACS)."""
        with self._lock:
            if self._assoc is not None:
                self._assoc.abort()

    def _hold(self, assoc: Association | None) -> None:
        with self._lock:
            self._assoc = assoc

    def guarded_round(self, stop: threading.Event) -> RoundSummary:
        """One round; whatever it raises is logged (type and message) and the next round
        runs as usual: one failed round never stops the catch-up."""
        began = time.monotonic()
        try:
            summary = self.round(stop)
        except NodeError as exc:
            summary = self._failed(began, exc)
            log.warning("catch-up round failed: %s: %s", type(exc).__name__, exc)
        except Exception as exc:  # the per-round boundary (a bug, or a peer's surprise)
            summary = self._failed(began, exc)
            log.error("catch-up round failed: %s: %s", type(exc).__name__, exc)
            log.debug("catch-up round traceback", exc_info=exc)
        self._publish(summary, stop)
        return summary

    def _failed(self, began: float, exc: BaseException) -> RoundSummary:
        return RoundSummary(
            time.time(), time.monotonic() - began, errors=1, error=f"{type(exc).__name__}: {exc}"
        )

    def round(self, stop: threading.Event) -> RoundSummary:
        c = self.cfg.catchup
        began, mods = time.monotonic(), self.cfg.filter.modalities
        with open_session(self.peer, self.cfg.scp.ae_title, self._hold) as qr:
            studies = [
                s for s in qr.studies(study_dates(self.today(), c.window_hours)) if wanted(s, mods)
            ]
            todo, unchanged = split_done(studies, self._done)
            listed = {s.uid: listed_fully(qr, s, mods) for s in todo if not stop.is_set()}
            found = [i for listing in listed.values() for i in listing.instances]
            uids = {i.sop for i in found}
            known = self.spool.known_uids(uids)
            refused = self.spool.refused_uids(uids - known)
            plan = plan_round(
                found,
                known,
                refused,
                self._first_seen,
                self._failures,
                self.clock(),
                c.grace,
                c.max_per_round,
            )
            # a study is remembered as done only where its answers were complete
            complete = [s for s in todo if s.uid in listed and listed[s.uid].complete]
            self._remember(plan, complete, found, unchanged)
            tally = fetch(qr, plan.due, stop, self._failures)
        cached = sum(d.instances for d in unchanged.values())
        return RoundSummary(
            time.time(),
            time.monotonic() - began,
            studies=len(studies),
            found=plan.found + cached,
            known=plan.known + cached,
            refused=plan.refused,
            waiting=plan.waiting,
            fetched=tally.fetched,
            errors=tally.errors,
            error=tally.last_error,
        )

    def _remember(
        self,
        plan: Plan,
        todo: Sequence[Study],
        found: Sequence[Instance],
        unchanged: dict[str, Done],
    ) -> None:
        self._first_seen = dict(plan.first_seen)
        self._failures = {k: v for k, v in self._failures.items() if k in self._first_seen}
        self._done = {**unchanged, **newly_done(todo, found, self._first_seen)}

    def _publish(self, summary: RoundSummary, stop: threading.Event) -> None:
        log.info("catch-up round: %s", summary.describe())
        if self.metrics is not None:
            self.metrics.catchup_rounds.inc()
            self.metrics.catchup_fetched.inc(summary.fetched)
            self.metrics.catchup_errors.inc(summary.errors)
            self.metrics.catchup_last_round.set(summary.time)
        if stop.is_set():
            return  # the spool is being closed
        try:
            self.spool.write_atomic(
                json.dumps(asdict(summary)).encode(), self.spool.root / STATUS_FILE
            )
        except SpoolError as exc:
            log.warning("catch-up summary not saved: %s", exc)


# -- backfill (the CLI) ----------------------------------------------------------------------
class Progress(Protocol):
    def start(self, total: int) -> None: ...

    def advance(self) -> None: ...


@dataclass(frozen=True)
class BackfillReport:
    studies: int
    found: int
    known: int
    refused: int
    fetched: int
    errors: int
    seconds: float
    last_error: str = ""

    def describe(self) -> str:
        return (
            f"backfill: {self.studies} studies, {self.found} instances found, {self.known} "
            f"already known, {self.refused} refused, {self.fetched} fetched, {self.errors} "
            f"errors in {self.seconds:.1f} s"
        )


LISTING_TRIES = 3
"""How many times in all a study whose answers came back incomplete by the PACS's own
counts is asked for (a lost response); a catch-up round that still finds it incomplete
leaves it to the next round."""


def listed_fully(qr: QRSession, study: Study, modalities: Collection[str]) -> Listing:
    """``qr.instances``, asked again (up to :data:`LISTING_TRIES` times in all) while the
    answers are incomplete and the PACS gives the counts that say so."""
    listing = qr.instances(study, modalities)
    for _ in range(LISTING_TRIES - 1):
        if listing.complete or related_count(study.series) is None:
            return listing
        listing = qr.instances(study, modalities)
    if not listing.complete:
        log.warning(
            "study %s: the PACS's answers stayed incomplete in %d tries (fewer series or "
            "instances than it counts): fetching what was listed",
            study.uid,
            LISTING_TRIES,
        )
    return listing


def backfill(
    cfg: NodeConfig,
    index: KnownIndex,
    dates: str,
    study_uids: Sequence[str],
    progress: Progress,
) -> BackfillReport:
    """Query the PACS over the dates and studies given, and C-MOVE to the node what it has
    neither received nor refused (no grace period, no limit)."""
    began, mods = time.monotonic(), cfg.filter.modalities
    with open_session(qr_peer(cfg), cfg.scp.ae_title) as qr:
        studies = [s for s in qr.studies(dates, study_uids) if wanted(s, mods)]
        found = [i for s in studies for i in listed_fully(qr, s, mods).instances]
        uids = {i.sop for i in found}
        known = index.known_uids(uids)
        refused = index.refused_uids(uids - known)
        plan = plan_round(found, known, refused, {}, {}, 0.0, 0.0, max(1, len(uids)))
        progress.start(len(plan.due))
        tally = fetch(qr, plan.due, advance=progress.advance)
    return BackfillReport(
        len(studies),
        plan.found,
        plan.known,
        plan.refused,
        tally.fetched,
        tally.errors,
        time.monotonic() - began,
        tally.last_error,
    )
