"""One image's summary image, from what the pipeline already has (pure): its findings, the
feature map of the same forward pass, the crop geometry and the display image
(:mod:`node.analysis.cam` -> :mod:`node.sr.summary` -> :mod:`node.sr.summarysc`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from node.analysis.cam import map_to_display, shown_findings
from node.analysis.model import Finding, ModelInfo, class_maps
from node.analysis.preprocess import Geometry, Preprocessed
from node.core.errors import ReportError
from node.sr.report import ReportContext
from node.sr.summary import HeatMap, overlay_shape, render
from node.sr.summarysc import EncodedSummary, encode_summary

DISPLAY_MAX = 1024
"""The summary image's long side at most, in pixels."""


class Summarizer:
    """Builds summary images for one model (its classifier weights) and report context."""

    def __init__(
        self,
        model: ModelInfo,
        ctx: ReportContext,
        weights: npt.NDArray[np.float32],
        compression: str = "jpeg",
        threads: int = 2,
    ) -> None:
        """``threads``: how many images of a batch are summarised at once."""
        self.model = model
        self.ctx = ctx
        self.weights = weights
        self.compression = compression
        self.threads = threads

    def heat_maps(
        self,
        geometry: Geometry,
        shape: tuple[int, int],
        findings: Sequence[Finding],
        features: npt.NDArray[np.float32],
    ) -> list[HeatMap]:
        """The class activation map of each finding shown, on a display of ``shape``."""
        shown = shown_findings(findings)
        maps = class_maps(features, self.weights, shown)
        return [
            HeatMap(findings[i].pathology, findings[i].score, map_to_display(m, geometry, shape))
            for i, m in zip(shown, maps, strict=True)
        ]

    def encode(
        self,
        source: Dataset,
        prep: Preprocessed,
        findings: Sequence[Finding],
        features: npt.NDArray[np.float32],
        now: datetime,
    ) -> EncodedSummary:
        display, geometry = prep.display, prep.geometry
        if display is None or geometry is None:
            raise ReportError("no display image: preprocess was not asked for one")
        shape = overlay_shape((int(display.shape[0]), int(display.shape[1])))
        heats = self.heat_maps(geometry, shape, findings, features)
        pixels = render(display, heats, untrained=not self.model.trained)
        return encode_summary(source, pixels, self.model, self.ctx, now, self.compression)
