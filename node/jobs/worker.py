"""The worker: classify received jobs in batches (their SRs are delivered by
:mod:`node.jobs.delivery`, in a thread of its own).

One job never stops the worker: whatever reading, filtering, classifying or saving one
image raises fails that job alone, with the stage and the reason. A job that kills or hangs
the process is caught across restarts: each start on a job is counted before the work
(``Spool.begin``); a job seen again after a crash is worked on alone (no other batch in
flight), and one whose count reaches ``worker.max_crash_attempts`` is quarantined instead
of tried again.

Two batches are in flight at a time (``worker.overlap``): while the model runs on one, the
summary images and SRs of the one before are built in a thread of their own
(:mod:`node.process.overlap`); the worker's thread saves them, and the hang watchdog covers
both batches' jobs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime

from pydicom.dataset import Dataset

from node.analysis.model import Classifier
from node.analysis.triage import notice_wanted, skip_reason
from node.core.config import NodeConfig
from node.core.errors import (
    NodeError,
    PreprocessError,
    ReportError,
    SpoolError,
    unexpected,
)
from node.core.metrics import Metrics
from node.dicom.dicomio import read_dataset
from node.jobs.rounds import run_rounds
from node.process.overlap import Overlap
from node.process.pipeline import Classified, Outcome, model_batch
from node.process.results import result_record
from node.process.summarize import Summarizer
from node.sr.notice import build_notice
from node.sr.report import ReportContext, summary_text
from node.sr.srtemplate import ReportEncoder
from node.store.spool import Job, Spool, summary_path

log = logging.getLogger(__name__)

Watchdog = Callable[[Sequence[Job]], AbstractContextManager[object]]
"""Guards the work on a batch of jobs (e.g. ends a process that hangs on it)."""

Loaded = list[tuple[Job, Dataset]]
"""A batch's jobs that were read and are to be classified, with their data sets."""


def no_watchdog(_jobs: Sequence[Job]) -> AbstractContextManager[object]:
    return nullcontext()


def report_context(cfg: NodeConfig) -> ReportContext:
    return ReportContext(
        uid_root=cfg.report.uid_root,
        device_name=cfg.scp.ae_title,
        manufacturer=cfg.report.manufacturer,
        institution_name=cfg.report.institution_name,
    )


def summarizer(classifier: Classifier, ctx: ReportContext, compression: str) -> Summarizer:
    """The summary images' builder for ``classifier``'s images (``report.summary_compression``)."""
    return Summarizer(classifier.info, ctx, classifier.class_weights(), compression)


class Worker:
    """Drains the spool. ``run`` loops until ``stop`` is set; ``step`` does one round."""

    def __init__(
        self,
        spool: Spool,
        classifier: Classifier,
        cfg: NodeConfig,
        clock: Callable[[], datetime] = datetime.now,
        metrics: Metrics | None = None,
        watchdog: Watchdog = no_watchdog,
    ) -> None:
        self.spool = spool
        self.classifier = classifier
        self.cfg = cfg
        self.clock = clock
        self.metrics = metrics
        self.watchdog = watchdog
        self.context = report_context(cfg)
        self.reports = ReportEncoder(classifier.info, self.context, fast=cfg.report.fast_encoder)
        self.summaries = (
            summarizer(classifier, self.context, cfg.report.summary_compression)
            if cfg.report.summary_image
            else None
        )
        self.overlap: Overlap[Loaded] = Overlap(self.reports, self.summaries, cfg.worker.overlap)

    # -- classification ------------------------------------------------------------------
    def _fail(self, job: Job, exc: NodeError, ds: Dataset | None = None) -> None:
        """Fail the job; where its data set was read (``ds``), a not-analysed notice."""
        log.error("job %d (%s) failed: %s", job.id, job.sop_instance_uid, exc)
        self.spool.mark_failed(job.id, str(exc))
        if ds is not None:
            self._notice(job, ds, f"the image could not be analysed: {exc}")

    # -- not-analysed notices ------------------------------------------------------------
    def _notice(self, job: Job, ds: Dataset | None, reason: str) -> None:
        """Leave a not-analysed notice for delivery (``report.not_analyzed_notice``). Made
        after the job reached its final state: whatever happens here (an unreadable header,
        a full disk, even the process dying) leaves the job where it is, never in line again."""
        if not self.cfg.report.not_analyzed_notice:
            return
        try:
            header = ds if ds is not None else self._header(job)
            if header is None or not notice_wanted(header, self.cfg.filter):
                return
            sr = build_notice(header, reason, self.context, self.clock())
            path = self.spool.reports / f"{job.id}-{sr.sop_instance_uid}.dcm"
            self.spool.write_atomic(sr.data, path)
            self.spool.mark_notice(job.id, path, sr.sop_instance_uid)
        except NodeError as exc:
            log.warning(
                "job %d (%s): no not-analysed notice: %s", job.id, job.sop_instance_uid, exc
            )
            return
        except Exception as exc:  # the per-job boundary
            log.debug("the notice of job %d raised", job.id, exc_info=True)
            log.warning(
                "job %d (%s): no not-analysed notice: %s: %s",
                job.id,
                job.sop_instance_uid,
                type(exc).__name__,
                exc,
            )
            return
        log.info(
            "job %d (%s): not-analysed notice %s: %s",
            job.id,
            job.sop_instance_uid,
            sr.sop_instance_uid,
            reason,
            extra={"job_id": job.id, "sop_instance_uid": job.sop_instance_uid},
        )

    def _header(self, job: Job) -> Dataset | None:
        """A quarantined job's header (never its pixels: the node died or hung on them)."""
        ds = read_dataset(job.image, stop_before_pixels=True, where=f"spool file {job.image.name}")
        return ds if str(ds.get("SOPInstanceUID", "")) == job.sop_instance_uid else None

    def _read(self, job: Job) -> Dataset:
        try:
            ds = read_dataset(job.image, where=f"spool file {job.image.name}")
        except NodeError:
            raise
        except Exception as exc:  # the per-job boundary
            log.debug("reading job %d raised", job.id, exc_info=True)
            raise unexpected(PreprocessError, "reading the data set failed", exc) from exc
        found = str(ds.get("SOPInstanceUID", ""))
        if found != job.sop_instance_uid:  # the data set says two things: trust neither
            raise PreprocessError(
                f"the data set's SOP Instance UID {found!r} is not the one it was received as"
            )
        return ds

    def _load(self, job: Job) -> Dataset | None:
        try:
            ds = self._read(job)
            reason = skip_reason(ds, self.cfg.filter)
        except NodeError as exc:
            self._fail(job, exc)
            return None
        except Exception as exc:  # the per-job boundary: the filter met a malformed header
            log.debug("filtering job %d raised", job.id, exc_info=True)
            self._fail(job, unexpected(PreprocessError, "reading the header failed", exc))
            return None
        if reason is not None:
            log.info("job %d (%s): not classified: %s", job.id, job.sop_instance_uid, reason)
            self.spool.mark_skipped(job.id, reason)
            self._notice(job, ds, f"not a frontal chest radiograph: {reason}")
            return None
        return ds

    def _batch(self) -> list[Job]:
        """The next jobs to classify (not counted as started yet). A job started before
        without an outcome (the process died or hung on it) is quarantined at the limit, and
        is otherwise worked on alone, so that it cannot take healthy jobs down with it."""
        limit, size = self.cfg.worker.max_crash_attempts, self.cfg.model.batch_size
        busy = [j.id for j in self._in_flight()]  # still "received" until saved
        while jobs := self.spool.due("received", time.time(), size, exclude=busy):
            suspects = [j for j in jobs if j.attempts > 0]
            for job in (j for j in suspects if j.attempts >= limit):
                self._quarantine(job)
            if any(j.attempts >= limit for j in suspects):
                continue  # fetch again without the quarantined ones
            return suspects[:1] or jobs
        return []

    def _quarantine(self, job: Job) -> None:
        last = f" (last: {job.last_error})" if job.last_error else ""
        reason = (
            f"quarantined: processing never finished in {job.attempts} attempt(s): the node "
            f"died or exceeded worker.image_timeout each time{last}; "
            "`cxr-node jobs retry --state quarantined` tries again"
        )
        log.error("job %d (%s) %s", job.id, job.sop_instance_uid, reason)
        self.spool.mark_quarantined(job.id, reason)
        with self.watchdog([job]):  # its header is read again: a hang there ends the process
            self._notice(job, None, "the node stopped or hung each time it processed the image")

    def step(self) -> int:
        """One round: run the model on the next batch, then save the batch before it (its
        summary images and SRs were built meanwhile) and start building this one's. A batch
        of a job started before (worked on alone) is never in flight with another one.
        Returns the jobs worked on."""
        jobs = self._batch()
        # a job started before (the process died on it) is in flight alone: the batch before
        # is saved before it is counted as started again
        alone = any(j.attempts > 0 for j in jobs) or not self.overlap.enabled
        settled = self.drain() if alone else 0
        if jobs:
            self.spool.begin([j.id for j in jobs])  # before the work: a crash counts
        with self.watchdog([*self._in_flight(), *jobs]):
            classified = self._classify(jobs)
            try:
                settled += self._settle()
            finally:  # the batch before failed to save: this one goes on regardless
                if classified is not None:
                    self.overlap.submit(*classified)
            if alone:
                settled += self._settle()
        return len(jobs) + settled

    def _in_flight(self) -> list[Job]:
        return [job for job, _ in self.overlap.pending or []]

    def _classify(self, jobs: list[Job]) -> tuple[Loaded, Classified, datetime] | None:
        loaded = [(job, ds) for job in jobs if (ds := self._load(job)) is not None]
        if not loaded:
            return None
        datasets = [ds for _, ds in loaded]
        classified = model_batch(datasets, self.classifier, self.summaries is not None)
        return loaded, classified, self.clock()

    def _settle(self) -> int:
        """Save the batch in flight, once its summary images and SRs are built; returns
        its jobs. What building them raised fails the round: the jobs, counted as started,
        are tried again, each alone."""
        done = self.overlap.collect()
        if done is None:
            return 0
        loaded, outcomes = done
        if self.metrics is not None:
            ok = [o for o in outcomes if not isinstance(o, NodeError)]
            for o in ok:  # the model's share of the batch, per image
                self.metrics.inference_seconds.observe(o.timings["inference_s"])
            self.metrics.classified.inc(len(ok))
        for (job, ds), outcome in zip(loaded, outcomes, strict=True):
            if isinstance(outcome, NodeError):
                self._fail(job, outcome, ds)
            else:
                self._save_guarded(job, outcome)
        return len(loaded)

    def drain(self) -> int:
        """Save the batch in flight (the worker's last act before it stops)."""
        with self.watchdog(self._in_flight()):
            return self._settle()

    def _save_guarded(self, job: Job, outcome: Outcome) -> None:
        """Save one outcome; a full or failing disk postpones the job (it is not the
        image's fault), anything else fails it."""
        try:
            self._save(job, outcome)
        except SpoolError as exc:
            log.error("job %d (%s): %s; tried again later", job.id, job.sop_instance_uid, exc)
            self.spool.postpone(job.id, str(exc), time.time() + self.cfg.worker.backoff_max)
        except Exception as exc:  # the per-job boundary
            log.debug("saving job %d raised", job.id, exc_info=True)
            self._fail(
                job, unexpected(ReportError, "saving the results failed", exc), outcome.source
            )

    def _save(self, job: Job, outcome: Outcome) -> None:
        sr = outcome.sr
        # one file per job: the same image received twice makes two jobs with one SR UID
        path = self.spool.reports / f"{job.id}-{sr.sop_instance_uid}.dcm"
        if outcome.summary is not None:  # first: a classified job's files are all there
            self.spool.write_atomic(outcome.summary.data, summary_path(path))
        self.spool.write_atomic(sr.data, path)
        self._write_extras(outcome)
        self.spool.mark_classified(job.id, path, sr.sop_instance_uid)
        log.info(
            "job %d (%s): classified by %s; present: %s; SR %s%s",
            job.id,
            job.sop_instance_uid,
            self.classifier.info.name,
            summary_text(outcome.findings),
            sr.sop_instance_uid,
            "" if outcome.summary is None else f"; summary {outcome.summary.sop_instance_uid}",
            extra={
                "job_id": job.id,
                "sop_instance_uid": job.sop_instance_uid,
                "calling_ae": job.calling_ae,
                "sr_uid": sr.sop_instance_uid,
            },
        )

    def _write_extras(self, outcome: Outcome) -> None:
        """The optional copies: the SR in ``report.sr_dir``, the JSON in ``report.json_dir``."""
        rc, sr = self.cfg.report, outcome.sr
        if rc.sr_dir is not None:
            rc.sr_dir.mkdir(parents=True, exist_ok=True)
            self.spool.write_atomic(sr.data, rc.sr_dir / f"{sr.sop_instance_uid}.dcm")
        if rc.json_dir is not None:
            rc.json_dir.mkdir(parents=True, exist_ok=True)
            record = result_record(outcome, self.classifier.info)
            text = json.dumps(record, indent=2).encode()
            self.spool.write_atomic(text, rc.json_dir / f"{outcome.source.SOPInstanceUID}.json")

    # -- loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set, then save the batch in flight; jobs are failed one by
        one inside a round, and a failed round is logged and the next one tried
        (:mod:`node.jobs.rounds`)."""
        self.reports.prepare()  # its highdicom builds take seconds: not in a batch's time limit
        self.classifier.trace_as_configured(self.cfg.model)  # seconds, in the model's thread
        try:
            run_rounds(self.step, stop, self.cfg.worker.poll_interval, "worker", log)
        finally:
            self._last_drain()

    def _last_drain(self) -> None:
        try:
            self.drain()
        except Exception as exc:  # its jobs were counted as started: tried again next start
            log.error("saving the last batch failed: %s: %s", type(exc).__name__, exc)
            log.debug("saving the last batch failed", exc_info=True)
