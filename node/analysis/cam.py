"""Class activation maps onto the source image's geometry (pure).

The model saw the centred square of the source (``Geometry``: side ``side`` at ``top``,
``left``) resized to 224 x 224; DenseNet-121's last feature map is 7 x 7 over that input,
feature cell ``j`` covering input pixels ``[32 j, 32 j + 32)``. With pixels as unit areas
(pixel ``i`` covers ``[i, i + 1)``, the convention of skimage's resize and of the bilinear
upsampling CAMs are usually shown with), cell ``j``'s centre lies at ``top + (j + 0.5) *
side / 7`` in source coordinates. A display pixel ``d`` of an axis scaled from ``n`` source
pixels to ``m`` has its centre at source coordinate ``(d + 0.5) * n / m``; the map there is
the bilinear interpolation between the cells' centres (held constant beyond the outer
centres, up to the crop's edge), and nothing outside the crop, which the model never saw.
Each axis is one ``m x 7`` matrix, so the whole map is ``A_y @ cam @ A_x.T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from node.analysis.model import Finding
from node.analysis.preprocess import Geometry

FloatArray = npt.NDArray[np.float32]

MAX_MAPS = 3


def shown_findings(findings: Sequence[Finding], limit: int = MAX_MAPS) -> list[int]:
    """The indices of the findings at or above their operating threshold (``present``), the
    highest scores first, at most ``limit``."""
    present = [i for i, f in enumerate(findings) if f.present]
    return sorted(present, key=lambda i: -findings[i].score)[:limit]


def axis_weights(cells: int, offset: int, side: int, source: int, shown: int) -> FloatArray:
    """The ``shown x cells`` interpolation matrix of one axis: display pixel ``d`` (of
    ``shown`` over ``source`` source pixels) from the ``cells`` map cells spread over the
    crop ``[offset, offset + side)``; a row of zeros outside the crop."""
    centres = (np.arange(shown, dtype=np.float64) + 0.5) * (source / shown)
    inside = (centres >= offset) & (centres < offset + side)
    u = np.clip((centres - offset) * (cells / side) - 0.5, 0.0, cells - 1.0)
    low = np.minimum(np.floor(u).astype(np.int64), cells - 1)
    high = np.minimum(low + 1, cells - 1)
    frac = u - low
    out = np.zeros((shown, cells), dtype=np.float64)
    rows = np.arange(shown)
    np.add.at(out, (rows, low), 1.0 - frac)
    np.add.at(out, (rows, high), frac)
    out[~inside] = 0.0
    return out.astype(np.float32)


def crop_mask(geometry: Geometry, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Which display pixels (``shape``) lie inside the crop the model saw."""
    g = geometry

    def axis(offset: int, source: int, shown: int) -> npt.NDArray[np.bool_]:
        centres = (np.arange(shown) + 0.5) * (source / shown)
        return np.asarray((centres >= offset) & (centres < offset + g.side))

    return np.outer(axis(g.top, g.height, shape[0]), axis(g.left, g.width, shape[1]))


def map_to_display(cam: FloatArray, geometry: Geometry, shape: tuple[int, int]) -> FloatArray:
    """One ``h x w`` activation map over the model's input, onto a display of the source
    (``shape``: the source scaled to ``(rows, columns)``); zero outside the crop."""
    g = geometry
    rows = axis_weights(cam.shape[0], g.top, g.side, g.height, shape[0])
    cols = axis_weights(cam.shape[1], g.left, g.side, g.width, shape[1])
    return np.asarray(rows @ cam.astype(np.float32) @ cols.T, dtype=np.float32)
