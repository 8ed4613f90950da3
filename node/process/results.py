"""The per-image JSON results record (pure), and where files go. The record's JSON Schema
is ``result.schema.json`` beside this module (the tests validate against it)."""

from __future__ import annotations

from typing import Any

from node.analysis.model import UNTRAINED_LABEL, Finding, ModelInfo
from node.process.pipeline import Outcome
from node.sr.codes import code_record, finding_name, pathology_code
from node.sr.report import summary_text

SCHEMA_VERSION = 3
"""3: each finding's ``name`` and ``code`` (the SR's coded concept); ``above_threshold``."""


SCORE_THRESHOLD = 0.5


def finding_record(f: Finding) -> dict[str, Any]:
    """One finding, named by the model's label (``pathology``), its name for people
    (``name``, as the SR and the logs give it) and the SR's coded concept (``code``), on
    both scales, each with its own threshold: the model's sigmoid
    ``probability`` (present from ``probability_threshold``, xrv's operating point) and
    the normalised ``score`` (present from 0.5), which the SR carries."""
    return {
        "pathology": f.pathology,
        "name": finding_name(f.pathology),
        "code": code_record(pathology_code(f.pathology)),
        "probability": f.probability,
        "probability_threshold": f.threshold,
        "score": f.score,
        "score_threshold": SCORE_THRESHOLD,
        "label": "present" if f.present else "absent",
    }


def result_record(outcome: Outcome, model: ModelInfo) -> dict[str, Any]:
    """A JSON-serialisable summary of one classified image."""
    src = outcome.source
    return {
        "schema_version": SCHEMA_VERSION,
        "source": {
            "sop_instance_uid": str(src.SOPInstanceUID),
            "sop_class_uid": str(src.SOPClassUID),
            "study_instance_uid": str(src.get("StudyInstanceUID", "")),
            "series_instance_uid": str(src.get("SeriesInstanceUID", "")),
            "modality": str(src.get("Modality", "")),
        },
        "sr": {
            "sop_instance_uid": outcome.sr.sop_instance_uid,
            "series_instance_uid": outcome.sr.series_instance_uid,
        },
        "summary": None
        if outcome.summary is None
        else {
            "sop_instance_uid": outcome.summary.sop_instance_uid,
            "series_instance_uid": outcome.summary.series_instance_uid,
        },
        "model": {
            "name": model.name,
            "weights": model.weights,
            "weights_sha256": model.weights_sha256,
            "library_version": model.library_version,
            "trained": model.trained,
            "clinical_use": False,
            "warning": None if model.trained else UNTRAINED_LABEL,
        },
        "findings": [finding_record(f) for f in outcome.findings],
        "above_threshold": summary_text(outcome.findings),
        "preprocessing": list(outcome.steps),
        "timings": outcome.timings,
    }
