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

Speed. The scaling to [-1024, 1024] (and the Modality LUT) is elementwise, so it is applied
to the centre square only, after the whole image has been checked against BitsStored. The
resize replaces ``skimage.transform.resize(img, (1, n, n), mode="constant",
preserve_range=True)`` (what ``XRayResizer`` runs) by ``clip(R @ X @ R.T)``, where ``X`` is
the ``s x s`` centre square and ``R`` an ``n x s`` sparse matrix built once per ``(s, n)``.
This is exact, not an approximation: with ``cval=0`` every step before the clip is linear
and acts on each axis on its own -- the anti-aliasing Gaussian (``scipy.ndimage``, one 1-D
pass per axis, ``sigma=max(0, (s/n - 1)/2)``, only when downsampling) and the order-1
``ndimage.zoom`` in ``grid-constant`` mode (a tensor product of 1-D linear weights). So the
2-D resize is ``R @ X @ R.T``, where ``R`` is the 1-D resize of length ``s`` to ``n``, and
``R`` is obtained by running skimage's own ``resize`` (unclipped) on the columns of the
identity. The one non-linear step, skimage's final clip to the input's [min, max] (widened
to include ``cval`` when that lies outside the input's range but inside the output's), is
applied afterwards exactly as skimage does, with the centre square's range (NaNs ignored,
as skimage does). Outputs differ from skimage's only by float32 rounding (a few 1e-4 at
most on the [-1024, 1024] scale). Building ``R`` costs about one skimage resize of the
image; the last 8 are cached.
"""

from __future__ import annotations

import functools
import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array

from node.core.errors import PreprocessError

log = logging.getLogger(__name__)

INPUT_SIZE = 224
XRV_RANGE = 1024.0
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Geometry:
    """Where the model's input came from in the source image: the centred square of side
    ``side`` at (``top``, ``left``) of a ``height x width`` image, resized to ``size``."""

    height: int
    width: int
    top: int
    left: int
    side: int
    size: int = INPUT_SIZE


def crop_geometry(height: int, width: int, size: int = INPUT_SIZE) -> Geometry:
    """The crop :func:`centre_crop` takes of a ``height x width`` image (pure)."""
    side = min(height, width)
    return Geometry(height, width, height // 2 - side // 2, width // 2 - side // 2, side, size)


@dataclass(frozen=True)
class Preprocessed:
    """The model input (shape ``(1, 224, 224)``, float32 in [-1024, 1024]) and what was done;
    ``geometry``: the crop and resize; ``display``: when asked, the whole source image as the
    model saw it (same Modality LUT, inversion and scaling), ``uint8``, at most
    ``display_max`` pixels on its long side."""

    array: FloatArray
    steps: tuple[str, ...]
    geometry: Geometry | None = None
    display: npt.NDArray[np.uint8] | None = None


def _uid(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "<no SOP Instance UID>"))


def decode_pixels(ds: Dataset) -> npt.NDArray[np.generic]:
    """Decode Pixel Data, raising :class:`PreprocessError` with the reason when impossible."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PreprocessError(f"{_uid(ds)}: the dataset has no Pixel Data")
    if "PixelData" in ds and not ds.PixelData:
        raise PreprocessError(f"{_uid(ds)}: the Pixel Data element is empty")
    try:
        return _unmasked(ds)
    except (
        NotImplementedError,
        RuntimeError,
        ValueError,
        AttributeError,
        KeyError,
        TypeError,
        IndexError,
        OverflowError,
        struct.error,
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


@dataclass(frozen=True)
class ModalityLut:
    """The Modality LUT of an image: a rescale (slope, intercept), a table, or neither.

    A table is applied here rather than by pydicom's ``apply_modality_lut``, which indexes
    with the input's dtype (floats raise), builds ``uint<bits>`` dtypes that do not exist
    for 10 or 12-bit entries, and reads 8-bit entries as 16-bit words.
    """

    slope: float = 1.0
    intercept: float = 0.0
    table: npt.NDArray[np.float64] | None = None
    first_mapped: int = 0

    @property
    def active(self) -> bool:
        return self.table is not None or self.slope != 1.0 or self.intercept != 0.0

    def apply(self, values: np.ndarray) -> np.ndarray:
        if self.table is not None:
            index = np.asarray(values, dtype=np.int64) - self.first_mapped
            np.clip(index, 0, len(self.table) - 1, out=index)
            return self.table[index]
        if self.slope == 1.0 and self.intercept == 0.0:
            return values
        return np.asarray(values, dtype=np.float64) * self.slope + self.intercept

    def range(self, lo: float, hi: float) -> tuple[float, float]:
        """The lowest and highest output for inputs in [lo, hi]."""
        if self.table is not None:
            return float(self.table.min()), float(self.table.max())
        ends = self.apply(np.array([lo, hi], dtype=np.float64))
        return float(ends.min()), float(ends.max())


def _lut_entries(ds: Dataset, item: Dataset, count: int, bits: int) -> npt.NDArray[np.float64]:
    data = item.get("LUTData")
    raw = data if isinstance(data, bytes | bytearray) else None
    if raw is not None:  # OW: 16-bit words, or 8-bit entries packed two to a word
        if bits <= 8 and len(raw) in (count, count + 1):
            entries: np.ndarray = np.frombuffer(raw[:count], dtype=np.uint8)
        else:
            big = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") == (
                "1.2.840.10008.1.2.2"
            )
            entries = np.frombuffer(raw[: len(raw) // 2 * 2], dtype=">u2" if big else "<u2")
    else:  # US: a list of values (one value reads as an int)
        entries = np.atleast_1d(np.asarray([] if data is None else data, dtype=np.float64))
    if len(entries) < count:
        raise PreprocessError(
            f"{_uid(ds)}: malformed Modality LUT Sequence: {len(entries)} LUT Data entries, "
            f"the LUT Descriptor says {count}"
        )
    return np.asarray(entries[:count], dtype=np.float64)


def _lut_table(ds: Dataset) -> ModalityLut:
    items = ds.ModalityLUTSequence
    descriptor = items[0].get("LUTDescriptor") if len(items) else None
    values = list(descriptor) if descriptor is not None else []
    if len(values) != 3 or "LUTData" not in items[0]:
        raise PreprocessError(
            f"{_uid(ds)}: malformed Modality LUT Sequence: its item needs a 3-value LUT "
            f"Descriptor and LUT Data (descriptor: {values or 'absent'})"
        )
    # read as US or SS: the 1st and 3rd values are unsigned, the 2nd signed for signed pixels
    count, first, bits = (int(v) & 0xFFFF for v in values)
    count = count or 2**16
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first > 2**15 - 1:
        first -= 2**16
    return ModalityLut(table=_lut_entries(ds, items[0], count, bits), first_mapped=first)


def modality_lut(ds: Dataset) -> ModalityLut:
    """The image's Modality LUT (PS3.3 C.11.1); raises :class:`PreprocessError` when it
    is malformed."""
    if "ModalityLUTSequence" in ds:
        return _lut_table(ds)
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise PreprocessError(f"{_uid(ds)}: invalid Rescale Slope/Intercept: {exc}") from exc
    return ModalityLut(slope, intercept)


def _value_range(
    ds: Dataset, data: np.ndarray, lut: ModalityLut, steps: list[str]
) -> tuple[float, float]:
    """Return the lowest and highest values possible after the Modality LUT.

    The whole image is checked against BitsStored (values beyond it widen the range); the
    LUT itself is applied later, by :func:`_scaled`, to the pixels that are used.
    """
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
    if not lut.active:
        return lo, hi
    if lut.table is not None:
        steps.append("Modality LUT sequence applied")
    else:
        steps.append(f"rescale slope {lut.slope:g} intercept {lut.intercept:g} applied")
    return lut.range(lo, hi)


@dataclass(frozen=True)
class _Grey:
    """A decoded 2-D image, before the Modality LUT, and how to scale it."""

    data: np.ndarray
    lo: float  # lowest and highest values possible after the Modality LUT
    hi: float
    lut: ModalityLut  # inactive for colour images (already luminance in [0, 255])
    invert: bool  # MONOCHROME1


def _grey(ds: Dataset, steps: list[str]) -> _Grey:
    data = _first_frame(ds, decode_pixels(ds), steps)
    data, is_luma = _to_grey(ds, data, steps)
    lut = ModalityLut() if is_luma else modality_lut(ds)
    lo, hi = (0.0, 255.0) if is_luma else _value_range(ds, data, lut, steps)
    if hi <= lo:
        raise PreprocessError(f"{_uid(ds)}: empty value range [{lo}, {hi}]")
    invert = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    if invert:
        steps.append("MONOCHROME1 inverted")
    return _Grey(data, lo, hi, lut, invert)


def _scaled(ds: Dataset, grey: _Grey, pixels: np.ndarray) -> FloatArray:
    """Apply the Modality LUT, MONOCHROME1 inversion and scaling to [-1024, 1024] to
    ``pixels`` (all or part of ``grey.data``), elementwise.

    Bit for bit ``(2 * ((v - lo) / (hi - lo)) - 1) * 1024`` in float32, in three passes:
    the factors 2 and 1024 are powers of two, so folding them in rounds identically.
    """
    values = grey.lut.apply(pixels)
    lo = np.float32(grey.lo)
    img: FloatArray
    if grey.invert:
        img = np.subtract(np.float32(grey.hi + grey.lo), values, dtype=np.float32, casting="unsafe")
        img -= lo
    else:
        img = np.subtract(values, lo, dtype=np.float32, casting="unsafe")
    img /= np.float32(grey.hi - grey.lo) / np.float32(2 * XRV_RANGE)
    img -= np.float32(XRV_RANGE)
    return img


def to_xrv_range(ds: Dataset, steps: list[str]) -> FloatArray:
    """Decode ``ds`` to a 2-D float32 image scaled to [-1024, 1024] (xrv's convention)."""
    grey = _grey(ds, steps)
    return _scaled(ds, grey, grey.data)


def centre_crop(img: np.ndarray) -> np.ndarray:
    """The centred square of side ``min(height, width)`` (a view), as ``XRayCenterCrop``."""
    g = crop_geometry(*img.shape[:2])
    return img[g.top : g.top + g.side, g.left : g.left + g.side]


_OPERATOR_CHUNK = 256  # identity columns resized at a time: at most side x 256 float64


@functools.lru_cache(maxsize=8)
def _resize_operator(side: int, size: int) -> Any:
    """The ``size x side`` float32 ``scipy.sparse.csr_array`` (untyped, hence ``Any``) of
    skimage's 1-D resize from ``side`` to ``size`` as ``XRayResizer`` runs it, without the
    final clip: read off by resizing the columns of the identity. Read-only, as cached."""
    import scipy.sparse as sp  # type: ignore[import-untyped]
    from skimage.transform import resize

    blocks = []
    for start in range(0, side, _OPERATOR_CHUNK):
        width = min(_OPERATOR_CHUNK, side - start)
        eye = np.zeros((side, width))
        eye[start + np.arange(width), np.arange(width)] = 1.0
        cols = resize(  # type: ignore[no-untyped-call]
            eye, (size, width), mode="constant", preserve_range=True, clip=False
        )
        blocks.append(sp.csr_array(np.asarray(cols, dtype=np.float32)))
    op = sp.hstack(blocks, format="csr")
    for part in (op.data, op.indices, op.indptr):
        part.flags.writeable = False
    log.debug("resize operator %d -> %d built: %d non-zeros", side, size, op.nnz)
    return op


def _clip_like_skimage(out: FloatArray, img: FloatArray) -> FloatArray:
    """Clip ``out`` in place to the range of ``img`` (NaNs ignored), widened to include
    cval = 0 when 0 lies outside it but inside ``out``'s: skimage's ``_clip_warp_output``."""
    min_, max_ = np.min, np.max
    lo = float(min_(img))
    if np.isnan(lo):
        min_, max_ = np.nanmin, np.nanmax
        lo = float(min_(img))
    hi = float(max_(img))
    if not lo <= 0.0 <= hi and float(min_(out)) <= 0.0 <= float(max_(out)):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    np.clip(out, np.float32(lo), np.float32(hi), out=out)
    return out


def resize_square(img: FloatArray, size: int = INPUT_SIZE) -> FloatArray:
    """Resize a square float32 image to ``(1, size, size)`` as ``XRayResizer(size)`` does."""
    side = img.shape[0]
    if img.ndim != 2 or img.shape[1] != side:
        raise ValueError(f"resize_square needs a square 2-D image, not {img.shape}")
    x = np.asarray(img, dtype=np.float32)
    op = _resize_operator(side, size)
    rows = np.asarray(op @ x, dtype=np.float32)  # size x side
    out = np.asarray(op @ np.ascontiguousarray(rows.T), dtype=np.float32).T  # size x size
    return _clip_like_skimage(np.ascontiguousarray(out), x)[None, :, :]


def crop_and_resize(img: FloatArray, size: int = INPUT_SIZE) -> FloatArray:
    """Centre-crop to a square and resize, exactly as xrv's transforms do."""
    return resize_square(centre_crop(img), size)


def display_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """``height x width`` scaled down (never up) to at most ``longest`` on the long side."""
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _display(ds: Dataset, grey: _Grey, shape: tuple[int, int]) -> FloatArray:
    """The whole image as the model saw it, area-averaged down to ``shape`` first (the
    scaling is elementwise), in [-1024, 1024]."""
    from PIL import Image

    data = np.asarray(grey.data, dtype=np.float32)
    small = Image.fromarray(data).resize(shape[::-1], Image.Resampling.BOX)
    return _scaled(ds, grey, np.asarray(small, dtype=np.float32))


def _grey_levels(img: FloatArray) -> npt.NDArray[np.uint8]:
    """[-1024, 1024] mapped to 0..255, rounded."""
    scale = np.float32(255.0 / (2 * XRV_RANGE))
    out = np.multiply(img, scale, dtype=np.float32)
    out += np.float32(XRV_RANGE) * scale + np.float32(0.5)
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)


def preprocess(ds: Dataset, size: int = INPUT_SIZE, display_max: int | None = None) -> Preprocessed:
    """Turn a dataset into the model's input; raises :class:`PreprocessError`. With
    ``display_max``, also the image as the model saw it, for the summary image (scaled
    once for both where it needs no downscaling: the scaling is elementwise)."""
    steps: list[str] = []
    grey = _grey(ds, steps)
    if grey.data.ndim != 2 or min(grey.data.shape) < 2:
        raise PreprocessError(f"{_uid(ds)}: image of shape {grey.data.shape} is not a 2-D image")
    height, width = grey.data.shape
    geometry = crop_geometry(height, width, size)
    shape = None if display_max is None else display_shape(height, width, display_max)
    display: npt.NDArray[np.uint8] | None
    if shape == (height, width):
        whole = _scaled(ds, grey, grey.data)
        square, display = centre_crop(whole), _grey_levels(whole)
    else:
        square = _scaled(ds, grey, centre_crop(grey.data))
        display = None if shape is None else _grey_levels(_display(ds, grey, shape))
    return Preprocessed(resize_square(square, size), tuple(steps), geometry, display)
