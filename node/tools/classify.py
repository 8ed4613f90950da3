"""``cxr-node classify``: the model over a research archive, offline.

Files, folders (recursive) and zip archives are found by the push tool's discovery
(:mod:`node.tools.archive`); each DICOM object goes through serve's filter
(:mod:`node.analysis.triage`) and serve's pipeline (:mod:`node.process.pipeline`), batched
across files (``model.batch_size``) with the next batch read and preprocessed in a second
thread while the model runs on this one. Every input gets one outcome — classified, skipped
(with the reason) or failed (with the reason) — in the CSV (one row per image, in the order
found), the JSON (one record per classified image) and the summary line.

Output is written as it comes (each CSV row flushed, the JSON array closed on Ctrl-C), so an
interrupted run keeps what it did; ``--resume`` skips every image already in the output
(by SOP Instance UID, or by file for what has none) and appends the rest.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import queue
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from pydicom.dataset import Dataset

from node.analysis.model import Classifier
from node.analysis.triage import skip_reason
from node.core.config import NodeConfig
from node.core.errors import NodeError, OutputError
from node.dicom.dicomio import read_dataset
from node.process.overlap import Overlap
from node.process.pipeline import Outcome, Prepared, prepare, run_model
from node.process.results import finding_record, result_record
from node.process.summarize import DISPLAY_MAX, Summarizer
from node.sr.report import summary_text
from node.sr.srtemplate import ReportEncoder
from node.tools.archive import Item, Rejected, iter_items

log = logging.getLogger(__name__)

CLASSIFIED, SKIPPED, FAILED = "classified", "skipped", "failed"
HEAD = ("file", "sop_instance_uid", "study_instance_uid", "modality", "body_part", "view")
_HEAD_KEYWORDS = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
)
TAIL = ("above_threshold", "status", "reason")
QUEUED_BATCHES = 2  # read and preprocessed ahead of the model


@dataclass(frozen=True)
class Options:
    """What ``classify`` was asked for."""

    no_filter: bool = False
    csv_path: Path | None = None
    json_path: Path | None = None  # None: JSON on standard output
    sr_dir: Path | None = None
    summary_dir: Path | None = None  # the summary images (Secondary Captures), when asked
    resume: bool = False
    recursive: bool = True
    follow_symlinks: bool = False


@dataclass
class Row:
    """One input's outcome: a CSV row; ``record`` is the JSON record of a classified one."""

    file: str
    status: str
    reason: str = ""
    source: Dataset | None = None
    outcome: Outcome | None = None
    record: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        """What ``--resume`` knows an input by: its SOP Instance UID, else its file."""
        uid = str(self.source.get("SOPInstanceUID", "")) if self.source is not None else ""
        return uid or self.file


@dataclass
class Counts:
    classified: int = 0
    skipped: int = 0
    failed: int = 0
    already: int = 0

    def add(self, status: str) -> None:
        setattr(self, status, getattr(self, status) + 1)

    def line(self, seconds: float) -> str:
        done = self.classified + self.skipped + self.failed
        rate = self.classified / seconds if seconds > 0 else 0.0
        resumed = f", {self.already} already done (--resume)" if self.already else ""
        return (
            f"classify: {self.classified} classified, {self.skipped} skipped, "
            f"{self.failed} failed{resumed}; {done} in {seconds:.1f} s ({rate:.1f} images/s)"
        )


# -- input -------------------------------------------------------------------------------
@dataclass
class _Batch:
    """Inputs in the order found: rows already decided and candidates for the model."""

    entries: list[Row] = field(default_factory=list)
    candidates: list[Row] = field(default_factory=list)
    prepared: Prepared | None = None
    display_max: int | None = None  # preprocess also the summary image's display


def _row(item: Item | Rejected, opts: Options, cfg: NodeConfig) -> Row:
    """Read and filter one input: a candidate (status "") or its final row."""
    if isinstance(item, Rejected):
        why = item.reason or "not a DICOM file"
        return Row(item.name, FAILED if item.failed else SKIPPED, why)
    try:
        ds = read_dataset(item.data, where=item.name)  # its errors name the input
        reason = None if opts.no_filter else skip_reason(ds, cfg.filter)
    except NodeError as exc:
        return Row(item.name, FAILED, str(exc))
    except Exception as exc:  # the per-file boundary: a header no reader expected
        return Row(item.name, FAILED, f"cannot read the header: {type(exc).__name__}: {exc}")
    if reason is not None:
        return Row(item.name, SKIPPED, f"not a chest radiograph: {reason}", ds)
    return Row(item.name, "", source=ds)


def _batches(
    items: Iterator[Item | Rejected], opts: Options, cfg: NodeConfig, done: set[str]
) -> Iterator[_Batch]:
    display = None if opts.summary_dir is None else DISPLAY_MAX
    batch = _Batch(display_max=display)
    for item in items:
        row = _row(item, opts, cfg)
        if row.key in done or row.file in done:
            continue
        batch.entries.append(row)
        if not row.status:
            batch.candidates.append(row)
        if len(batch.candidates) >= cfg.model.batch_size:
            yield batch
            batch = _Batch(display_max=display)
    if batch.entries:
        yield batch


def _produce(batches: Iterator[_Batch], out: queue.Queue[_Batch | BaseException | None]) -> None:
    """Read, filter and preprocess ahead of the model (a daemon thread)."""
    try:
        for batch in batches:
            sources = [r.source for r in batch.candidates if r.source is not None]
            batch.prepared = prepare(sources, batch.display_max) if sources else None
            out.put(batch)
        out.put(None)
    except BaseException as exc:  # handed to the consumer, which reports it
        out.put(exc)


def ahead(batches: Iterator[_Batch]) -> Iterator[_Batch]:
    """The batches, prepared by a second thread while the caller runs the model."""
    ready: queue.Queue[_Batch | BaseException | None] = queue.Queue(QUEUED_BATCHES)
    threading.Thread(target=_produce, args=(batches, ready), daemon=True).start()
    while (got := ready.get()) is not None:
        if isinstance(got, BaseException):
            raise got
        yield got


# -- output ------------------------------------------------------------------------------
def csv_columns(pathologies: Sequence[str]) -> list[str]:
    per = [f"{p}_{k}" for p in pathologies for k in ("probability", "score", "label")]
    return [*HEAD, *per, *TAIL]


def _csv_values(row: Row, pathologies: Sequence[str]) -> list[str]:
    ds = row.source
    head = [row.file] + [str(ds.get(k, "")) if ds is not None else "" for k in _HEAD_KEYWORDS]
    found = {f.pathology: f for f in row.outcome.findings} if row.outcome else {}
    per: list[str] = []
    for name in pathologies:
        f = found.get(name)
        if f is None:
            per += ["", "", ""]
            continue
        prob = f.probability
        per += ["" if prob is None else f"{prob:.4f}", f"{f.score:.4f}", finding_record(f)["label"]]
    above = summary_text(row.outcome.findings) if row.outcome else ""
    return [*head, *per, above, row.status, row.reason]


class Outputs:
    """The CSV and the JSON array, written as rows come; ``close`` ends the JSON array."""

    def __init__(self, opts: Options, pathologies: Sequence[str], stdout: IO[str]) -> None:
        self.opts, self.pathologies = opts, pathologies
        self.done: set[str] = set()
        self._first = True
        self._csv, self._writer = self._open_csv()
        try:
            self._json = self._open_json(stdout)
        except OutputError:
            if self._csv is not None:
                self._csv.close()
            raise

    def _open_csv(self) -> tuple[IO[str] | None, Any]:
        path = self.opts.csv_path
        if path is None:
            return None, None
        resume = self.opts.resume and path.is_file() and path.stat().st_size > 0
        if resume:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames != csv_columns(self.pathologies):
                    raise NodeError(
                        f"--resume: {path}'s columns are not those this version writes: "
                        "write to a new CSV"
                    )
                for r in reader:
                    self.done.add(r.get("sop_instance_uid") or r["file"])
                    self.done.add(r["file"])
        out = _output(path, "a" if resume else "w", newline="")
        writer = csv.writer(out)
        if not resume:
            writer.writerow(csv_columns(self.pathologies))
            out.flush()
        return out, writer

    def _open_json(self, stdout: IO[str]) -> IO[str]:
        path = self.opts.json_path
        if path is None:
            stdout.write("[")
            return stdout
        old: list[dict[str, Any]] = []
        if self.opts.resume and path.is_file():
            old = _read_records(path)
            for record in old:
                self.done.add(str(record["source"]["sop_instance_uid"]))
        fh = _output(path, "w")
        fh.write("[")
        for record in old:
            self._write_record(fh, record)
        return fh

    def _write_record(self, fh: IO[str], record: dict[str, Any]) -> None:
        fh.write(("\n" if self._first else ",\n") + json.dumps(record, indent=2))
        self._first = False

    def write(self, row: Row) -> None:
        if self._writer is not None and self._csv is not None:
            self._writer.writerow(_csv_values(row, self.pathologies))
            self._csv.flush()
        if row.record is not None:
            self._write_record(self._json, row.record)
            self._json.flush()

    def close(self) -> None:
        self._json.write("\n]\n")
        self._json.flush()
        if self.opts.json_path is not None:  # not standard output
            self._json.close()
        if self._csv is not None:
            self._csv.close()


def _output(path: Path, mode: str, newline: str | None = None) -> IO[str]:
    """``path`` opened for writing, its folder made if missing; :class:`OutputError` (one
    line naming the path) where it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open(mode, newline=newline, encoding="utf-8")
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise OutputError(f"cannot write {path}: {exc.strerror}{where}") from None


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The records of an earlier run's JSON, closed or cut short by a kill."""
    text = path.read_text(encoding="utf-8").rstrip()
    for candidate in (text, text + "\n]", text.rstrip(",") + "\n]"):
        try:
            return list(json.loads(candidate))
        except json.JSONDecodeError:
            continue
    raise NodeError(f"--resume: {path} is not a JSON array written by classify")


# -- the run -----------------------------------------------------------------------------
def count_inputs(paths: Sequence[Path], recursive: bool) -> int:
    """About how many objects there are (files, zip members): the progress bar's total."""
    total = 0
    for path in paths:
        if path.is_dir() and recursive:
            total += sum(len(files) for _, _, files in os.walk(path))
        elif path.is_dir():
            total += sum(1 for e in os.scandir(path) if e.is_file())
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                total += sum(1 for m in zf.infolist() if not m.is_dir())
        else:
            total += 1
    return total


class Run:
    """One ``classify`` run over ``paths``."""

    def __init__(
        self,
        cfg: NodeConfig,
        classifier: Classifier,
        reports: ReportEncoder,
        opts: Options,
        outputs: Outputs,
        summaries: Summarizer | None = None,
    ) -> None:
        self.cfg, self.classifier, self.reports = cfg, classifier, reports
        self.opts, self.outputs = opts, outputs
        self.summaries = summaries if opts.summary_dir is not None else None
        self.counts = Counts()

    def run(self, paths: Sequence[Path], progress: Any) -> Counts:
        opts = self.opts
        items = iter_items(
            list(paths), recursive=opts.recursive, follow_symlinks=opts.follow_symlinks
        )
        skip = self.outputs.done
        self.classifier.trace_as_configured(self.cfg.model)
        overlap: Overlap[_Batch] = Overlap(self.reports, self.summaries, self.cfg.worker.overlap)
        try:
            for batch in ahead(_batches(items, self.opts, self.cfg, skip)):
                classified = None
                if batch.prepared is not None:  # the model runs while the batch before completes
                    maps = self.summaries is not None
                    classified = run_model(batch.prepared, self.classifier, maps)
                self._settle(overlap, progress)
                if classified is None:
                    self._emit_all(batch, [], progress)
                else:
                    overlap.submit(batch, classified, datetime.now())
        except Exception:  # the batch in flight is written before the error is reported
            self._settle(overlap, progress)
            raise
        self._settle(overlap, progress)
        return self.counts

    def _settle(self, overlap: Overlap[_Batch], progress: Any) -> None:
        if (done := overlap.collect()) is not None:
            self._emit_all(*done, progress)

    def _emit_all(self, batch: _Batch, outcomes: list[Outcome | NodeError], progress: Any) -> None:
        """The batch's rows in the order found, each candidate decided by its outcome."""
        for row, outcome in zip(batch.candidates, outcomes, strict=True):
            self._decide(row, outcome)
        for row in batch.entries:
            self._emit(row)
        progress.update(len(batch.entries))

    def _decide(self, row: Row, outcome: Outcome | NodeError) -> None:
        if isinstance(outcome, NodeError):
            row.status, row.reason = FAILED, str(outcome)
            return
        row.status, row.outcome = CLASSIFIED, outcome
        row.record = result_record(outcome, self.classifier.info)
        row.record["source"]["file"] = row.file
        if self.opts.sr_dir is not None:
            self.opts.sr_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            out = self.opts.sr_dir / f"{outcome.sr.sop_instance_uid}.dcm"
            out.write_bytes(outcome.sr.data)
            row.record["sr"]["file"] = str(out)
        summary = outcome.summary
        if self.opts.summary_dir is not None and summary is not None:
            self.opts.summary_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            out = self.opts.summary_dir / f"{summary.sop_instance_uid}.dcm"
            out.write_bytes(summary.data)
            row.record["summary"]["file"] = str(out)

    def _emit(self, row: Row) -> None:
        self.counts.add(row.status)
        self.outputs.write(row)
        if row.status == CLASSIFIED and row.outcome is not None:
            log.info("%s: present: %s", row.file, summary_text(row.outcome.findings))
        elif row.status == SKIPPED:
            log.info("%s: skipped: %s", row.file, row.reason)
        else:
            log.error("%s", row.reason if row.file in row.reason else f"{row.file}: {row.reason}")
