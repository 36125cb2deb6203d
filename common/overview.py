"""02's overview figure: a slide's thumbnail with its ROIs, kept lymphoma and negative patches, patches
dropped by class balance and patches rejected by the quality filter, in colour-blind-safe colours with a
legend with counts and a title.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from common.slide_io import SlideError
from common.slides import SlideTiles

# Overview colours (RGB), from the Okabe-Ito palette that stays distinct under colour-vision deficiency.
OVERVIEW_COLOURS = {
    "roi": (0, 114, 178),        # blue
    "positive": (213, 94, 0),    # vermillion
    "negative": (0, 158, 115),   # bluish green
    "dropped": (240, 228, 66),   # yellow
    "rejected": (204, 121, 167),  # reddish purple
}
OVERVIEW_TITLE_PX = 30  # rows above the map
_LEGEND_ROW_PX = 20
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def overview_image(result: SlideTiles, rois) -> np.ndarray:
    """The slide overview as uint8 (h, w, 3) RGB: a title, the thumbnail with every patch drawn in its
    category's colour (a 35 % tint and a 1 px outline of the exact colour), ROIs as 2 px outlines on top,
    and a legend with counts. The map starts ``OVERVIEW_TITLE_PX`` rows down at column 0, at the
    thumbnail's own scale (``result.tissue.scale`` px per level-0 px).

    Args:
        result: a ``tile_slide`` result with its ``tissue``.
        rois: int (R, 4) level-0 boxes as given to ``tile_slide``.
    """
    rois = np.asarray(rois, np.float64).reshape(-1, 4)
    image = result.tissue.thumbnail.copy()
    scale, side = result.tissue.scale, result.grid.patch_level0_px

    def corners(boxes: np.ndarray) -> np.ndarray:
        c = np.rint(np.asarray(boxes, np.float64).reshape(-1, 4) * scale).astype(np.int32)
        c[:, 2:] = np.maximum(c[:, :2], c[:, 2:] - 1)
        return c

    def outline(c: np.ndarray, rgb: tuple[int, int, int], thickness: int) -> None:
        # One polylines call draws every box: (K, 4 vertices, 2).
        x0, y0, x1, y1 = c.T
        vertices = np.stack([np.stack([x0, y0], 1), np.stack([x1, y0], 1), np.stack([x1, y1], 1),
                             np.stack([x0, y1], 1)], axis=1)
        cv2.polylines(image, list(vertices), True, rgb, thickness)

    def patches(coords: np.ndarray, rgb: tuple[int, int, int]) -> None:
        coords = np.asarray(coords, np.float64).reshape(-1, 2)
        c = corners(np.concatenate([coords, coords + side], axis=1))
        # Every box filled at once: +1/-1 at its corners, then 2-D cumulative sums (> 0 inside a box).
        h, w = image.shape[:2]
        marks = np.zeros((h + 1, w + 1), np.int32)
        x0, y0 = np.clip(c[:, 0], 0, w), np.clip(c[:, 1], 0, h)
        x1, y1 = np.clip(c[:, 2] + 1, 0, w), np.clip(c[:, 3] + 1, 0, h)
        for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
            np.add.at(marks, (ys, xs), sign)
        mask = marks.cumsum(0).cumsum(1)[:h, :w] > 0
        image[mask] = (0.65 * image[mask] + 0.35 * np.array(rgb)).astype(np.uint8)
        outline(c, rgb, 1)

    kept = result.y == 1
    layers = [("dropped", result.dropped_coords, "dropped by balance (not read)"),
              ("rejected", result.rejected_coords, "rejected by the quality filter"),
              ("negative", result.coords[~kept], "kept negative (unannotated tissue)"),
              ("positive", result.coords[kept], "kept lymphoma (inside an ROI)")]
    for key, coords, _ in layers:
        patches(coords, OVERVIEW_COLOURS[key])
    outline(corners(rois), OVERVIEW_COLOURS["roi"], 2)

    legend = [("roi", f"ROI (lymphoma annotation): {len(rois)}")] + \
        [(key, f"{label}: {len(coords)}") for key, coords, label in reversed(layers)]
    g = result.grid
    title = f"{g.slide}: patches at {g.target_mpp:g} um/px, read at level {g.level} ({g.level_mpp:.3g} um/px)"
    width = max(image.shape[1], 12 + cv2.getTextSize(title, _FONT, 0.5, 1)[0][0],
                36 + max(cv2.getTextSize(text, _FONT, 0.45, 1)[0][0] for _, text in legend))
    canvas = np.full((OVERVIEW_TITLE_PX + image.shape[0] + _LEGEND_ROW_PX * len(legend) + 8, width, 3), 255, np.uint8)
    canvas[OVERVIEW_TITLE_PX:OVERVIEW_TITLE_PX + image.shape[0], :image.shape[1]] = image
    cv2.putText(canvas, title, (6, 20), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for row, (key, text) in enumerate(legend):
        y = OVERVIEW_TITLE_PX + image.shape[0] + 4 + row * _LEGEND_ROW_PX
        cv2.rectangle(canvas, (6, y + 3), (20, y + 16), OVERVIEW_COLOURS[key], -1)
        cv2.putText(canvas, text, (28, y + 15), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def save_overview(png_path, result: SlideTiles, rois) -> Path:
    """Write ``overview_image`` as a PNG, atomically (temporary file, then rename); returns the path."""
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(overview_image(result, rois), cv2.COLOR_RGB2BGR))
    if not ok:
        raise SlideError(f"cannot encode overview for {result.slide}")
    tmp_path = png_path.with_name(png_path.name + ".tmp")
    tmp_path.write_bytes(encoded.tobytes())
    os.replace(tmp_path, png_path)
    return png_path
