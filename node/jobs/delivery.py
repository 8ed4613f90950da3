"""SR delivery, in its own thread: every due SR goes to the destination over one association
per round, each file sent as it is stored (its bytes, not decoded and re-encoded).

Two kinds of failure, two rules:

* **connection** (refused, timed out, aborted, association rejected): the destination is
  *unreachable*. Nothing counts against the SRs: their jobs stay ``classified``, whatever the
  length of the outage. The thread then probes the destination with C-ECHO every
  ``destination.probe_interval`` seconds, and sends every pending SR as soon as it answers
  (no backoff to wait out).
* **status** (the destination answered a C-STORE with a failure status, or refused the SR's
  presentation context): the SR is tried again after an exponential backoff capped at
  ``worker.backoff_max``, and is dead-lettered only when it has been refused at least
  ``worker.max_attempts`` times *and* for longer than ``destination.retry_for``.

Whether the destination is reachable, since when and why not, is kept in the spool
(``delivery.json``, written atomically on change) for ``cxr-node status``, with the C-STOREs
the node's own SCP refused, by status.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol

from node.core.config import NodeConfig
from node.core.errors import ContextsRefused, NodeError, ReportError, SendError, unexpected
from node.core.metrics import Metrics
from node.dicom.dicomio import Encoded, split_encoded
from node.dicom.wire import split_part10
from node.jobs.rounds import run_rounds
from node.net.scu import BatchResult, Peer, echo, store_encoded
from node.store.spool import Job, Spool, summary_path

log = logging.getLogger(__name__)

BATCH = 64
"""SRs sent per round at most, over one association (a few KiB each)."""
BATCH_BYTES = 32 * 2**20
"""Bytes read and sent per round at most, beyond its first job (an uncompressed summary image
is ~3 MiB): after an outage a round must not read hundreds of MiB into memory."""
STATE_FILE = "delivery.json"


def backoff_delay(attempts: int, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff with jitter: ``min(cap, base * 2**(attempts-1))`` scaled by 0.5..1."""
    return min(cap, base * 2.0 ** max(0, attempts - 1)) * (0.5 + 0.5 * jitter)


def dead_letter_due(
    attempts: int, failing_since: float, now: float, max_attempts: int, retry_for: float
) -> bool:
    """Whether an SR refused by status ``attempts`` times, first at ``failing_since``, is
    given up on at ``now``: only when both the attempts and the window are spent."""
    return attempts >= max_attempts and now - failing_since >= retry_for


def stored_bytes(job: Job) -> int:
    """The size of the job's SR and summary image files (0 for those that cannot be read:
    reading them fails the job, as it should)."""
    total = 0
    for path in () if job.report is None else (job.report, summary_path(job.report)):
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total


def within_bytes(jobs: Sequence[Job], budget: int) -> list[Job]:
    """The first jobs whose files together stay within ``budget`` bytes (at least one)."""
    chosen: list[Job] = []
    total = 0
    for job in jobs:
        total += stored_bytes(job)
        if chosen and total > budget:
            break
        chosen.append(job)
    return chosen


def per_job(loaded: Sequence[tuple[Job, Sequence[Encoded]]], failures: Sequence[str]) -> list[str]:
    """Each job's outcome from its objects' (the SR, then its summary image), for the jobs
    whose objects were all answered: "" when all were stored, else the first failure."""
    out: list[str] = []
    at = 0
    for _job, objects in loaded:
        mine = failures[at : at + len(objects)]
        if len(mine) < len(objects):
            break
        out.append(next((f for f in mine if f), ""))
        at += len(objects)
    return out


class Destination(Protocol):
    """Where the SRs go (:class:`PeerDestination`; tests pass fakes)."""

    @property
    def name(self) -> str: ...

    def store(self, items: Sequence[Encoded], stop: Callable[[], bool]) -> BatchResult:
        """Send ``items`` over one association; raises :class:`SendError` (``Unreachable``
        when no association can be had, ``ContextsRefused`` when none of them is taken)."""
        ...

    def echo(self) -> None:
        """C-ECHO; raises :class:`SendError` unless the destination answers success."""
        ...


class PeerDestination:
    """A DICOM peer, over the network (:mod:`node.net.scu`)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    @property
    def name(self) -> str:
        return f"{self.peer.ae_title}@{self.peer.host}:{self.peer.port}"

    def store(self, items: Sequence[Encoded], stop: Callable[[], bool]) -> BatchResult:
        return store_encoded(self.peer, items, stop)

    def echo(self) -> None:
        echo(self.peer)


@dataclass(frozen=True)
class DestinationState:
    """What ``cxr-node status`` shows of the delivery (persisted in :data:`STATE_FILE`)."""

    name: str
    up: bool | None = None  # None: not contacted yet
    since: float = 0.0  # when it became reachable or unreachable
    reason: str = ""  # why it is unreachable
    refused: dict[str, int] = field(default_factory=dict)  # C-STOREs our SCP refused

    def lines(self, pending: int, dead: int, notices: dict[str, int] | None = None) -> list[str]:
        when = datetime.fromtimestamp(self.since).isoformat(sep=" ", timespec="seconds")
        if self.up is None:
            where = "not contacted yet"
        elif self.up:
            where = f"reachable (since {when})"
        else:
            where = f"unreachable since {when} ({self.reason})"
        refused = ", ".join(f"{s} x{n}" for s, n in sorted(self.refused.items())) or "none"
        n = notices or {}
        return [
            f"destination {self.name}: {where}",
            f"SRs pending: {pending} (dead-lettered: {dead})",
            f"not-analysed notices pending: {n.get('pending', 0)} (dead-lettered: "
            f"{n.get('dead', 0)}, unreadable: {n.get('failed', 0)})",
            f"C-STOREs refused by the node's SCP: {refused}",
        ]


def read_state(root: Path, name: str) -> DestinationState:
    """The state the running (or last) node wrote; "not contacted yet" if none."""
    try:
        data = json.loads((root / STATE_FILE).read_text())
        return DestinationState(
            name=str(data["name"]),
            up=data["up"] if data["up"] is None else bool(data["up"]),
            since=float(data["since"]),
            reason=str(data["reason"]),
            refused={str(k): int(v) for k, v in dict(data["refused"]).items()},
        )
    except FileNotFoundError:
        return DestinationState(name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s unreadable: %s", root / STATE_FILE, exc)
        return DestinationState(name, reason=f"unknown: {STATE_FILE} unreadable")


def encoded(data: bytes, where: str) -> Encoded:
    """A Part 10 file's identity and data set bytes, as stored."""
    fast = split_part10(data)
    if fast is None:
        return split_encoded(data, where)
    sop_class, sop_uid, syntax, offset = fast
    return Encoded(sop_class, sop_uid, syntax, data[offset:])


class Delivery:
    """Delivers the SRs. ``run`` loops until ``stop`` is set; ``step`` does one round."""

    def __init__(
        self,
        spool: Spool,
        cfg: NodeConfig,
        destination: Destination,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
    ) -> None:
        self.spool = spool
        self.cfg = cfg
        self.destination = destination
        self.clock = clock
        self.rng = rng
        self.metrics = metrics
        self.state = DestinationState(destination.name)
        self._next_probe = 0.0

    # -- the destination's state -------------------------------------------------------------
    def _set_state(self, state: DestinationState) -> None:
        if state == self.state:
            return
        self.state = state
        if self.metrics is not None and state.up is not None:
            self.metrics.destination_up.set(1 if state.up else 0)
        try:
            self.spool.write_atomic(
                json.dumps(asdict(state)).encode(), self.spool.root / STATE_FILE
            )
        except NodeError as exc:  # what status shows is stale; delivery goes on
            log.warning("cannot record the destination's state: %s", exc)

    def _up(self, now: float) -> None:
        if self.state.up:
            return
        if self.state.up is False:
            log.info(
                "destination %s reachable again after %.1f s",
                self.destination.name,
                now - self.state.since,
            )
        self._set_state(replace(self.state, up=True, since=now, reason=""))

    def _down(self, reason: str, now: float) -> None:
        """A connection failure: nothing counts against the SRs; probe from now on."""
        self._next_probe = now + self.cfg.destination.probe_interval
        if self.metrics is not None:
            self.metrics.sr_send_failures.labels("connection").inc()
        if self.state.up is not False:
            log.warning(
                "destination %s unreachable: %s; SRs wait (not counted as failed attempts), "
                "C-ECHO every %g s",
                self.destination.name,
                reason,
                self.cfg.destination.probe_interval,
            )
            self._set_state(replace(self.state, up=False, since=now, reason=reason))
        elif reason != self.state.reason:
            log.info("destination %s still unreachable: %s", self.destination.name, reason)
            self._set_state(replace(self.state, reason=reason))

    def _probe(self, now: float) -> bool:
        try:
            self.destination.echo()
        except SendError as exc:
            self._down(str(exc), now)
            return False
        self._up(now)
        return True

    def _note_refused(self) -> None:
        if self.metrics is not None:
            self._set_state(replace(self.state, refused=self.metrics.refused_c_stores()))

    # -- one round ---------------------------------------------------------------------------
    def step(self, stop: threading.Event | None = None) -> int:
        """Probe the destination if it is down and a probe is due; send every due SR (up to
        :data:`BATCH` and :data:`BATCH_BYTES`) over one association. Returns the SRs given
        an outcome."""
        now = self.clock()
        self._note_refused()
        if self.state.up is False and (now < self._next_probe or not self._probe(now)):
            return 0
        jobs = self.spool.due_deliveries(now, BATCH)
        if not jobs:
            if self.state.up is None:  # say early whether the destination can be reached
                self._probe(now)
            return 0
        jobs = within_bytes(jobs, BATCH_BYTES)
        loaded = [(job, e) for job in jobs if (e := self._load(job)) is not None]
        if loaded:
            self._send(loaded, now, stop)
        return len(jobs)

    def _load(self, job: Job) -> list[Encoded] | None:
        """The job's SR file as stored, and its summary image where there is one; a job
        whose files cannot be read fails alone."""
        try:
            if job.report is None:
                raise ReportError("classified job has no SR file")
            objects = [encoded(job.report.read_bytes(), f"SR file {job.report.name}")]
            summary = summary_path(job.report)
            if summary.exists():
                objects.append(encoded(summary.read_bytes(), f"summary file {summary.name}"))
            return objects
        except NodeError as exc:
            self._fail(job, exc)
        except OSError as exc:
            self._fail(job, ReportError(f"cannot read the SR file: {exc}"))
        except Exception as exc:  # the per-job boundary
            log.debug("reading the SR of job %d raised", job.id, exc_info=True)
            self._fail(job, unexpected(ReportError, "reading the SR file failed", exc))
        return None

    def _fail(self, job: Job, exc: NodeError) -> None:
        log.error("job %d (%s): SR not delivered: %s", job.id, job.sop_instance_uid, exc)
        if job.notice:  # the job keeps its state and reason
            self.spool.mark_notice_failed(job.id)
        else:
            self.spool.mark_failed(job.id, str(exc))

    def _send(
        self, loaded: list[tuple[Job, list[Encoded]]], now: float, stop: threading.Event | None
    ) -> None:
        t0 = time.perf_counter()
        stopping = stop.is_set if stop is not None else (lambda: False)
        try:
            result = self.destination.store([e for _, objs in loaded for e in objs], stopping)
        except ContextsRefused as exc:  # it answered: a refusal of these SRs, by the peer
            self._up(now)
            for job, _ in loaded:
                self._settle(job, str(exc), now, 0.0)
            return
        except SendError as exc:
            self._down(str(exc), now)
            return
        if result.failures:
            self._up(now)
        answered = per_job(loaded, result.failures)
        each = (time.perf_counter() - t0) / max(1, len(answered))
        for (job, _), failure in zip(loaded, answered, strict=False):
            self._settle(job, failure, now, each)
        if result.lost:
            self._lost(loaded[len(answered)][0], result.lost, now)

    def _lost(self, job: Job, reason: str, now: float) -> None:
        """The association ended while ``job``'s SR was in flight: a connection failure. The
        job goes to the back of the line (without counting), so that an SR the destination
        always aborts on cannot hold the others up."""
        self.spool.postpone(job.id, reason, now + self.cfg.destination.probe_interval)
        self._down(reason, now)

    def _settle(self, job: Job, failure: str, now: float, seconds: float) -> None:
        """Record one SR's outcome; a failure to record it leaves the job to be sent again."""
        try:
            if failure:
                self._refused(job, failure, now)
            else:
                self._delivered(job, seconds)
        except Exception as exc:  # the per-job boundary
            log.error(
                "job %d: recording the delivery of SR %s failed: %s: %s",
                job.id,
                job.sr_uid,
                type(exc).__name__,
                exc,
            )

    def _refused(self, job: Job, failure: str, now: float) -> None:
        w, retry_for = self.cfg.worker, self.cfg.destination.retry_for
        delay = backoff_delay(job.attempts + 1, w.backoff_base, w.backoff_max, self.rng())

        def plan(attempts: int, since: float) -> tuple[bool, float]:
            return dead_letter_due(attempts, since, now, w.max_attempts, retry_for), now + delay

        state, attempts = self.spool.refused(job.id, failure, now, plan, notice=bool(job.notice))
        if self.metrics is not None:
            self.metrics.sr_send_failures.labels("status").inc()
        log.warning(
            "job %d: SR %s refused (attempt %d): %s; %s",
            job.id,
            job.sr_uid,
            attempts,
            failure,
            "dead-lettered: refused for longer than destination.retry_for"
            if state == "dead"
            else f"retry in {delay:.1f} s",
        )

    def _delivered(self, job: Job, seconds: float) -> None:
        self.spool.mark_sent(job.id, notice=bool(job.notice))
        if self.metrics is not None:
            self.metrics.sr_send_seconds.observe(seconds)
            self.metrics.sr_sent.inc()
        log.info(
            "job %d: SR %s delivered",
            job.id,
            job.sr_uid,
            extra={
                "job_id": job.id,
                "sop_instance_uid": job.sop_instance_uid,
                "sr_uid": job.sr_uid,
            },
        )
        if not self.cfg.spool.keep_delivered:
            job.image.unlink(missing_ok=True)
            if job.report is not None:
                job.report.unlink(missing_ok=True)
                summary_path(job.report).unlink(missing_ok=True)

    # -- loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set; a failed round is logged and the next one tried
        (:mod:`node.jobs.rounds`)."""
        poll = self.cfg.worker.poll_interval
        run_rounds(lambda: self.step(stop), stop, poll, "delivery", log)
