"""The summary image as a DICOM Secondary Capture (pure, built by highdicom).

Same study as its source, a series of its own, Burned In Annotation YES, the source in its
Referenced Image Sequence; deterministic UIDs derived as the SR's are (:mod:`node.dicom.uids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from node.analysis.model import ModelInfo
from node.dicom.uids import summary_instance_uid, summary_series_uid
from node.sr.report import (
    ImageRef,
    ReportContext,
    clock_attributes,
    library_errors,
    sanitized_source,
    sr_charset,
)
from node.sr.srtemplate import encode_dataset

SYNTAXES: dict[str, tuple[UID, str]] = {
    "jpeg": (JPEGBaseline8Bit, "YBR_FULL_422"),  # encoded by highdicom (Pillow), quality 95
    "none": (ExplicitVRLittleEndian, "RGB"),
}
"""``report.summary_compression`` -> (transfer syntax, photometric interpretation)."""

SUMMARY_SERIES_NUMBER = 9902
SUMMARY_SERIES_DESCRIPTION = "AI CXR summary, not for diagnosis"


@dataclass(frozen=True)
class EncodedSummary:
    """A summary image ready to store or send: its Part 10 bytes and its UIDs."""

    data: bytes
    sop_instance_uid: str
    series_instance_uid: str

    @property
    def ref(self) -> ImageRef:
        """The image as its SR references it."""
        return ImageRef(
            SecondaryCaptureImageStorage, self.sop_instance_uid, self.series_instance_uid
        )


def _orientation(source: Dataset) -> list[str] | None:
    """The source's Patient Orientation where it is two valid values, else None (empty)."""
    value = source.get("PatientOrientation")
    values = [str(v) for v in value] if isinstance(value, MultiValue | list) else []
    ok = len(values) == 2 and all(v and set(v) <= set("APRLHF") for v in values)
    return values if ok else None


def _reference(clean: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = clean.SOPClassUID
    item.ReferencedSOPInstanceUID = clean.SOPInstanceUID
    return item


def build_summary(
    source: Dataset,
    pixels: npt.NDArray[np.uint8],
    model: ModelInfo,
    ctx: ReportContext,
    now: datetime,
    compression: str = "jpeg",
) -> Dataset:
    """The Secondary Capture of the RGB ``pixels`` (``rows x columns x 3``) summarising
    ``source``, compressed as :data:`SYNTAXES` says; raises :class:`ReportError`."""
    syntax, photometric = SYNTAXES[compression]
    with library_errors(source.get("SOPInstanceUID", "a source")):
        clean, _dropped = sanitized_source(source)  # the SR's build logs what was dropped
        sc = hd.sc.SCImage(
            pixel_array=np.ascontiguousarray(pixels),
            photometric_interpretation=photometric,
            transfer_syntax_uid=syntax,
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=clean.StudyInstanceUID,
            series_instance_uid=summary_series_uid(
                ctx.uid_root, clean.StudyInstanceUID, model.model_id
            ),
            series_number=SUMMARY_SERIES_NUMBER,
            sop_instance_uid=summary_instance_uid(
                ctx.uid_root, clean.SOPInstanceUID, model.model_id, model.weights_sha256
            ),
            instance_number=1,
            manufacturer=ctx.manufacturer,
            patient_id=clean.PatientID,
            patient_birth_date=clean.PatientBirthDate,
            patient_sex=clean.PatientSex,
            accession_number=clean.AccessionNumber,
            study_id=clean.StudyID,
            study_date=clean.StudyDate,
            study_time=clean.StudyTime,
            patient_orientation=("A", "F"),  # replaced by the source's own, below
        )
        _stamp(sc, source, clean, model, ctx, now)
        if syntax == JPEGBaseline8Bit:
            _lossy(sc)
        return sc


def _lossy(sc: Dataset) -> None:
    """General Image's lossy compression attributes (C.7.6.1.1.5): what a viewer shows to
    say the pixels are not the original ones."""
    raw = int(sc.Rows) * int(sc.Columns) * int(sc.SamplesPerPixel)
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionRatio = [f"{raw / max(1, len(sc.PixelData)):.2f}"]
    sc.LossyImageCompressionMethod = ["ISO_10918_1"]


def _stamp(
    sc: Dataset,
    source: Dataset,
    clean: Dataset,
    model: ModelInfo,
    ctx: ReportContext,
    now: datetime,
) -> None:
    """What highdicom leaves to us: the clock's values, descriptions, the reference. The
    names are set here, as the SR has them (highdicom would warn again about a one-part
    name the SR's build has logged); the orientation is the source's (the image is the
    source's geometry), empty where it has none."""
    sc.PatientName = clean.PatientName
    sc.ReferringPhysicianName = clean.ReferringPhysicianName
    sc.PatientOrientation = _orientation(source)
    sc.Laterality = None  # General Series, Type 2C: a chest is not a paired organ
    charset = sr_charset(clean, ctx)
    if charset is not None:
        sc.SpecificCharacterSet = charset
    for keyword, value in clock_attributes(now).items():
        setattr(sc, keyword, value)
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = (
        now.strftime("%Y%m%d"),
        now.strftime("%H%M%S"),
    )
    suffix = "" if model.trained else " [UNTRAINED]"
    sc.SeriesDescription = f"{SUMMARY_SERIES_DESCRIPTION}{suffix}"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{model.name}: class activation maps; not for diagnosis"[:10240]
    sc.DerivationDescription = "class activation maps of the findings above their threshold"
    sc.ReferencedImageSequence = [_reference(clean)]
    sc.ManufacturerModelName = "cxr-node"
    sc.SoftwareVersions = [ctx.software_version, f"torchxrayvision {model.library_version}"]
    if ctx.institution_name:
        sc.InstitutionName = ctx.institution_name
    if "PatientAge" in clean:
        sc.PatientAge = clean.PatientAge


def encode_summary(
    source: Dataset,
    pixels: npt.NDArray[np.uint8],
    model: ModelInfo,
    ctx: ReportContext,
    now: datetime,
    compression: str = "jpeg",
) -> EncodedSummary:
    sc = build_summary(source, pixels, model, ctx, now, compression)
    return EncodedSummary(encode_dataset(sc), str(sc.SOPInstanceUID), str(sc.SeriesInstanceUID))
