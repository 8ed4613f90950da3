"""The summary image: exact class activation maps from the same forward pass, their mapping
onto the source's geometry, the rendered pixels and the Secondary Capture (dciodvfy)."""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import NIH
from reference import xrv_input

from node.analysis.cam import crop_mask, map_to_display, shown_findings
from node.analysis.model import Finding, ModelInfo, class_maps, load_classifier
from node.analysis.preprocess import crop_geometry, display_shape, preprocess
from node.core.config import ModelConfig
from node.dicom.uids import summary_instance_uid
from node.sr.report import ReportContext
from node.sr.summary import banner_height, render
from node.sr.summarysc import SUMMARY_SERIES_DESCRIPTION, build_summary, encode_summary

SC = "1.2.840.10008.5.1.4.1.1.7"

CTX = ReportContext(uid_root="1.2.826.0.1.3680043.8.498.", device_name="CXR_NODE")
NOW = datetime(2026, 11, 28, 12, 0, 0)


@pytest.fixture(scope="module")
def classifier(weights_dir):
    return load_classifier(
        ModelConfig(cache_dir=weights_dir, allow_untrained=True, allow_download=False)
    )


# -- (a) the CAM: the same forward pass, equal to an independent computation ---------------
def test_scores_with_maps_equal_the_plain_forward(classifier):
    batch = np.stack([xrv_input(NIH), xrv_input(NIH)[:, ::-1, :].copy()])
    scores, features = classifier.predict_with_maps(batch)
    np.testing.assert_allclose(scores, classifier.predict(batch), atol=1e-6)
    assert features.shape == (2, 1024, 7, 7)


def test_cam_equals_an_independent_computation_with_forward_hooks(classifier):
    import torch

    module = classifier._module
    seen: dict[str, torch.Tensor] = {}
    hooks = [  # the input of the classifier (pooled) and the output of `features`
        module.features.register_forward_hook(lambda m, i, o: seen.update(raw=o.clone())),
        module.classifier.register_forward_hook(lambda m, i, o: seen.update(logits=o.clone())),
    ]
    x = xrv_input(NIH)[None]
    try:
        with torch.no_grad():
            module(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    fmap = torch.relu(seen["raw"])[0]  # features2: relu, then average pooling
    weight, bias = module.classifier.weight.detach(), module.classifier.bias.detach()
    want = torch.einsum("kc,chw->khw", weight, fmap).numpy()

    _scores, features = classifier.predict_with_maps(x)
    which = list(range(18))
    got = class_maps(features[0], classifier.class_weights(), which)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the mean of each map (+ bias) is the model's own logit: it is the same pass
    np.testing.assert_allclose(
        got.mean(axis=(1, 2)) + bias.numpy(), seen["logits"][0].numpy(), rtol=1e-4, atol=1e-4
    )


def _finding(name: str, score: float) -> Finding:
    return Finding(name, score, 0.5, score >= 0.5)


def test_shown_findings_are_those_above_threshold_highest_first_at_most_three():
    fs = [_finding(n, s) for n, s in zip("abcdef", (0.2, 0.9, 0.5, 0.7, 0.6, 0.49), strict=True)]
    assert shown_findings(fs) == [1, 3, 4]
    assert shown_findings([_finding("a", 0.1)]) == []


# -- (b) geometry: a known activation lands on the expected source pixels ------------------
@pytest.mark.parametrize(("height", "width"), [(2500, 2048), (1800, 2400), (600, 400), (700, 700)])
def test_a_cell_lands_on_its_source_pixels_through_crop_and_resize(height, width):
    g = crop_geometry(height, width)
    shape = display_shape(height, width, 1024)
    assert max(shape) == min(1024, max(height, width))
    sy, sx = shape[0] / height, shape[1] / width
    for row, col in ((0, 0), (2, 5), (6, 3), (3, 3), (1, 4)):
        cam = np.zeros((7, 7), np.float32)
        cam[row, col] = 1.0
        shown = map_to_display(cam, g, shape)
        # the cell's centre in source pixels: the crop's offset + its share of the side,
        # then in display pixels (pixel i covers [i, i + 1))
        y = (g.top + (row + 0.5) * g.side / 7) * sy - 0.5
        x = (g.left + (col + 0.5) * g.side / 7) * sx - 0.5
        assert shown[round(y), round(x)] == pytest.approx(1.0, abs=0.05)
        if 0 < row < 6 and 0 < col < 6:  # an inner cell peaks there, and falls off around
            peak = np.unravel_index(np.argmax(shown), shown.shape)
            assert abs(peak[0] - y) <= 1.0 and abs(peak[1] - x) <= 1.0
            step = g.side / 7
            assert shown[round(y), round(x + step * sx)] == pytest.approx(0.0, abs=0.05)
            assert shown[round(y - step * sy), round(x)] == pytest.approx(0.0, abs=0.05)
    # nothing beyond the square the model saw; a constant map fills all of it
    flat = map_to_display(np.ones((7, 7), np.float32), g, shape)
    inside = crop_mask(g, shape)
    assert np.all(flat[~inside] == 0.0)
    np.testing.assert_allclose(flat[inside], 1.0, atol=1e-6)
    cols = np.flatnonzero(inside.any(axis=0))
    rows = np.flatnonzero(inside.any(axis=1))
    assert abs(cols[0] - g.left * sx) <= 1 and abs(cols[-1] + 1 - (g.left + g.side) * sx) <= 1
    assert abs(rows[0] - g.top * sy) <= 1 and abs(rows[-1] + 1 - (g.top + g.side) * sy) <= 1


def test_landscape_crop_leaves_the_sides_and_portrait_the_top_and_bottom():
    land, port = crop_geometry(1000, 1600), crop_geometry(1600, 1000)
    assert (land.top, land.left, land.side) == (0, 300, 1000)
    assert (port.top, port.left, port.side) == (300, 0, 1000)
    shown = map_to_display(np.ones((7, 7), np.float32), land, (640, 1024))
    assert shown[:, :150].max() == 0.0 and shown[:, -150:].max() == 0.0
    assert shown[:, 200:800].min() == pytest.approx(1.0)


def test_preprocess_records_the_crop_and_the_display_only_when_asked():
    ds = pydicom.dcmread(NIH)
    plain = preprocess(ds)
    assert plain.display is None and plain.geometry == crop_geometry(ds.Rows, ds.Columns)
    shown = preprocess(ds, display_max=512)
    np.testing.assert_array_equal(shown.array, plain.array)
    assert shown.display is not None and max(shown.display.shape) == 512
    assert shown.display.dtype == np.uint8 and shown.display.std() > 10
    whole = preprocess(ds, display_max=1024)  # no downscaling: scaled once for both
    np.testing.assert_array_equal(whole.array, plain.array)
    assert whole.display is not None and whole.display.shape == (ds.Rows, ds.Columns)
    halved = whole.display.reshape(512, 2, 512, 2).mean(axis=(1, 3))
    assert np.abs(halved - shown.display).max() <= 1.0  # the same image, at two sizes


# -- the pixels -------------------------------------------------------------------------------
def _model(trained: bool) -> ModelInfo:
    return ModelInfo(
        "densenet121-res224-all", "", "0" * 64, "1.0", trained, ("Cardiomegaly",), (0.5,)
    )


def test_render_draws_heat_legend_and_the_untrained_banner():
    from node.sr.summary import HeatMap

    grey = np.full((300, 400), 128, np.uint8)
    cam = np.zeros((7, 7), np.float32)
    cam[3, 3] = 1.0
    g = crop_geometry(300, 400)
    heat = HeatMap("Cardiomegaly", 0.71, map_to_display(cam, g, (300, 400)))
    out = render(grey, [heat], untrained=True)
    assert out.shape == (300, 400, 3) and out.dtype == np.uint8
    centre = out[150, 200]
    assert centre[0] > 180 and centre[2] < 100  # red over the grey where the map peaks
    band = out[: banner_height(400, 300)]
    assert (band[..., 0] > 150).mean() > 0.5 and (band[..., 1] > 100).any()  # red, text
    trained = render(grey, [heat], untrained=False)
    assert (trained[: banner_height(400, 300), :, 0] < 100).mean() > 0.5  # dark, not red
    assert (out[-20:, 30:150].min(axis=2) > 100).any()  # the legend's text


def test_heat_is_blended_in_its_own_colour_up_to_its_fringe():
    """Colour and opacity are upscaled apart: where the opacity fades out, the colour must
    still be the map's (a black colour there would darken the image around each map)."""
    from node.sr.summary import COLOURS, HeatMap, overlay_shape

    grey = np.full((512, 512), 128, np.uint8)
    cam = np.zeros((7, 7), np.float32)
    cam[2:5, 2:5] = 1.0
    g = crop_geometry(512, 512)
    maps = [
        HeatMap(f"f{n}", 0.9, map_to_display(np.roll(cam, n, 1), g, overlay_shape((512, 512))))
        for n in range(2)
    ]
    for heats in (maps[:1], maps):
        out = render(grey, heats, untrained=False)[40:-80].astype(int)  # no banner, legend
        assert (out[..., 0] >= 127).all()  # red and yellow only ever add red over grey
        assert (out[..., 2] <= 129).all()  # and take blue away, never add it
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert tuple(COLOURS[0]) not in colours  # never the bare colour: blended at most 55 %


# -- (c) the Secondary Capture ---------------------------------------------------------------
def _dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("Error")]


@pytest.mark.parametrize("compression", ["jpeg", "none"])
def test_summary_secondary_capture_is_valid_and_references_its_source(tmp_path, compression):
    src = pydicom.dcmread(NIH)
    pixels = render(preprocess(src, display_max=256).display, [], untrained=True)
    enc = encode_summary(src, pixels, _model(False), CTX, NOW, compression)
    sc = pydicom.dcmread(BytesIO(enc.data))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (src.SeriesInstanceUID,)
    assert sc.SeriesDescription == f"{SUMMARY_SERIES_DESCRIPTION} [UNTRAINED]"
    assert sc.BurnedInAnnotation == "YES"
    ref = sc.ReferencedImageSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        src.SOPClassUID,
        src.SOPInstanceUID,
    )
    assert sc.SOPInstanceUID == summary_instance_uid(
        CTX.uid_root, src.SOPInstanceUID, _model(False).model_id, "0" * 64
    )
    assert sc.PatientID == src.PatientID and sc.ContentDate == "20261128"
    if compression == "none":
        np.testing.assert_array_equal(sc.pixel_array, pixels)
        assert sc.PhotometricInterpretation == "RGB"
    else:  # lossy, and said so
        assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert sc.LossyImageCompression == "01" and len(enc.data) < pixels.size // 4
        decoded = pydicom.pixels.pixel_array(sc, as_rgb=True).astype(int)
        assert np.abs(decoded - pixels).mean() < 3
    again = build_summary(src, pixels, _model(False), CTX, NOW)  # deterministic
    assert again.SOPInstanceUID == sc.SOPInstanceUID
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    path = tmp_path / "summary.dcm"
    path.write_bytes(enc.data)
    assert _dciodvfy_errors(path) == []


# -- cxr-node classify --summary-dir ------------------------------------------------------------
def test_classify_summary_dir_writes_valid_summary_images(tmp_path, weights_dir):
    import json
    import sys

    from conftest import write_config
    from helpers import ACRNEMA

    from node.dicom.dicomio import read_dataset

    conf = write_config(
        tmp_path / "c.toml", {"model": {"cache_dir": str(weights_dir), "allow_download": False}}
    )
    out, summaries = tmp_path / "r.json", tmp_path / "summaries"
    args = [sys.executable, "-m", "node", "classify", "--config", str(conf), "--allow-untrained"]
    done = subprocess.run(
        [*args, str(NIH), str(ACRNEMA), "--json", str(out), "--summary-dir", str(summaries)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(out.read_text())
    files = sorted(summaries.iterdir())
    assert len(files) == 2 and sorted(Path(r["summary"]["file"]) for r in records) == files
    for record, src in zip(records, (NIH, ACRNEMA), strict=True):
        sc = pydicom.dcmread(record["summary"]["file"])
        assert sc.SOPInstanceUID == record["summary"]["sop_instance_uid"]
        assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
            read_dataset(src).SOPInstanceUID
        )
        shown = [f for f in record["findings"] if f["label"] == "present"]
        assert "UNTRAINED" in sc.SeriesDescription and len(shown) >= 1  # maps to draw
        if shutil.which("dciodvfy"):
            assert _dciodvfy_errors(Path(record["summary"]["file"])) == []
    plain = subprocess.run(
        [*args, str(NIH)], capture_output=True, text=True, timeout=300, check=False
    )
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)[0]["summary"] is None


# -- in the node: delivered with the SR; a summary that fails leaves the SR ---------------------
def test_a_summary_image_that_cannot_be_built_leaves_the_sr(tmp_path, weights_dir, monkeypatch):
    from helpers import Recorder, drain

    import node.process.summarize
    from node.core.config import NodeConfig
    from node.jobs.delivery import Delivery
    from node.jobs.worker import Worker
    from node.store.spool import Spool

    cfg = NodeConfig.model_validate(
        {"model": {"cache_dir": str(weights_dir), "allow_untrained": True}}
    )
    spool = Spool(tmp_path / "spool", fsync=False)
    ds = pydicom.dcmread(NIH)
    spool.store(NIH.read_bytes(), ds.SOPInstanceUID, ds.SOPClassUID, "TEST")

    def broken(*_args, **_kwargs):
        raise KeyError("no such font")

    monkeypatch.setattr(node.process.summarize, "render", broken)
    dest = Recorder()
    drain(Worker(spool, load_classifier(cfg.model), cfg), Delivery(spool, cfg, dest))
    [job] = spool.jobs()
    assert job.state == "sent" and len(dest.sent) == 1
    sr = pydicom.dcmread(BytesIO(dest.sent[0]))
    assert sr.SOPInstanceUID == job.sr_uid
    assert _summary_refs(sr) == []  # no reference to an image that does not exist
    [study] = sr.CurrentRequestedProcedureEvidenceSequence
    assert [s.SeriesInstanceUID for s in study.ReferencedSeriesSequence] == [ds.SeriesInstanceUID]
    spool.close()


def _summary_refs(sr: pydicom.Dataset) -> list[str]:
    """The SOP Instance UIDs the SR's "Illustration of ROI" items reference."""
    from sr_tree import content_items

    return [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in content_items(sr)
        if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121200"
    ]


def test_the_sr_references_its_summary_image_and_lists_it_as_evidence(tmp_path, classifier):
    from node.process.pipeline import analyze
    from node.process.summarize import Summarizer
    from node.sr.srtemplate import ReportEncoder

    src = pydicom.dcmread(NIH)
    info = classifier.info
    fast, slow = ReportEncoder(info, CTX), ReportEncoder(info, CTX, fast=False)
    summaries = Summarizer(info, CTX, classifier.class_weights())
    for reports in (fast, slow):
        [out] = analyze([src], classifier, reports, NOW, summaries)
        assert out.summary is not None
        sr = pydicom.dcmread(BytesIO(out.sr.data))
        assert _summary_refs(sr) == [out.summary.sop_instance_uid]
        [study] = sr.CurrentRequestedProcedureEvidenceSequence
        listed = {
            (series.SeriesInstanceUID, ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        summary = (out.summary.series_instance_uid, SC, out.summary.sop_instance_uid)
        assert listed == {(src.SeriesInstanceUID, src.SOPClassUID, src.SOPInstanceUID), summary}
    assert fast.fast
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    path = tmp_path / "sr.dcm"
    path.write_bytes(out.sr.data)
    assert _dciodvfy_errors(path) == []


def test_per_job_outcomes_from_the_objects_answered():
    from node.jobs.delivery import per_job

    loaded = [("a", [1, 2]), ("b", [1]), ("c", [1, 2])]
    assert per_job(loaded, ["", "", "", "", ""]) == ["", "", ""]
    assert per_job(loaded, ["", "0xA700", "", "0xC000", ""]) == ["0xA700", "", "0xC000"]
    assert per_job(loaded, ["", "", "", ""]) == ["", ""]  # c's summary unanswered: c is lost
    assert per_job(loaded, ["", "0xA700", ""]) == ["0xA700", ""]
    assert per_job(loaded, ["x"]) == []


def test_heat_maps_on_the_coarse_overlay_grid_look_as_on_the_full_one():
    from node.sr.summary import HeatMap, overlay_shape

    display = np.full((700, 1000), 100, np.uint8)
    g = crop_geometry(1400, 2000)
    cam = np.random.default_rng(3).random((7, 7)).astype(np.float32)
    full = render(display, [HeatMap("x", 0.7, map_to_display(cam, g, (700, 1000)))], False)
    coarse_grid = map_to_display(cam, g, overlay_shape((700, 1000)))
    coarse = render(display, [HeatMap("x", 0.7, coarse_grid)], False)
    diff = np.abs(full.astype(int) - coarse.astype(int))
    assert diff.mean() < 0.5 and np.percentile(diff, 99.5) <= 8


@pytest.mark.parametrize("where", ["corner", "middle", "edge", "none"])
def test_blending_only_the_drawn_box_gives_the_whole_images_blend(where):
    """render scales up and blends only the box around the drawn cells: the pixels are
    those of scaling and blending the whole display (within one level)."""
    from PIL import Image

    from node.sr.summary import HeatMap, _overlay, overlay_shape

    display = np.random.default_rng(5).integers(0, 255, (701, 998), dtype=np.uint8)
    grid = np.zeros(overlay_shape(display.shape), np.float32)
    h, w = grid.shape
    spots = {
        "corner": (slice(0, h // 20), slice(0, w // 20)),
        "middle": (slice(h * 45 // 100, h * 55 // 100), slice(w * 40 // 100, w * 56 // 100)),
        "edge": (slice(h * 9 // 10, None), slice(w * 24 // 25, None)),
    }
    if where in spots:
        grid[spots[where]] = np.linspace(0.1, 1.0, grid[spots[where]].size).reshape(
            grid[spots[where]].shape
        )
    heats = [HeatMap("x", 0.7, grid)]
    got = render(display, heats, False)
    pil = Image.fromarray(display).convert("RGB")
    colours, alpha = _overlay(heats)
    tint = Image.fromarray(colours).resize(pil.size, Image.Resampling.NEAREST)
    mask = Image.fromarray(alpha).resize(pil.size, Image.Resampling.BILINEAR)
    whole = np.asarray(Image.composite(tint, pil, mask))
    band = banner_height(998, 701)
    legend = slice(0, 400)  # the legend's columns (bottom left) are drawn over both alike

    def differ(a: np.ndarray, b: np.ndarray) -> int:
        return int(np.abs(a.astype(int) - b.astype(int)).max())

    # within one level: the box's scaling computes its coefficients from the box's bounds
    assert differ(got[band:, legend.stop :], whole[band:, legend.stop :]) <= 1
    assert differ(got[band:-120], whole[band:-120]) <= 1
    plain = np.asarray(pil)
    assert (got[band:, 400:] != plain[band:, 400:]).any() == (where in ("middle", "edge"))
