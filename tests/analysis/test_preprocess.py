"""Unit: the pixel pipeline against torchxrayvision's own reader."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from helpers import ACRNEMA, NIH
from pydicom.dataset import Dataset
from reference import xrv_input

from node.analysis.preprocess import (
    ModalityLut,
    _clip_like_skimage,
    _Grey,
    _scaled,
    crop_and_resize,
    preprocess,
    to_xrv_range,
)
from node.core.errors import PreprocessError
from node.dicom.dicomio import read_dataset


def test_nih_matches_xrv_reference():
    ds = read_dataset(NIH)
    out = preprocess(ds)
    assert out.array.shape == (1, 224, 224) and out.array.dtype == np.float32
    np.testing.assert_allclose(out.array, xrv_input(NIH), atol=1e-3)


@pytest.mark.parametrize("bits", [12, 16])
def test_rescaled_monochrome2_matches_xrv(tmp_path, bits):
    ds = pydicom.dcmread(NIH)
    px = ds.pixel_array.astype(np.uint32) * ((2**bits - 1) // 255)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelData = px.astype(np.uint16).tobytes()
    path = tmp_path / f"mono2_{bits}.dcm"
    ds.save_as(path)
    np.testing.assert_allclose(preprocess(read_dataset(path)).array, xrv_input(path), atol=1e-3)


def test_monochrome1_inversion_matches_xrv(tmp_path):
    ds = pydicom.dcmread(NIH)
    ds.PixelData = (255 - ds.pixel_array).astype(np.uint8).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    out = preprocess(read_dataset(path))
    assert "MONOCHROME1 inverted" in out.steps
    np.testing.assert_allclose(out.array, xrv_input(path), atol=1e-3)
    np.testing.assert_allclose(out.array, xrv_input(NIH), atol=1e-3)


def test_acrnema_monochrome1_lungs_dark_spine_bright():
    ds = read_dataset(ACRNEMA)
    out = preprocess(ds).array[0]
    centre = out[60:170, 100:124].mean()  # spine / mediastinum column
    lungs = np.concatenate([out[60:150, 40:80].ravel(), out[60:150, 145:185].ravel()]).mean()
    assert lungs < centre - 100, (lungs, centre)
    raw = ds.pixel_array.astype(np.float32)
    maxval = max(2.0**ds.BitsStored - 1, float(raw.max()))
    ref = (2 * ((maxval - raw) / maxval) - 1) * 1024
    np.testing.assert_allclose(out, crop_and_resize(ref.astype(np.float32))[0], atol=1e-3)


def test_values_above_bits_stored_are_processed_and_logged(caplog):
    ds = pydicom.dcmread(NIH)
    ds.BitsStored, ds.HighBit = 7, 6  # 8-bit data declared as 7-bit
    out = preprocess(ds)
    assert any("exceed BitsStored" in s for s in out.steps)
    assert "exceed BitsStored range [0, 127]" in caplog.text
    assert np.isfinite(out.array).all() and out.array.max() <= 1024.0 + 1e-3


def test_missing_pixel_data_is_refused_with_uid():
    ds = pydicom.dcmread(NIH)
    del ds.PixelData
    with pytest.raises(
        PreprocessError, match=f"{ds.SOPInstanceUID}: the dataset has no Pixel Data"
    ):
        preprocess(ds)


def test_undecodable_transfer_syntax_is_refused_with_uid_and_name():
    ds = pydicom.dcmread(NIH)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.110"  # JPEG XL Lossless
    with pytest.raises(
        PreprocessError,
        match=f"{ds.SOPInstanceUID}: cannot decode Pixel Data in JPEG XL",
    ):
        preprocess(ds)


def test_rgb_is_converted_to_luma(tmp_path):
    ds = pydicom.dcmread(NIH)
    grey = ds.pixel_array
    ds.PixelData = np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8).tobytes()
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    out = preprocess(ds)
    assert any("greyscale" in s for s in out.steps)
    np.testing.assert_allclose(out.array, xrv_input(NIH), atol=1e-2)


def test_multiframe_uses_first_frame_and_says_so():
    ds = pydicom.dcmread(NIH)
    ds.PixelData = ds.PixelData + bytes(len(ds.PixelData))
    ds.NumberOfFrames = 2
    out = preprocess(ds)
    assert "multi-frame (2 frames): first frame used" in out.steps
    np.testing.assert_allclose(out.array, xrv_input(NIH), atol=1e-3)


def test_rescale_slope_intercept_is_applied_over_the_value_range():
    ds = pydicom.dcmread(NIH)
    raw = ds.pixel_array.astype(np.uint16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 8, 7
    ds.PixelData = raw.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = -1, 255  # an inverting modality LUT
    out = preprocess(ds)
    assert any("rescale slope" in s for s in out.steps)
    np.testing.assert_allclose(out.array, -xrv_input(NIH), atol=1e-2)


def test_signed_pixels_use_the_signed_range():
    ds = pydicom.dcmread(NIH)
    signed = ds.pixel_array.astype(np.int16) - 128
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 8, 7, 1
    ds.PixelData = signed.tobytes()
    np.testing.assert_allclose(preprocess(ds).array, xrv_input(NIH), atol=1e-2)


def test_unsupported_photometric_interpretation_is_refused():
    ds = pydicom.dcmread(NIH)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(PreprocessError, match="unsupported Photometric Interpretation"):
        preprocess(ds)


def _xrv_crop_resize(img: np.ndarray) -> np.ndarray:
    from torchxrayvision.datasets import XRayCenterCrop, XRayResizer

    return np.asarray(XRayResizer(224)(XRayCenterCrop()(img[None])))


def _xrv_crop(img: np.ndarray) -> np.ndarray:
    from torchxrayvision.datasets import XRayCenterCrop

    return np.asarray(XRayCenterCrop()(img[None])[0])


@pytest.mark.parametrize(
    "shape",
    [
        (1024, 1024),  # square, downsampled
        (300, 231),  # portrait; centre offset 35, not (300 - 231) // 2 = 34
        (231, 300),  # landscape
        (224, 224),  # the output size: identity
        (224, 501),  # side 224 from a wide image
        (100, 151),  # upsampled: no anti-aliasing
        (151, 100),
        (5, 7),  # tiny: upsampled ~45x, every output near an edge
        (3000, 2500),  # large portrait
        (2500, 3001),  # large landscape
    ],
)
def test_crop_and_resize_matches_xrv_transforms(shape):
    rng = np.random.default_rng(sum(shape))
    img = rng.uniform(-1024, 1024, shape).astype(np.float32)
    out = crop_and_resize(img)
    assert out.shape == (1, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, _xrv_crop_resize(img), atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", [(1024, 1024), (481, 640), (100, 151), (5, 7)])
@pytest.mark.parametrize("lo, hi", [(1000.0, 1024.0), (-1024.0, -1000.0)])
def test_crop_and_resize_clips_to_the_input_range_like_skimage(shape, lo, hi):
    img = np.zeros(shape, dtype=np.float32)  # 0 outside the centre square: not in the range
    crop = _xrv_crop(img)  # a view
    crop[...] = np.random.default_rng(7).uniform(lo, hi, crop.shape)
    ref = _xrv_crop_resize(img)
    # the border outputs are pulled towards cval = 0 and clipped back: this case clips
    assert (ref == (crop.min() if lo > 0 else crop.max())).any()
    np.testing.assert_allclose(crop_and_resize(img), ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", [(1024, 1024), (481, 640), (100, 151)])
@pytest.mark.parametrize("value", [-700.0, 333.25])
def test_constant_image_resizes_to_the_same_constant(shape, value):
    img = np.full(shape, value, dtype=np.float32)
    np.testing.assert_array_equal(_xrv_crop_resize(img), value)
    np.testing.assert_array_equal(crop_and_resize(img), value)


@pytest.mark.parametrize(
    "src, out",
    [
        ((5.0, 10.0), (-3.0, 12.0)),  # cval 0 outside the input's range, inside the output's
        ((-10.0, -5.0), (-12.0, 3.0)),
        ((5.0, 10.0), (1.0, 12.0)),  # outside both: plain clip
        ((-4.0, 6.0), (-9.0, 9.0)),  # inside the input's range
    ],
)
@pytest.mark.parametrize("nan", [False, True])
def test_clip_is_skimages_clip_warp_output(src, out, nan):
    from skimage.transform._warps import _clip_warp_output

    rng = np.random.default_rng(3)
    inp = rng.uniform(*src, (20, 20)).astype(np.float32)
    if nan:
        inp[4, 5] = np.nan  # skimage then takes the range ignoring NaNs
    resized = rng.uniform(*out, (8, 8)).astype(np.float32)
    expected = resized.copy()
    _clip_warp_output(inp, expected, "constant", 0, True)
    got = _clip_like_skimage(resized.copy(), inp)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape", [(512, 512), (100, 151), (2500, 3001)])
def test_nans_spread_and_are_ignored_by_the_clip_as_in_xrv(shape):
    img = np.random.default_rng(11).uniform(900, 1024, shape).astype(np.float32)
    crop = _xrv_crop(img)  # a view
    side = crop.shape[0]
    for y, x in [(0, 0), (side // 2, side // 3), (side - 1, side - 1)]:
        crop[y, x] = np.nan
    ref = _xrv_crop_resize(img)
    assert 0 < np.isnan(ref).sum() < 500
    np.testing.assert_allclose(crop_and_resize(img), ref, atol=1e-3, rtol=0)  # NaNs where ref's


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize(
    "dtype, lo, hi",
    [
        (np.uint8, 0, 255),
        (np.uint16, 0, 4095),
        (np.int16, -2048, 2047),
        (np.float32, -3e3, 7e4),
        (np.float64, -3e3, 7e4),  # e.g. after a rescale: rounded to float32 first, as before
    ],
)
def test_scaling_is_bit_for_bit_the_plain_formula(invert, dtype, lo, hi):
    values = np.random.default_rng(5).uniform(lo, hi, (64, 48)).astype(dtype)
    v = values.astype(np.float32)
    if invert:
        v = np.float32(hi + lo) - v
    expected = ((2 * ((v - np.float32(lo)) / np.float32(hi - lo)) - 1.0) * 1024.0).astype(
        np.float32
    )
    grey = _Grey(values, float(lo), float(hi), lut=ModalityLut(), invert=invert)
    np.testing.assert_array_equal(_scaled(Dataset(), grey, values), expected)


def _cropped_nih(tmp_path, rows: slice, cols: slice, photometric: str):
    ds = pydicom.dcmread(NIH)
    px = np.ascontiguousarray(ds.pixel_array[rows, cols])
    if photometric == "MONOCHROME1":
        px = 255 - px
    ds.PixelData, ds.PhotometricInterpretation = px.astype(np.uint8).tobytes(), photometric
    ds.Rows, ds.Columns = px.shape
    path = tmp_path / f"nih_{px.shape[0]}x{px.shape[1]}_{photometric}.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize(
    "rows, cols", [(slice(None), slice(0, 901)), (slice(100, 1001), slice(None))]
)
def test_non_square_matches_xrv_reference(tmp_path, rows, cols, photometric):
    path = _cropped_nih(tmp_path, rows, cols, photometric)
    out = preprocess(read_dataset(path))
    np.testing.assert_allclose(out.array, xrv_input(path), atol=1e-3, rtol=0)


def test_bits_stored_check_sees_pixels_outside_the_centre_square(tmp_path):
    ds = pydicom.dcmread(NIH)
    px = ds.pixel_array[:901, :].astype(np.uint16)  # 901 x 1024: columns 0..61 are cropped
    px[450, 0] = 4000  # beyond BitsStored = 8, outside the centre square
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 8, 7
    ds.PixelData, (ds.Rows, ds.Columns) = px.tobytes(), px.shape
    out = preprocess(ds)
    assert "stored values [0, 4000] exceed BitsStored range [0, 255]: true data range used" in (
        out.steps
    )
    ref = _xrv_crop_resize((2 * (px.astype(np.float32) / 4000) - 1) * 1024)
    np.testing.assert_allclose(out.array, ref, atol=1e-3, rtol=0)
    np.testing.assert_allclose(out.array, crop_and_resize(to_xrv_range(ds, [])), atol=1e-3)


# -- Modality LUT Sequence and malformed pixel data (real CRs carry both) ----------------
def _small_nih(bits: int = 16) -> Dataset:
    """A 96x80 crop of the NIH radiograph, 16-bit unsigned, stored values 0..255."""
    ds = pydicom.dcmread(NIH)
    px = np.ascontiguousarray(ds.pixel_array[400:496, 400:480]).astype(np.uint16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, 8, 7
    ds.Rows, ds.Columns = px.shape
    ds.PixelData = px.tobytes()
    return ds


def _with_lut(ds: Dataset, table: np.ndarray, first: int, bits: int, packed8: bool) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(table), first, bits]
    item.ModalityLUTType = "OD"
    if packed8:  # OW holding 8-bit entries, one byte each
        item.add_new(0x00283006, "OW", table.astype(np.uint8).tobytes())
    else:
        item.add_new(0x00283006, "US", [int(v) for v in table])
    ds.ModalityLUTSequence = [item]
    return ds


def _expected_lut_scaling(ds: Dataset, table: np.ndarray, first: int) -> np.ndarray:
    values = ds.pixel_array.astype(np.int64)
    mapped = table[np.clip(values - first, 0, len(table) - 1)].astype(np.float64)
    lo, hi = float(table.min()), float(table.max())
    return (2 * ((mapped - lo) / (hi - lo)) - 1) * 1024


@pytest.mark.parametrize(
    ("kind", "first", "bits", "packed8"),
    [
        ("linear", 0, 16, False),
        ("sqrt", 10, 16, False),  # first mapped value != 0: values below it take entry 0
        ("sqrt", 3, 8, True),  # 8-bit entries in OW
        ("linear", 0, 12, False),  # 12-bit entries: pydicom builds a 'uint12' dtype
    ],
)
def test_modality_lut_sequence_is_applied(kind, first, bits, packed8):
    grid = np.arange(256 - first, dtype=np.float64)
    top = 255 if bits == 8 else 4000
    table = grid / grid.max() * top if kind == "linear" else np.sqrt(grid / grid.max()) * top
    table = np.round(table).astype(np.int64)
    ds = _with_lut(_small_nih(), table, first, bits, packed8)
    steps: list[str] = []
    out = to_xrv_range(ds, steps)  # before the fix: IndexError from apply_modality_lut
    assert "Modality LUT sequence applied" in steps
    np.testing.assert_allclose(out, _expected_lut_scaling(ds, table, first), atol=1e-2)
    assert preprocess(ds).array.shape == (1, 224, 224)


def test_a_linear_modality_lut_equals_the_same_rescale():
    table = np.arange(256) * 3 + 100
    by_table = preprocess(_with_lut(_small_nih(), table, 0, 16, False)).array
    rescaled = _small_nih()
    rescaled.RescaleSlope, rescaled.RescaleIntercept = 3, 100
    np.testing.assert_allclose(by_table, preprocess(rescaled).array, atol=1e-2)


@pytest.mark.parametrize(
    "item",
    [
        {},  # an empty item
        {"LUTDescriptor": [256, 0, 16]},  # no LUT Data
        {"LUTDescriptor": [256, 0], "LUTData": [1, 2]},  # a 2-value descriptor
        {"LUTDescriptor": [256, 0, 16], "LUTData": [1, 2, 3]},  # 3 entries of 256
    ],
)
def test_a_malformed_modality_lut_fails_the_image_with_the_reason(item):
    ds = _small_nih()
    lut = Dataset()
    for keyword, value in item.items():
        setattr(lut, keyword, value)
    ds.ModalityLUTSequence = [lut]
    with pytest.raises(PreprocessError, match="malformed Modality LUT Sequence"):
        preprocess(ds)


def test_an_empty_modality_lut_sequence_fails_the_image_with_the_reason():
    ds = _small_nih()
    ds.ModalityLUTSequence = []
    with pytest.raises(PreprocessError, match="malformed Modality LUT Sequence"):
        preprocess(ds)


@pytest.mark.parametrize(("data", "reason"), [(b"", "empty"), (b"\x01\x02" * 100, "decode")])
def test_empty_or_short_pixel_data_fails_the_image_with_the_reason(data, reason):
    ds = _small_nih()
    ds.PixelData = data
    with pytest.raises(PreprocessError, match=reason):
        preprocess(ds)
