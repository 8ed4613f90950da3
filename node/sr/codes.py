"""Coded concepts for the SR: SNOMED CT / DICOM codes where they exist, a local scheme otherwise.

The local scheme ``99CXRNODE`` is declared in the SR's Coding Scheme Identification
Sequence (see :data:`LOCAL_SCHEME`) and listed in the README.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

LOCAL_DESIGNATOR = "99CXRNODE"
LOCAL_SCHEME_NAME = "cxr-node local codes for torchxrayvision labels"
LOCAL_SCHEME_ORG = "cxr-node project"

PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")


def _local(value: str, meaning: str) -> Code:
    return Code(value, LOCAL_DESIGNATOR, meaning)


# torchxrayvision label -> concept. DCM/SCT codes are those of DICOM's own context groups
# (CID 6102-6105) or common SNOMED CT findings; labels without an unambiguous standard
# concept get a local code.
PATHOLOGY_CODES: dict[str, Code] = {
    "Atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "Consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "Infiltration": Code("112121", "DCM", "Infiltrate"),
    "Pneumothorax": Code("36118008", "SCT", "Pneumothorax"),
    "Edema": Code("19242006", "SCT", "Pulmonary edema"),
    "Emphysema": Code("87433001", "SCT", "Pulmonary emphysema"),
    "Fibrosis": Code("51615001", "SCT", "Fibrosis of lung"),
    "Effusion": Code("60046008", "SCT", "Pleural effusion"),
    "Pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "Pleural_Thickening": _local("PLEURAL_THICK", "Pleural thickening"),
    "Cardiomegaly": Code("8186001", "SCT", "Cardiomegaly"),
    "Nodule": Code("27925004", "SCT", "Nodule"),
    "Mass": Code("4147007", "SCT", "Mass"),
    "Hernia": _local("HERNIA", "Hernia"),
    "Lung Lesion": _local("LUNG_LESION", "Lung lesion"),
    "Fracture": Code("125605004", "SCT", "Fracture of bone"),
    "Lung Opacity": _local("LUNG_OPACITY", "Lung opacity"),
    "Enlarged Cardiomediastinum": _local("ENL_CARDIOMED", "Enlarged cardiomediastinum"),
}


def pathology_code(label: str) -> Code:
    """The concept for a torchxrayvision label; unknown labels get a local code."""
    code = PATHOLOGY_CODES.get(label)
    if code is not None:
        return code
    return _local(label.upper().replace(" ", "_")[:16] or "UNKNOWN", label or "Unknown")


def local_scheme_item() -> Dataset:
    """The Coding Scheme Identification item that declares :data:`LOCAL_DESIGNATOR`."""
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_DESIGNATOR
    item.CodingSchemeName = LOCAL_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = LOCAL_SCHEME_ORG
    return item


def finding_name(label: str) -> str:
    """A finding's name for people, the same in the SR, the JSON, the CSV and the logs:
    the model's label, followed by the coded concept's meaning where that reads otherwise
    (``Consolidation (Lung consolidation)``, ``Pleural_Thickening (Pleural thickening)``;
    ``Atelectasis``, ``Lung Lesion``)."""
    meaning = pathology_code(label).meaning
    return label if meaning.lower() == label.lower() else f"{label} ({meaning})"


def code_record(code: Code) -> dict[str, str]:
    """A coded concept as the JSON results give it."""
    return {"value": code.value, "scheme": code.scheme_designator, "meaning": code.meaning}


# Concept names of the SR's own text items (local: no standard concept says these).
ABOVE_THRESHOLD = _local("ABOVE_THRESHOLD", "AI findings above the operating threshold")
UNTRAINED_MODEL = _local("UNTRAINED_MODEL", "UNTRAINED model")
NOT_ANALYZED = _local("NOT_ANALYZED", "Image not analysed by the AI")
NOT_ANALYZED_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
SUMMARY_IMAGE = Code("121200", "DCM", "Illustration of ROI")
"""The concept name of the SR's reference to its summary image (heat maps of the findings)."""
