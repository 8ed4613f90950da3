"""Image datasets in, findings and SRs out: preprocess -> batch inference -> report.

Shared by the node's worker and the offline ``classify`` command. Errors are returned per
image, so one bad image never stops a batch: whatever one image raises (pydicom, the
decoders, numpy, highdicom or our code) becomes that image's error, naming the stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.analysis.model import Classifier, Finding, to_findings
from node.analysis.preprocess import Preprocessed, preprocess
from node.core.errors import ModelError, NodeError, PreprocessError, ReportError, unexpected
from node.process.summarize import DISPLAY_MAX, Summarizer
from node.sr.srtemplate import EncodedSR, ReportEncoder
from node.sr.summarysc import EncodedSummary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """One classified image: its findings, its SR, its summary image (when asked for and
    built) and how long each stage took."""

    source: Dataset
    findings: tuple[Finding, ...]
    sr: EncodedSR
    steps: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)
    summary: EncodedSummary | None = None


def _uid(ds: Dataset) -> str:
    try:
        return str(ds.get("SOPInstanceUID", "<no SOP Instance UID>"))
    except Exception:  # a malformed element: the UID is only for the message
        return "<unreadable SOP Instance UID>"


def _prepare_one(ds: Dataset, display_max: int | None) -> Preprocessed | NodeError:
    try:
        return preprocess(ds, display_max=display_max)
    except NodeError as exc:
        return exc
    except Exception as exc:  # the per-image boundary: this image fails, the batch goes on
        log.debug("preprocessing %s raised", _uid(ds), exc_info=True)
        return unexpected(PreprocessError, f"{_uid(ds)}: preprocessing failed", exc)


Scored = tuple[np.ndarray, np.ndarray | None]
"""One image's scores, and its feature map where asked for."""


def _infer(classifier: Classifier, ok: list[Preprocessed], maps: bool) -> list[Scored]:
    batch = np.stack([p.array for p in ok])
    if not maps:
        return [(row, None) for row in classifier.predict(batch)]
    scores, features = classifier.predict_with_maps(batch)
    return list(zip(scores, features, strict=True))


def _predict(
    classifier: Classifier, ok: list[Preprocessed], maps: bool = False
) -> list[Scored | NodeError]:
    """Scores (and feature maps) per image; if the batch fails, each image alone, so only
    the culprit fails."""
    if not ok:
        return []
    try:
        return list(_infer(classifier, ok, maps))
    except Exception as exc:
        if len(ok) == 1:
            log.debug("inference raised", exc_info=True)
            return [unexpected(ModelError, "inference failed", exc)]
        log.warning("batch inference failed (%s); retrying image by image", type(exc).__name__)
        return [_predict(classifier, [p], maps)[0] for p in ok]


def _summary(
    summaries: Summarizer | None,
    ds: Dataset,
    prep: Preprocessed,
    findings: tuple[Finding, ...],
    features: np.ndarray | None,
    now: datetime,
) -> EncodedSummary | None:
    """The summary image, or None (not asked for, or it failed: the SR goes without it,
    and the failure is logged)."""
    if summaries is None or features is None:
        return None
    try:
        return summaries.encode(ds, prep, findings, features, now)
    except Exception as exc:  # the per-image boundary: the SR is the result, it goes on
        log.debug("building the summary image of %s raised", _uid(ds), exc_info=True)
        log.error("%s: no summary image: %s: %s", _uid(ds), type(exc).__name__, str(exc)[:300])
        return None


def _encode(
    reports: ReportEncoder,
    ds: Dataset,
    findings: tuple[Finding, ...],
    now: datetime,
    summary: EncodedSummary | None,
) -> EncodedSR | NodeError:
    try:
        return reports.encode(ds, findings, now, None if summary is None else summary.ref)
    except NodeError as exc:
        return exc
    except Exception as exc:  # the per-image boundary
        log.debug("building the SR of %s raised", _uid(ds), exc_info=True)
        return unexpected(ReportError, f"{_uid(ds)}: building the SR failed", exc)


@dataclass(frozen=True)
class Prepared:
    """A batch preprocessed (one model input or error per image), ready for
    :func:`run_model`; ``prepare`` and ``run_model`` may run in different threads (decoding
    the next batch while the model runs on this one)."""

    datasets: Sequence[Dataset]
    inputs: list[Preprocessed | NodeError]
    seconds: float


def prepare(datasets: Sequence[Dataset], display_max: int | None = None) -> Prepared:
    """Preprocess a batch; each image's failure is its own. ``display_max``: also the
    display image of each (for the summary images), at most that long."""
    t0 = time.perf_counter()
    inputs = [_prepare_one(ds, display_max) for ds in datasets]
    return Prepared(datasets, inputs, time.perf_counter() - t0)


@dataclass(frozen=True)
class Classified:
    """A batch through the model, ready for :func:`complete`: each image classified (or its
    error) and the model's share of the time, per image."""

    items: list[_Classified | NodeError]
    per_image: dict[str, float]

    @property
    def ok(self) -> int:
        return sum(isinstance(item, _Classified) for item in self.items)


def run_model(batch: Prepared, classifier: Classifier, maps: bool = False) -> Classified:
    """Run the model on a prepared batch (``maps``: also the feature maps the summary images
    need, from the same forward pass)."""
    datasets, prepared = batch.datasets, batch.inputs
    ok = [p for p in prepared if isinstance(p, Preprocessed)]
    t1 = time.perf_counter()
    scores = iter(_predict(classifier, ok, maps=maps))
    t2 = time.perf_counter()
    per_image = {
        "preprocess_s": batch.seconds / max(1, len(datasets)),
        "inference_s": (t2 - t1) / max(1, len(ok)),
    }
    items: list[_Classified | NodeError] = []
    for ds, prep in zip(datasets, prepared, strict=True):
        if isinstance(prep, NodeError):
            items.append(prep)
            continue
        row = next(scores)
        if isinstance(row, NodeError):
            items.append(row)
            continue
        items.append(_Classified(ds, prep, to_findings(row[0], classifier.info), row[1]))
    return Classified(items, per_image)


def complete(
    batch: Classified,
    reports: ReportEncoder,
    now: datetime,
    summaries: Summarizer | None = None,
) -> list[Outcome | NodeError]:
    """One SR per classified image (and, with ``summaries``, its summary image); the
    images that failed before keep their errors. Touches nothing but its arguments, so it
    may run in a thread of its own while the model runs on the next batch
    (:mod:`node.process.overlap`)."""
    per_image = dict(batch.per_image)
    t3 = time.perf_counter()
    summary_of = _summaries(summaries, batch.items, now)  # before the SRs: they reference them
    if summaries is not None:
        per_image["summary_s"] = (time.perf_counter() - t3) / max(1, batch.ok)
    results: list[Outcome | NodeError] = []
    for item, summary in zip(batch.items, summary_of, strict=True):
        if isinstance(item, NodeError):
            results.append(item)
            continue
        t4 = time.perf_counter()
        sr = _encode(reports, item.ds, item.findings, now, summary)
        if isinstance(sr, NodeError):
            results.append(sr)
            continue
        timings: dict[str, Any] = {**per_image, "report_s": time.perf_counter() - t4}
        results.append(Outcome(item.ds, item.findings, sr, item.prep.steps, timings, summary))
    return results


def model_batch(
    datasets: Sequence[Dataset], classifier: Classifier, summaries: bool = False
) -> Classified:
    """Preprocess a batch and run the model on it; with ``summaries``, also what the
    summary images are made of (each image's display image and feature map)."""
    prepared = prepare(datasets, DISPLAY_MAX if summaries else None)
    return run_model(prepared, classifier, maps=summaries)


@dataclass(frozen=True)
class _Classified:
    """One image through the model: what its summary image and SR are made of."""

    ds: Dataset
    prep: Preprocessed
    findings: tuple[Finding, ...]
    features: np.ndarray | None


def _summaries(
    summaries: Summarizer | None, items: list[_Classified | NodeError], now: datetime
) -> list[EncodedSummary | None]:
    """Each classified image's summary image (None for the others), built by
    ``summaries.threads`` threads at once: most of the work (scaling, blending, JPEG) runs
    in Pillow and numpy, which release the GIL."""
    if summaries is None:
        return [None] * len(items)
    s = summaries

    def one(item: _Classified | NodeError) -> EncodedSummary | None:
        if isinstance(item, NodeError):
            return None
        return _summary(s, item.ds, item.prep, item.findings, item.features, now)

    work = sum(isinstance(item, _Classified) for item in items)
    if s.threads <= 1 or work <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(min(s.threads, work), "summary") as pool:
        return list(pool.map(one, items))


def analyze(
    datasets: Sequence[Dataset],
    classifier: Classifier,
    reports: ReportEncoder,
    now: datetime,
    summaries: Summarizer | None = None,
) -> list[Outcome | NodeError]:
    """Classify a batch and build one SR per image (and, with ``summaries``, its summary
    image); failures come back as errors."""
    classified = model_batch(datasets, classifier, summaries is not None)
    return complete(classified, reports, now, summaries)
