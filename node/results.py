"""The per-image JSON results record (pure), and where files go."""

from __future__ import annotations

from typing import Any

from node.model import UNTRAINED_LABEL, Finding, ModelInfo
from node.pipeline import Outcome

SCHEMA_VERSION = 2


SCORE_THRESHOLD = 0.5


def finding_record(f: Finding) -> dict[str, Any]:
    """One finding on both scales, each with its own threshold: the model's sigmoid
    ``probability`` (present from ``probability_threshold``, xrv's operating point) and
    the normalised ``score`` (present from 0.5), which the SR carries."""
    return {
        "pathology": f.pathology,
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
        "preprocessing": list(outcome.steps),
        "timings": outcome.timings,
    }
