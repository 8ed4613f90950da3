"""Reading findings back out of an SR's content tree (tests only)."""

from __future__ import annotations

from pydicom.dataset import Dataset


def _walk(items: list[Dataset]) -> list[Dataset]:
    out: list[Dataset] = []
    for item in items:
        out.append(item)
        out += _walk(list(item.get("ContentSequence", [])))
    return out


def content_items(sr: Dataset) -> list[Dataset]:
    return _walk(list(sr.ContentSequence))


def nums(sr: Dataset) -> dict[str, float]:
    """Concept meaning -> numeric value of every NUM item."""
    out = {}
    for item in content_items(sr):
        if item.ValueType == "NUM":
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            out[name] = float(item.MeasuredValueSequence[0].NumericValue)
    return out


def codes(sr: Dataset) -> dict[str, str]:
    """Concept meaning -> code meaning of every CODE item of the measurement group."""
    out = {}
    for item in content_items(sr):
        if item.ValueType == "CODE" and item.ConceptCodeSequence[0].CodeMeaning in (
            "Present",
            "Absent",
        ):
            out[item.ConceptNameCodeSequence[0].CodeMeaning] = item.ConceptCodeSequence[
                0
            ].CodeMeaning
    return out


def texts(sr: Dataset) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in content_items(sr):
        if item.ValueType == "TEXT":
            out.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
    return out
