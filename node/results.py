"""The per-image JSON results record (pure), and where files go."""

from __future__ import annotations

from typing import Any

from node.model import UNTRAINED_LABEL, ModelInfo
from node.pipeline import Outcome

SCHEMA_VERSION = 1


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
        "model": {
            "name": model.name,
            "weights": model.weights,
            "weights_sha256": model.weights_sha256,
            "library_version": model.library_version,
            "trained": model.trained,
            "clinical_use": False,
            "warning": None if model.trained else UNTRAINED_LABEL,
        },
        "findings": [
            {
                "pathology": f.pathology,
                "score": f.score,
                "threshold": f.threshold,
                "label": "present" if f.present else "absent",
            }
            for f in outcome.findings
        ],
        "preprocessing": list(outcome.steps),
        "timings": outcome.timings,
    }
