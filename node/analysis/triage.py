"""Which received objects are classified: a pure rule over the dataset header.

Chest radiographs as real archives label them: BodyPartExamined is ``CHEST`` in the
standard, but sites write ``THORAX`` (common in Europe), ``TORAX``/``TÓRAX``, ``LUNG``,
``PORT CHEST``... The rule compares upper-cased, accent-free words, so ``filter.body_parts``
lists the names, not their spellings. Where BodyPartExamined is absent, the study, series
and protocol descriptions decide: a chest word accepts (``RX TORAX PA``), another body part
refuses (``KNEE 2 VIEWS``), neither leaves it to ``filter.allow_missing_body_part``. A
lateral view (ViewPosition, or a lateral word in the descriptions) is never classified.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.core.config import FilterConfig

# Objects that are never images to classify, whatever their Modality says: SR, KO, PR.
# A routing mistake that sends our own SR back to us must never produce another SR.
_NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "REG", "SEG", "RTSTRUCT"})
_DESCRIPTIONS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "XTABLE LATERAL"})


def normalized(text: str) -> str:
    """Upper case, accents removed, runs of anything but letters and digits as one space:
    ``'Tórax_PA'`` -> ``'TORAX PA'``."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(re.split(r"[^A-Z0-9]+", plain.upper())).strip()


def _mentions(text: str, terms: Iterable[str]) -> str | None:
    """The first of ``terms`` found in ``text`` as whole words, or None."""
    padded = f" {normalized(text)} "
    return next((t for t in terms if f" {normalized(t)} " in padded), None)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def _pixel_count(ds: Dataset) -> int:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * max(1, frames)
    except (TypeError, ValueError):
        return 0


def _body_part_reason(ds: Dataset, rule: FilterConfig) -> str | None:
    body = _text(ds, "BodyPartExamined").strip()
    if body:
        if _mentions(body, rule.body_parts):
            return None
        return f"BodyPartExamined {body} is not a chest (filter.body_parts)"
    described = " | ".join(t for k in _DESCRIPTIONS if (t := _text(ds, k).strip()))
    if described and _mentions(described, rule.body_parts):
        return None
    if described and (other := _mentions(described, rule.other_body_parts)):
        return f"BodyPartExamined absent and the descriptions name {other} ({described!r})"
    if not rule.allow_missing_body_part:
        return "BodyPartExamined absent" + (f" and no chest in {described!r}" if described else "")
    return None


def _view_reason(ds: Dataset, rule: FilterConfig) -> str | None:
    view = normalized(_text(ds, "ViewPosition"))
    if view and rule.view_positions and view not in map(normalized, rule.view_positions):
        return f"ViewPosition {view} is not one of {', '.join(rule.view_positions)}"
    if view:
        return None
    described = " | ".join(t for k in _DESCRIPTIONS if (t := _text(ds, k).strip()))
    if rule.view_positions and (lateral := _mentions(described, _LATERAL_VIEWS)):
        return f"a lateral view ({lateral} in {described!r}), not one of the frontal views"
    return None


def _not_an_image(ds: Dataset) -> bool:
    return _modality(ds) in _NON_IMAGE_MODALITIES or "PixelData" not in ds


def _modality(ds: Dataset) -> str:
    return _text(ds, "Modality").strip().upper()


def notice_wanted(ds: Dataset, rule: FilterConfig) -> bool:
    """Whether an object the worker did not classify deserves a not-analysed notice: an
    image of one of ``filter.modalities`` (a radiograph a reader may expect a result for;
    never an SR, ours routed back included, nor a CT slice routed by mistake). Decided by
    the header alone: a quarantined job's pixels are never read again."""
    modality = _modality(ds)
    return modality not in _NON_IMAGE_MODALITIES and modality in rule.modalities


def skip_reason(ds: Dataset, rule: FilterConfig) -> str | None:
    """Return why ``ds`` is not classified (not a frontal chest radiograph), or ``None``."""
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    modality = _modality(ds)
    if _not_an_image(ds):
        name = sop_class.name if sop_class else "unknown SOP class"
        return f"not an image ({name}, Modality {modality or 'absent'})"
    if modality not in rule.modalities:
        return f"Modality {modality or 'absent'} is not one of {', '.join(rule.modalities)}"
    if reason := _body_part_reason(ds, rule):
        return reason
    pixels = _pixel_count(ds)
    if pixels > rule.max_pixels:
        return f"image of {pixels} pixels exceeds filter.max_pixels ({rule.max_pixels})"
    return _view_reason(ds, rule)
