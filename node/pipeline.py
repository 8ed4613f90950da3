"""Image datasets in, findings and SRs out: preprocess -> batch inference -> report.

Shared by the node's worker and the offline ``classify`` command. Errors are returned per
image, so one bad image never stops a batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.errors import NodeError
from node.model import Classifier, Finding, to_findings
from node.preprocess import Preprocessed, preprocess
from node.srtemplate import EncodedSR, ReportEncoder


@dataclass(frozen=True)
class Outcome:
    """One classified image: its findings, its SR and how long each stage took."""

    source: Dataset
    findings: tuple[Finding, ...]
    sr: EncodedSR
    steps: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)


def _prepare(datasets: Sequence[Dataset]) -> list[Preprocessed | NodeError]:
    out: list[Preprocessed | NodeError] = []
    for ds in datasets:
        try:
            out.append(preprocess(ds))
        except NodeError as exc:
            out.append(exc)
    return out


def analyze(
    datasets: Sequence[Dataset],
    classifier: Classifier,
    reports: ReportEncoder,
    now: datetime,
) -> list[Outcome | NodeError]:
    """Classify a batch and build one SR per image; failures come back as errors."""
    t0 = time.perf_counter()
    prepared = _prepare(datasets)
    ok = [p for p in prepared if isinstance(p, Preprocessed)]
    t1 = time.perf_counter()
    scores = classifier.predict(np.stack([p.array for p in ok])) if ok else np.empty((0, 0))
    t2 = time.perf_counter()
    per_image = {
        "preprocess_s": (t1 - t0) / len(datasets),
        "inference_s": (t2 - t1) / max(1, len(ok)),
    }
    results: list[Outcome | NodeError] = []
    row = 0
    for ds, prep in zip(datasets, prepared, strict=True):
        if isinstance(prep, NodeError):
            results.append(prep)
            continue
        findings = to_findings(scores[row], classifier.info)
        row += 1
        t3 = time.perf_counter()
        try:
            sr = reports.encode(ds, findings, now)
        except NodeError as exc:
            results.append(exc)
            continue
        timings: dict[str, Any] = {**per_image, "report_s": time.perf_counter() - t3}
        results.append(Outcome(ds, findings, sr, prep.steps, timings))
    return results
