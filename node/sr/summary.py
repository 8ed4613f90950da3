"""The summary image's pixels (pure): the source as the model saw it, a heat map of each
finding shown, a legend with their names and scores, and a banner. Values in, an RGB
``uint8`` array out; text drawn with Pillow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
RGBArray = npt.NDArray[np.uint8]

COLOURS = ((255, 48, 48), (255, 214, 0), (0, 200, 255))
"""One colour per finding shown, in the legend's order."""
UNTRAINED_BANNER = "UNTRAINED MODEL - NOT FOR DIAGNOSIS"
BANNER = "AI CXR summary - NOT FOR DIAGNOSIS"
NONE_SHOWN = "No finding above its operating threshold"
HEAT_FLOOR = 0.3
"""Parts of a map below this fraction of its maximum are not coloured."""
HEAT_ALPHA = 0.55
OVERLAY_STEP = 8


@dataclass(frozen=True)
class HeatMap:
    """One finding shown: its name, its score and its map on the display's grid (zero
    outside the part of the image the model saw)."""

    name: str
    score: float
    values: FloatArray


def font_size(width: int, height: int) -> int:
    return max(9, min(width, height * 2) // 40)


def banner_height(width: int, height: int) -> int:
    """The banner's rows at the top of a ``width x height`` summary image."""
    return min(height, round(font_size(width, height) * 1.6))


def heat_alpha(values: FloatArray) -> npt.NDArray[np.uint8]:
    """A map's opacity, 0..255: nothing below :data:`HEAT_FLOOR` of its maximum, rising to
    :data:`HEAT_ALPHA` at it (a map without a positive value is not drawn)."""
    peak = float(values.max(initial=0.0))
    if peak <= 0.0:
        return np.zeros(values.shape, dtype=np.uint8)
    scale = np.float32(255.0 * HEAT_ALPHA / (1.0 - HEAT_FLOOR))
    alpha = (values * np.float32(1.0 / peak) - np.float32(HEAT_FLOOR)) * scale
    out: npt.NDArray[np.uint8] = np.clip(alpha, 0.0, 255.0).astype(np.uint8)
    return out


def _annotate(pil: Any, heats: Sequence[HeatMap], untrained: bool) -> RGBArray:
    from PIL import ImageDraw, ImageFont

    width, height = pil.size
    draw = ImageDraw.Draw(pil)
    size = font_size(width, height)
    font = ImageFont.load_default(size=size)
    band = banner_height(width, height)
    draw.rectangle((0, 0, width, band - 1), fill=(170, 0, 0) if untrained else (32, 32, 32))
    text = UNTRAINED_BANNER if untrained else BANNER
    draw.text((size // 2, band // 2), text, fill=(255, 255, 255), font=font, anchor="lm")
    lines = [(f"{h.name}  {h.score:.2f}", COLOURS[i]) for i, h in enumerate(heats)]
    lines = lines or [(NONE_SHOWN, (255, 255, 255))]
    step = round(size * 1.3)
    top = height - step * len(lines) - size // 2
    right = max(draw.textlength(t, font=font) for t, _ in lines) + 2.5 * size
    draw.rectangle((0, top - size // 4, right, height), fill=(0, 0, 0))
    for n, (line, colour) in enumerate(lines):
        y = top + n * step
        draw.rectangle((size // 2, y + size // 6, size // 2 + size * 0.8, y + size), fill=colour)
        draw.text((size * 1.6, y), line, fill=(255, 255, 255), font=font)
    return np.asarray(pil, dtype=np.uint8)


def overlay_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The grid the heat maps are computed on for a display of ``shape``: every
    :data:`OVERLAY_STEP`-th pixel (the maps are bilinear over 7 x 7 cells: smooth at that
    scale), so that blending costs a few milliseconds, not tens."""
    return max(1, -(-shape[0] // OVERLAY_STEP)), max(1, -(-shape[1] // OVERLAY_STEP))


def _overlay(heats: Sequence[HeatMap]) -> tuple[RGBArray, npt.NDArray[np.uint8]]:
    """The heat maps, each in its colour, composited over one another ("over"): the colour
    and the opacity, apart. Where no map is drawn the colour is that of the map strongest
    there, so that upscaling the two apart blends no black in."""
    shape = heats[0].values.shape
    rgb = np.zeros((3, *shape), dtype=np.float32)  # premultiplied, channels first
    alpha = np.zeros(shape, dtype=np.float32)
    strongest = np.full(shape, -1.0, dtype=np.float32)
    fallback = np.zeros(shape, dtype=np.int64)
    for n, heat in enumerate(heats):
        if heat.values.shape != shape:
            raise ValueError(f"heat maps of shapes {heat.values.shape} and {shape}")
        a = heat_alpha(heat.values).astype(np.float32) * np.float32(1.0 / 255.0)
        rgb *= 1.0 - a
        for channel, value in zip(rgb, COLOURS[n], strict=True):
            channel += np.float32(value) * a
        alpha *= 1.0 - a
        alpha += a
        relative = heat.values * np.float32(1.0 / max(float(heat.values.max(initial=0.0)), 1e-12))
        wins = relative > strongest
        np.copyto(strongest, relative, where=wins)
        np.copyto(fallback, n, where=wins)
    palette = np.asarray(COLOURS[: len(heats)], dtype=np.float32)[fallback]  # h x w x 3
    straight = rgb.transpose(1, 2, 0) / np.maximum(alpha, np.float32(1e-6))[..., None]
    colours = np.where((alpha > 0.0)[..., None], straight, palette)
    return (
        np.clip(colours + np.float32(0.5), 0, 255).astype(np.uint8),
        np.clip(alpha * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8),
    )


def render(display: npt.NDArray[np.uint8], heats: Sequence[HeatMap], untrained: bool) -> RGBArray:
    """The summary image: ``display`` (greyscale, ``rows x columns``) with each heat map
    (at most :data:`COLOURS` of them, all on one grid of the display's extent, e.g.
    :func:`overlay_shape`) blended in its colour, the banner (red and UNTRAINED when
    ``untrained``) across the top and the legend at the bottom left."""
    if len(heats) > len(COLOURS):
        raise ValueError(f"at most {len(COLOURS)} heat maps, got {len(heats)}")
    from PIL import Image

    pil = Image.fromarray(display).convert("RGB")
    if heats:
        colours, alpha = _overlay(heats)
        box = drawn_box(alpha, pil.size)
        if box is not None:  # scaled up and blended only where a map is drawn
            x0, y0, x1, y1 = box
            sx, sy = alpha.shape[1] / pil.width, alpha.shape[0] / pil.height
            cells, size = (x0 * sx, y0 * sy, x1 * sx, y1 * sy), (x1 - x0, y1 - y0)
            # Scaled apart: the opacity smoothly; the colour, which changes only slowly
            # (where maps overlap), as cells (a fifth of the time, no premultiplying).
            tint = Image.fromarray(colours).resize(size, Image.Resampling.NEAREST, box=cells)
            mask = Image.fromarray(alpha).resize(size, Image.Resampling.BILINEAR, box=cells)
            pil.paste(tint, (x0, y0), mask)
    return _annotate(pil, heats, untrained)


def drawn_box(alpha: npt.NDArray[np.uint8], size: tuple[int, int]) -> tuple[int, ...] | None:
    """The display pixels (x0, y0, x1, y1) outside which an opacity grid ``alpha`` scaled
    bilinearly to ``size`` (width, height) is zero: its non-zero cells with one cell
    around them (bilinear reaches that far); None where no cell is drawn."""
    rows, cols = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
    if rows.size == 0:
        return None
    (width, height), (grid_h, grid_w) = size, alpha.shape
    fx, fy = width / grid_w, height / grid_h
    return (
        max(0, int(np.floor((cols[0] - 1) * fx))),
        max(0, int(np.floor((rows[0] - 1) * fy))),
        min(width, int(np.ceil((cols[-1] + 2) * fx))),
        min(height, int(np.ceil((rows[-1] + 2) * fy))),
    )
