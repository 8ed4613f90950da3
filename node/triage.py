"""Which received objects are classified: a pure rule over the dataset header."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.config import FilterConfig

# Objects that are never images to classify, whatever their Modality says: SR, KO, PR.
# A routing mistake that sends our own SR back to us must never produce another SR.
_NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "REG", "SEG", "RTSTRUCT"})


def _pixel_count(ds: Dataset) -> int:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * max(1, frames)
    except (TypeError, ValueError):
        return 0


def skip_reason(ds: Dataset, rule: FilterConfig) -> str | None:
    """Return why ``ds`` is not classified, or ``None`` if it should be."""
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality in _NON_IMAGE_MODALITIES or "PixelData" not in ds:
        name = sop_class.name if sop_class else "unknown SOP class"
        return f"not an image ({name}, Modality {modality or 'absent'})"
    if modality not in rule.modalities:
        return f"Modality {modality or 'absent'} is not one of {', '.join(rule.modalities)}"
    body = str(ds.get("BodyPartExamined", "")).strip().upper()
    if not body and not rule.allow_missing_body_part:
        return "BodyPartExamined absent"
    if body and body not in rule.body_parts:
        return f"BodyPartExamined {body} is not one of {', '.join(rule.body_parts)}"
    pixels = _pixel_count(ds)
    if pixels > rule.max_pixels:
        return f"image of {pixels} pixels exceeds filter.max_pixels ({rule.max_pixels})"
    view = str(ds.get("ViewPosition", "")).strip().upper()
    if view and rule.view_positions and view not in rule.view_positions:
        return f"ViewPosition {view} is not one of {', '.join(rule.view_positions)}"
    return None
