"""Unit: the pixel pipeline against torchxrayvision's own reader."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from helpers import ACRNEMA, NIH
from reference import xrv_input

from node.dicomio import read_dataset
from node.errors import PreprocessError
from node.preprocess import preprocess


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
    from node.preprocess import crop_and_resize

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
