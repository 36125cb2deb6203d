"""The slide-wide patch grid at PCam's scale: choose the level, find the tissue, read and filter patches.

Works in microns: a slide's scale comes from ``openslide.mpp-x`` (or an explicit override), the wanted
downsample is ``target_mpp / mpp``, patches are read from the coarsest pyramid level that is not
coarser than that (with a relative tolerance, because Aperio downsamples are like 4.00008) and
shrunk to ``patch_size_px`` with ``cv2.INTER_AREA``; nothing is ever upsampled beyond the tolerance.
Every read is at most ``max_read_px`` per side, so a 100k x 100k single-level slide stays bounded in
memory. Patches are read as strips of grid neighbours (their own pixels only, not the glass between
them), in row order so that OpenSlide's tile cache serves shared tiles, on a few threads; at PCam
scale OpenSlide's ``read_region`` is then ~85 % of the time. Transparent pixels (outside the scanned
area) are composited on white.

The stages, used by 02 (``common.slides.tile_slide``, which adds the ROIs) and by whole-slide maps
(``common.slidemap``), so that both tile a slide one way:
- ``slide_grid``: scale, level and patch side in level-0 px (a ``Grid``);
- ``read_tissue`` / ``tissue_cells``: the thumbnail's tissue mask and the grid cells over tissue
  (``TissueMap.pieces`` gives the connected tissue piece -- a TMA core -- under a point);
- ``read_filtered``: batched reads and the quality filter (``common.filters.measure_and_filter``);
- ``tile_tissue``: all of the above for every tissue cell of a slide, ROIs ignored;
- ``tile_options``: the ``tile_dlbcl`` config section as their keyword arguments.

Usage:
    grid = slide_grid(slide, "131.svs", target_mpp=0.972)
    whole = tile_tissue("TMA/HE/131.svs", **tile_options(cfg["tile_dlbcl"]))  # whole.x, .coords, .core
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import openslide

from common.filters import DLBCL_QUALITY, measure_and_filter, thresholds_from_config
from common.slide_io import SlideError, open_slide, pick_level, read_patches, read_thumbnail, slide_mpp

# A thumbnail pixel is tissue when its saturation exceeds the DLBCL patch floor (thesis: S > 0.07).
TISSUE_MIN_SATURATION = 0.07
# A grid cell counts as tissue (a negative candidate) when at least this fraction of it is tissue on the thumbnail.
CELL_MIN_TISSUE_FRACTION = 0.5
# Relative upsampling a pyramid level may need and still be read: PCam's own scale varies about 7 %
# between its two Camelyon16 centres, so 5 % lets a 0.25 um/px slide read its 4x level for 0.972 um/px.
SCALE_TOLERANCE = 0.05
# Patches read and filtered per batch, so rejected pixels never pile up (~113 MB of 96 px patches).
PATCH_BATCH = 4096


def roi_grid(roi, patch_level0_px: float) -> np.ndarray:
    """Top-left corners of the whole patches that fit inside a box, on a grid from its corner.

    Args:
        roi: (xs, ys, xe, ye) level-0 px, xe and ye exclusive.
        patch_level0_px: patch side in level-0 px (float; corners are floored).

    Returns:
        int64 (K, 2) level-0 (x, y), row by row; K = 0 when not one patch fits.
    """
    xs, ys, xe, ye = (float(v) for v in roi)
    # The epsilon keeps a box of exactly n patches (n * p computed in float) from losing one.
    n_x = max(0, int(np.floor((xe - xs) / patch_level0_px + 1e-9)))
    n_y = max(0, int(np.floor((ye - ys) / patch_level0_px + 1e-9)))
    x = xs + np.floor(np.arange(n_x) * patch_level0_px + 1e-9)
    y = ys + np.floor(np.arange(n_y) * patch_level0_px + 1e-9)
    grid_y, grid_x = np.meshgrid(y, x, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.int64)


# ---------------------------------------------------------------- the grid at the experiment scale


@dataclass(frozen=True)
class Grid:
    """How one slide is tiled at the experiment scale: the level read and the patch size in level-0 px.

    ``slide`` file name; ``width_px``, ``height_px`` level-0 size; ``mpp`` level-0 um/px; ``target_mpp``
    output um/px; ``level`` the pyramid level read, ``level_downsample`` its level-0 px per level px and
    ``level_mpp`` its um/px; ``downsample`` level-0 px per output px; ``patch_level0_px`` patch side in
    level-0 px; ``patch_size_px`` output side in px.
    """

    slide: str
    width_px: int
    height_px: int
    mpp: float
    target_mpp: float
    level: int
    level_downsample: float
    level_mpp: float
    downsample: float
    patch_level0_px: float
    patch_size_px: int

    def snap(self, coords: np.ndarray) -> np.ndarray:
        """Level-0 corners int64 (K, 2) moved to the nearest whole pixel of the level read.

        OpenSlide interpolates a region that starts between two pixels of the level, so a patch read at a
        fractional level position would differ from the level's own pixels; snapped, a read at the level
        starts on its pixel grid (exactly when the downsample is an integer). Level 0: unchanged."""
        d = self.level_downsample
        return np.rint(np.rint(np.asarray(coords, np.float64) / d) * d).astype(np.int64)

    def cells(self) -> np.ndarray:
        """Top-left corners int64 (K, 2), level-0 px, of the slide-wide grid of whole patches, row by row."""
        return self.snap(roi_grid((0, 0, self.width_px, self.height_px), self.patch_level0_px))


def slide_grid(slide, name: str, *, target_mpp: float = 0.972, patch_size_px: int = 96,
               mpp_override: float | None = None, allow_objective_power: bool = False,
               scale_tolerance: float = SCALE_TOLERANCE) -> Grid:
    """The slide's scale, the pyramid level to read (``pick_level``) and the patch side in level-0 px.

    Raises:
        SlideError: no usable scale, or a target finer than the slide.
    """
    mpp = slide_mpp(slide, name, mpp_override, allow_objective_power)
    wanted = target_mpp / mpp
    level = pick_level(slide.level_downsamples, wanted, scale_tolerance)
    level_downsample = float(slide.level_downsamples[level])
    # Snap float noise (target = exactly k * mpp) so that such a level is read without resampling.
    if abs(wanted / level_downsample - 1) < 1e-6:
        wanted = level_downsample
    width, height = slide.dimensions
    return Grid(name, int(width), int(height), mpp, float(target_mpp), level, level_downsample,
                mpp * level_downsample, wanted, patch_size_px * wanted, patch_size_px)


def tile_options(tile_dlbcl: dict) -> dict:
    """Keyword arguments of ``tile_slide`` and ``tile_tissue`` from the ``tile_dlbcl`` config section, so that
    every user of 02's grid (02 itself, whole-slide maps) tiles at the same scale with the same rules."""
    t = tile_dlbcl
    return {"target_mpp": t["target_mpp"], "mpp_override": t["mpp_override"],
            "allow_objective_power": t["allow_objective_power"], "scale_tolerance": t["scale_tolerance"],
            "max_read_px": t["max_read_px"],
            "quality": thresholds_from_config(t)}  # 02's quality rule: HSV means, IHC and focus tests


# ---------------------------------------------------------------- tissue on the thumbnail


@dataclass
class TissueMap:
    """A slide's thumbnail and its tissue mask (saturation > ``TISSUE_MIN_SATURATION``).

    ``thumbnail`` uint8 (h, w, 3) RGB; ``scale`` thumbnail px per level-0 px; ``mask`` bool (h, w).
    """

    thumbnail: np.ndarray
    scale: float
    mask: np.ndarray

    def fraction(self, coords: np.ndarray, patch_level0_px: float) -> np.ndarray:
        """Fraction float64 (K,) of each patch's thumbnail pixels that are tissue, via an integral image.

        coords: int (K, 2) level-0 top-left corners."""
        integral = cv2.integral(self.mask.astype(np.uint8)).astype(np.int64)
        thumb_h, thumb_w = self.mask.shape
        x0 = np.clip(np.floor(coords[:, 0] * self.scale).astype(np.int64), 0, thumb_w - 1)
        y0 = np.clip(np.floor(coords[:, 1] * self.scale).astype(np.int64), 0, thumb_h - 1)
        x1 = np.clip(np.maximum(x0 + 1, np.rint((coords[:, 0] + patch_level0_px) * self.scale)), 0, thumb_w)
        y1 = np.clip(np.maximum(y0 + 1, np.rint((coords[:, 1] + patch_level0_px) * self.scale)), 0, thumb_h)
        x1, y1 = x1.astype(np.int64), y1.astype(np.int64)
        tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return tissue / ((x1 - x0) * (y1 - y0))

    def pieces(self, points: np.ndarray, patch_level0_px: float) -> np.ndarray:
        """Connected tissue piece (a TMA core) int (K,) under each level-0 point (K, 2); 0 = none.

        The mask is closed (5 x 5) so that a core's pale gaps do not split it and dilated by half a patch
        so that the centre of a patch on a core's rim falls inside the core. Cores closer than that merge
        into one piece, which only makes groups coarser (never a leak)."""
        mask = cv2.morphologyEx(self.mask.astype(np.uint8), cv2.MORPH_CLOSE,
                                cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
        reach = 2 * int(np.ceil(patch_level0_px * self.scale / 2)) + 1
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (reach, reach)))
        _, labels = cv2.connectedComponents(mask, connectivity=8)
        x = np.clip((points[:, 0] * self.scale).astype(np.int64), 0, labels.shape[1] - 1)
        y = np.clip((points[:, 1] * self.scale).astype(np.int64), 0, labels.shape[0] - 1)
        return labels[y, x]


def read_tissue(slide, thumbnail_px: int = 1024, max_read_px: int = 4096) -> TissueMap:
    """The slide's thumbnail (``read_thumbnail``) and its tissue mask."""
    thumbnail, scale = read_thumbnail(slide, thumbnail_px, max_read_px)
    hsv = cv2.cvtColor(thumbnail.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)
    return TissueMap(thumbnail, scale, hsv[..., 1] > TISSUE_MIN_SATURATION)


def tissue_cells(tissue: TissueMap, grid: Grid) -> np.ndarray:
    """Cells int64 (K, 2) of the slide-wide grid, level-0 top-left, that are at least
    ``CELL_MIN_TISSUE_FRACTION`` tissue on the thumbnail, row by row."""
    cells = grid.cells()
    return cells[tissue.fraction(cells, grid.patch_level0_px) >= CELL_MIN_TISSUE_FRACTION]


# ---------------------------------------------------------------- read and quality-filter


class Filtered(NamedTuple):
    """Patches read and quality-filtered: ``keep`` bool (B,), ``reason`` str (B,) ('' where kept), the kept
    patches ``x`` uint8 (keep.sum(), p, p, 3) RGB and their ``mean_value`` float32 (keep.sum(),), the
    filter's blurred mean HSV value (brightness, 0..1), which 02 summarises."""

    keep: np.ndarray
    reason: np.ndarray
    x: np.ndarray
    mean_value: np.ndarray


def read_filtered(slide, coords: np.ndarray, grid: Grid, *, max_read_px: int = 4096,
                  quality: dict | None = None) -> Iterator[Filtered]:
    """Read patches in batches of ``PATCH_BATCH`` and quality-filter them, so rejected pixels never pile up.

    Args:
        slide: an OpenSlide.
        coords: int (K, 2) level-0 top-left corners, in the order wanted.
        grid: the slide's ``Grid``.
        max_read_px: largest region side read at once, in px of the level read.
        quality: keyword arguments of ``filter_patches``; default ``DLBCL_QUALITY``.

    Yields:
        A ``Filtered`` per consecutive batch of ``coords``.
    """
    quality = DLBCL_QUALITY if quality is None else quality
    for start in range(0, len(coords), PATCH_BATCH):
        patches = read_patches(slide, coords[start:start + PATCH_BATCH], grid.patch_level0_px, grid.level,
                               grid.patch_size_px, max_read_px)
        measures, keep, reason = measure_and_filter(patches, **quality)
        yield Filtered(keep, reason, patches[keep], measures[keep, 2])


def read_all(slide, coords: np.ndarray, grid: Grid, max_read_px: int, quality: dict | None) -> Filtered:
    """``read_filtered`` collected into one ``Filtered`` for all of ``coords``."""
    batches = list(read_filtered(slide, coords, grid, max_read_px=max_read_px, quality=quality))
    p = grid.patch_size_px
    return Filtered(np.concatenate([np.zeros(0, bool), *(b.keep for b in batches)]),
                    np.concatenate([np.zeros(0, "<U1"), *(b.reason for b in batches)]),
                    np.concatenate([np.empty((0, p, p, 3), np.uint8), *(b.x for b in batches)]),
                    np.concatenate([np.zeros(0, np.float32), *(b.mean_value for b in batches)]))


# ---------------------------------------------------------------- all tissue of a slide (no ROIs)


@dataclass
class TissueTiles:
    """Every tissue cell of a slide's grid, read and quality-filtered (``tile_tissue``).

    ``x`` uint8 (K, p, p, 3) kept patches; ``coords`` int64 (K, 2) their level-0 top-left corners;
    ``core`` int64 (K,) their tissue piece (``TissueMap.pieces`` of the patch centre, 0 = none);
    ``rejected_coords`` (M, 2), ``rejected_core`` (M,), ``rejected_reason`` str (M,) for the rest.
    """

    grid: Grid
    tissue: TissueMap
    x: np.ndarray
    coords: np.ndarray
    core: np.ndarray
    rejected_coords: np.ndarray
    rejected_core: np.ndarray
    rejected_reason: np.ndarray


def tile_tissue(path, *, target_mpp: float = 0.972, patch_size_px: int = 96, mpp_override: float | None = None,
                allow_objective_power: bool = False, scale_tolerance: float = SCALE_TOLERANCE, max_read_px: int = 4096,
                quality: dict | None = None, thumbnail_px: int = 1024) -> TissueTiles:
    """Tile all tissue of a slide on 02's grid with 02's tissue and quality rules, ROIs ignored.

    The grid, level choice, tissue test (cells >= ``CELL_MIN_TISSUE_FRACTION`` tissue) and quality
    filter are exactly those of ``tile_slide``, so a patch here at the coordinates of a 02 patch holds
    the same pixels. Arguments as in ``tile_slide``.

    Raises:
        SlideError: missing or unreadable slide, no scale, or a target finer than the slide.
    """
    name = Path(path).name
    slide = open_slide(path)
    try:
        grid = slide_grid(slide, name, target_mpp=target_mpp, patch_size_px=patch_size_px, mpp_override=mpp_override,
                          allow_objective_power=allow_objective_power, scale_tolerance=scale_tolerance)
        tissue = read_tissue(slide, thumbnail_px, max_read_px)
        coords = tissue_cells(tissue, grid)
        keep, reason, x, _ = read_all(slide, coords, grid, max_read_px, quality)
    except openslide.OpenSlideError as exc:
        raise SlideError(f"cannot read slide {name}: {exc}") from exc
    finally:
        slide.close()
    core = tissue.pieces(coords + grid.patch_level0_px / 2, grid.patch_level0_px)
    return TissueTiles(grid, tissue, x, coords[keep], core[keep], coords[~keep], core[~keep], reason[~keep])
