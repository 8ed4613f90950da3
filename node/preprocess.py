"""Pixel pipeline: a DICOM dataset in, a torchxrayvision-ready array out (pure).

The reference is torchxrayvision's own reader (``xrv.utils.read_xray_dcm``) followed by
``XRayCenterCrop`` and ``XRayResizer(224)``: for every image that reader handles, the
output here equals it. Beyond it, this module also copes with what real archives hold:

* compressed transfer syntaxes (decoded by pydicom with the pylibjpeg plugins);
* a Modality LUT (rescale slope/intercept or a LUT sequence), applied to the values
  and to the range they can take;
* BitsStored that understates the stored values (the true data range is used, and
  the fact recorded) and signed pixel representation;
* MONOCHROME1, inverted over the range of possible values (as xrv does);
* RGB / YBR colour images, converted to luminance;
* multi-frame images: the first frame is used, and the fact recorded.

The VOI LUT is not applied, as in xrv's reader (``voi_lut=False``) the model was
trained without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array

from node.errors import PreprocessError

log = logging.getLogger(__name__)

INPUT_SIZE = 224
XRV_RANGE = 1024.0
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Preprocessed:
    """The model input (shape ``(1, 224, 224)``, float32 in [-1024, 1024]) and what was done."""

    array: FloatArray
    steps: tuple[str, ...]


def _uid(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "<no SOP Instance UID>"))


def decode_pixels(ds: Dataset) -> npt.NDArray[np.generic]:
    """Decode Pixel Data, raising :class:`PreprocessError` with the reason when impossible."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PreprocessError(f"{_uid(ds)}: the dataset has no Pixel Data")
    try:
        return _unmasked(ds)
    except (
        NotImplementedError,
        RuntimeError,
        ValueError,
        AttributeError,
        KeyError,
    ) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"
        raise PreprocessError(f"{_uid(ds)}: cannot decode Pixel Data in {name}: {exc}") from exc


def _unmasked(ds: Dataset) -> npt.NDArray[np.generic]:
    """Decode without masking to BitsStored, so values beyond it are seen, not wrapped.

    pydicom masks native (uncompressed) unsigned data to BitsStored; an image whose
    header understates its depth would silently lose its high bits.
    """
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    unsigned = int(ds.get("PixelRepresentation", 0) or 0) == 0
    if ts is not None and not ts.is_compressed and unsigned and 0 < stored < allocated:
        return pixel_array(ds, bits_stored=allocated)
    return ds.pixel_array


def _first_frame(ds: Dataset, data: npt.NDArray[np.generic], steps: list[str]) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        steps.append(f"multi-frame ({frames} frames): first frame used")
        return np.asarray(data[0])
    if data.ndim == 3 and samples == 1:
        return np.asarray(data[0])
    return np.asarray(data)


def _to_grey(ds: Dataset, data: np.ndarray, steps: list[str]) -> tuple[np.ndarray, bool]:
    """Return a 2-D array and whether it is already in [0, 255] luminance."""
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi in _GREY and data.ndim == 2:
        return data, False
    if pi in _COLOUR or (data.ndim == 3 and data.shape[-1] == 3):
        # pydicom converts YBR to RGB on decode; ITU-R BT.601 luma.
        rgb = data.astype(np.float32)
        steps.append(f"{pi or 'colour'} converted to greyscale (BT.601 luma)")
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32), True
    raise PreprocessError(
        f"{_uid(ds)}: unsupported Photometric Interpretation {pi!r} with shape {data.shape}"
    )


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _has_modality_lut(ds: Dataset) -> bool:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return "ModalityLUTSequence" in ds or slope != 1.0 or intercept != 0.0


def _value_range(
    ds: Dataset, data: np.ndarray, steps: list[str]
) -> tuple[np.ndarray, float, float]:
    """Apply the Modality LUT and return (values, lowest possible, highest possible)."""
    lo, hi = _stored_range(ds)
    dmin, dmax = float(data.min()), float(data.max())
    if dmax > hi or dmin < lo:
        note = (
            f"stored values [{dmin:g}, {dmax:g}] exceed BitsStored range [{lo:g}, {hi:g}]: "
            "true data range used"
        )
        log.warning("%s: %s", _uid(ds), note)
        steps.append(note)
        lo, hi = min(lo, dmin), max(hi, dmax)
    if not _has_modality_lut(ds):
        return data, lo, hi
    values = np.asarray(apply_modality_lut(data, ds), dtype=np.float32)
    ends = np.asarray(apply_modality_lut(np.array([lo, hi]), ds), dtype=np.float64)
    if "ModalityLUTSequence" in ds:
        lut = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
        ends = np.array([lut.min(), lut.max()])
        steps.append("Modality LUT sequence applied")
    else:
        steps.append(f"rescale slope {ds.RescaleSlope} intercept {ds.RescaleIntercept} applied")
    return values, float(ends.min()), float(ends.max())


def to_xrv_range(ds: Dataset, steps: list[str]) -> FloatArray:
    """Decode ``ds`` to a 2-D float32 image scaled to [-1024, 1024] (xrv's convention)."""
    data = _first_frame(ds, decode_pixels(ds), steps)
    data, is_luma = _to_grey(ds, data, steps)
    if is_luma:
        values, lo, hi = data, 0.0, 255.0
    else:
        values, lo, hi = _value_range(ds, data, steps)
    if hi <= lo:
        raise PreprocessError(f"{_uid(ds)}: empty value range [{lo}, {hi}]")
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        values = np.float32(hi + lo) - values.astype(np.float32)
        steps.append("MONOCHROME1 inverted")
    img = values.astype(np.float32) - np.float32(lo)
    return ((2 * (img / np.float32(hi - lo)) - 1.0) * XRV_RANGE).astype(np.float32)


def crop_and_resize(img: FloatArray, size: int = INPUT_SIZE) -> FloatArray:
    """Centre-crop to a square and resize, exactly as xrv's transforms do."""
    from torchxrayvision.datasets import XRayCenterCrop, XRayResizer

    out = XRayResizer(size)(XRayCenterCrop()(img[None, :, :]))
    return np.asarray(out, dtype=np.float32)


def preprocess(ds: Dataset, size: int = INPUT_SIZE) -> Preprocessed:
    """Turn a dataset into the model's input; raises :class:`PreprocessError`."""
    steps: list[str] = []
    img = to_xrv_range(ds, steps)
    if img.ndim != 2 or min(img.shape) < 2:
        raise PreprocessError(f"{_uid(ds)}: image of shape {img.shape} is not a 2-D image")
    return Preprocessed(crop_and_resize(img, size), tuple(steps))
