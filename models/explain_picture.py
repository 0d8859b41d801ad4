"""Pictures of an explanation: heat-map overlays (PNG) and a side-by-side picture with the
strongest region pairs linked. Red regions add to the score, blue ones take from it.

Maps cover the model's input, the centre square of each image (as the preprocessor crops it),
so pictures show that square. Pillow only: the torch-free service draws them too.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .explain import Explanation

__all__ = ["heat_overlay", "overlay_data_url", "side_by_side"]

SIDE = 320
PAIR_LINKS = 5


def heat_overlay(values: np.ndarray, scale: float, size: int = SIDE) -> Image.Image:
    """An RGBA layer for one ``(grid, grid)`` map: red for positive, blue for negative, more
    opaque the larger ``|value| / scale``; each region a block (nothing is interpolated)."""
    share = np.clip(np.asarray(values, np.float64) / (scale or 1.0), -1.0, 1.0)
    rgba = np.zeros((*share.shape, 4), np.uint8)
    rgba[..., 0] = np.where(share > 0, 230, 40)
    rgba[..., 1] = 60
    rgba[..., 2] = np.where(share > 0, 40, 230)
    rgba[..., 3] = (np.abs(share) * 190).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA").resize((size, size), Image.Resampling.NEAREST)


def _scale(explanation: Explanation) -> float:
    """One colour scale for both maps, so they can be compared."""
    return float(max(np.abs(explanation.query_map).max(), np.abs(explanation.match_map).max()))


def overlay_data_url(explanation: Explanation, side: str, size: int = 224) -> str:
    """``data:image/png;base64,...`` of the query's or the match's overlay."""
    values = explanation.query_map if side == "query" else explanation.match_map
    buffer = io.BytesIO()
    heat_overlay(values, _scale(explanation), size).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def side_by_side(
    query: Image.Image, match: Image.Image, explanation: Explanation, links: int = PAIR_LINKS
) -> Image.Image:
    """Query and match (centre squares) with their heat maps, the ``links`` strongest region
    pairs joined by numbered lines, and a caption saying the score and the method."""
    gap, caption = 60, 54
    canvas = Image.new("RGB", (2 * SIDE + gap, SIDE + caption), "white")
    scale = _scale(explanation)
    for offset, image, values in ((0, query, explanation.query_map),
                                  (SIDE + gap, match, explanation.match_map)):
        square = ImageOps.fit(image.convert("RGB"), (SIDE, SIDE), Image.Resampling.BICUBIC)
        square.paste(heat_overlay(values, scale), (0, 0), heat_overlay(values, scale))
        canvas.paste(square, (offset, 0))
    draw = ImageDraw.Draw(canvas)
    cell = SIDE / explanation.grid

    def centre(region: tuple[int, int], offset: int) -> tuple[float, float]:
        return offset + (region[1] + 0.5) * cell, (region[0] + 0.5) * cell

    for number, pair in enumerate(explanation.top_pairs(links), start=1):
        start, end = centre(pair.query, 0), centre(pair.match, SIDE + gap)
        draw.line([start, end], fill=(255, 215, 0), width=3)
        for x, y in (start, end):
            draw.ellipse([x - 9, y - 9, x + 9, y + 9], fill=(255, 215, 0), outline="black")
            draw.text((x - 3, y - 6), str(number), fill="black")
    method = "exact split" if explanation.exact else "occlusion (approximation)"
    draw.text((8, SIDE + 8), f"cosine {explanation.score:.3f}   method: {method}   "
              f"engine: {explanation.engine}", fill="black")
    draw.text((8, SIDE + 28), "red adds to the score, blue takes from it; lines: strongest "
              "region pairs", fill=(90, 90, 90))
    return canvas
