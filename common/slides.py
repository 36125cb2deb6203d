"""OpenSlide tiling of whole-slide images into PCam-scale patches (DLBCL-Morph TMA slides).

Works in microns: a slide's scale comes from ``openslide.mpp-x`` (or an explicit override), the wanted
downsample is ``target_mpp / mpp``, patches are read from the coarsest pyramid level that is not
coarser than that (with a relative tolerance, because Aperio downsamples are like 4.00008) and
shrunk to ``patch_size_px`` with ``cv2.INTER_AREA``; nothing is ever upsampled beyond the tolerance.
Every read is at most ``max_read_px`` per side, so a 100k x 100k single-level slide stays bounded in
memory. Patches are read as strips of grid neighbours (their own pixels only, not the glass between
them), in row order so that OpenSlide's tile cache serves shared tiles, on a few threads; at PCam
scale OpenSlide's ``read_region`` is then ~85 % of the time. Transparent pixels (outside the scanned
area) are composited on white.

Inputs: a slide path, ROI boxes ``int (R, 4)`` as (xs, ys, xe, ye) in level-0 pixels (xe, ye
exclusive), one id and one group (patient id) per ROI.
Outputs (``tile_slide``, a ``SlideTiles``): positives -- ``patch_size_px`` patches on a grid inside each
ROI, label 1; negatives -- grid cells over tissue that touch no ROI, label 0; both quality-filtered with
``common.filters.filter_patches``; per-label counts, skipped ROIs with reasons, and the thumbnail for
``save_overview``.

The stages are public for other users of 02's grid (e.g. whole-slide prediction maps): ``slide_grid``
(scale, level, patch side), ``read_tissue`` / ``tissue_cells`` (thumbnail tissue test, cells of the
slide-wide grid, ``TissueMap.pieces`` for the connected tissue piece -- a TMA core -- under a point),
``read_filtered`` (batched read + quality filter) and ``tile_tissue`` (all tissue of a slide, no ROIs);
``tile_options`` turns the ``tile_dlbcl`` config section into their keyword arguments.

Usage:
    result = tile_slide("TMA/HE/131.svs", rois, roi_ids, groups, target_mpp=0.972)
    save_overview("overview/131.png", result, rois)
    whole = tile_tissue("TMA/HE/131.svs", **tile_options(cfg["tile_dlbcl"]))  # whole.x, .coords, .core
"""

from __future__ import annotations

import csv
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from common.errors import UserError
from common.filters import DLBCL_QUALITY, filter_patches, thresholds_from_config

# A thumbnail pixel is tissue when its saturation exceeds the DLBCL patch floor (thesis: S > 0.07).
TISSUE_MIN_SATURATION = 0.07
# A grid cell counts as tissue (a negative candidate) when at least this fraction of it is tissue on the thumbnail.
CELL_MIN_TISSUE_FRACTION = 0.5
# Relative upsampling a pyramid level may need and still be read: PCam's own scale varies about 7 %
# between its two Camelyon16 centres, so 5 % lets a 0.25 um/px slide read its 4x level for 0.972 um/px.
SCALE_TOLERANCE = 0.05
# Patches read and filtered per batch, so rejected pixels never pile up (~113 MB of 96 px patches).
PATCH_BATCH = 4096


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SlideError(UserError):
    """A slide cannot be used: missing, unreadable, without a scale, or asked to upsample."""


def open_slide(path) -> openslide.OpenSlide:
    """Open a whole-slide image with OpenSlide.

    Args:
        path: str or Path of the slide file (.svs, pyramidal .tiff, ...).

    Returns:
        The opened ``openslide.OpenSlide``.

    Raises:
        SlideError: the file does not exist or OpenSlide cannot open it (message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"slide file not found: {path}")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(f"cannot open slide {path}: {exc}") from exc


def _positive_float(raw) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


# Level-0 um/px of typical scans at 20x and 40x, by openslide.vendor (others: the usual 0.50 and 0.25).
TYPICAL_MPP = {"aperio": (0.50, 0.25), "hamamatsu": (0.46, 0.23)}


def missing_mpp_advice(slide, name: str) -> str:
    """One line for a slide without ``openslide.mpp-x``: what is known of it (vendor, objective power,
    size) and what to set, with the typical um/px of its vendor's 20x and 40x scans and the physical
    size each would give the slide (a TMA slide's tissue area is a few cm at most)."""
    vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown vendor"
    power = _positive_float(slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    width, height = slide.dimensions
    mpp_20x, mpp_40x = TYPICAL_MPP.get(vendor, (0.50, 0.25))
    known = f"{vendor}, {width} x {height} px, " + (f"objective power {power:g}x" if power else "no objective power")
    advice = f"slide {name} ({known}) has no openslide.mpp-x; set tile_dlbcl.mpp_override to its level-0 um/px"
    if power:
        return (f"{advice} ({vendor} scans at {power:g}x are usually about {mpp_40x * 40 / power:.2f} um/px), or "
                f"enable tile_dlbcl.allow_objective_power to use 10 / {power:g} = {10 / power:.3g} um/px")

    def mm(mpp: float) -> str:
        return f"{width * mpp / 1e3:.1f} x {height * mpp / 1e3:.1f} mm"

    return (f"{advice}: typical {vendor} scans are {mpp_20x:.2f} um/px at 20x (the slide would be {mm(mpp_20x)}) "
            f"and {mpp_40x:.2f} at 40x ({mm(mpp_40x)})")


def slide_mpp(slide, name: str, mpp_override: float | None = None,
              allow_objective_power: bool = False) -> float:
    """Level-0 microns per pixel of a slide.

    Order: ``openslide.mpp-x``; else ``mpp_override``; else, if allowed, 10 / objective power (the
    usual 40x = 0.25 um/px convention, a guess); else an error with advice that fits the slide
    (``missing_mpp_advice``).

    Args:
        slide: an OpenSlide (anything with ``properties`` and ``dimensions``).
        name: the slide's name for messages.
        mpp_override: um/px to use where the slide has no ``openslide.mpp-x``.
        allow_objective_power: fall back to ``openslide.objective-power``.

    Returns:
        mpp in um/px (float > 0).

    Raises:
        SlideError: no usable scale, or a non-positive override.
    """
    mpp = _positive_float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X))
    if mpp is not None:
        return mpp
    if mpp_override is not None:
        if _positive_float(mpp_override) is None:
            raise SlideError(f"slide {name}: mpp_override must be a positive number (um/px), got {mpp_override}")
        return float(mpp_override)
    power = _positive_float(slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if allow_objective_power and power is not None:
        return 10.0 / power
    raise SlideError(missing_mpp_advice(slide, name))


def pick_level(level_downsamples, wanted_downsample: float, rel_tolerance: float = 0.01) -> int:
    """Coarsest pyramid level that needs no upsampling beyond a relative tolerance.

    Args:
        level_downsamples: float per level (level-0 px per level px), e.g. (1, 2, 4.0161, 8.0863).
        wanted_downsample: level-0 px per output px.
        rel_tolerance: a level with downsample <= wanted * (1 + rel_tolerance) still qualifies.

    Returns:
        The level index.

    Raises:
        SlideError: every level is coarser than wanted (the output would be upsampled).
    """
    downsamples = np.asarray(level_downsamples, dtype=np.float64)
    fits = np.flatnonzero(downsamples <= wanted_downsample * (1 + rel_tolerance))
    if fits.size == 0:
        raise SlideError(f"wanted downsample {wanted_downsample:.4g} is finer than the finest level "
                         f"({downsamples.min():.4g}); tiling would upsample")
    return int(fits[np.argmax(downsamples[fits])])


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 RGBA (not premultiplied, as OpenSlide returns it) -> uint8 RGB over a white background.

    Scanned areas are opaque, so the cheap alpha test usually skips the arithmetic.
    """
    if rgba[..., 3].min() == 255:
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def read_rgb(slide, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
    """One region composited on white (never a bare ``convert('RGB')``, which turns empty areas black).

    Args:
        slide: an OpenSlide.
        x0, y0: top-left in level-0 px.
        level: pyramid level.
        width, height: size in px of that level.

    Returns:
        uint8 (height, width, 3) RGB.
    """
    region = slide.read_region((int(x0), int(y0)), int(level), (int(width), int(height)))
    return _composite_on_white(np.asarray(region))


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


def _resize_batch(crops: np.ndarray, size_px: int) -> np.ndarray:
    """Resize uint8 (K, s, s, 3) to (K, size_px, size_px, 3) with INTER_AREA, all patches per call.

    Used when enlarging (s < size_px, only within the level tolerance), where one resize of patches
    side by side would interpolate across their edges. Two 1-D passes over patches stacked along the
    untouched axis (in float, rounded half up once at the end) never mix patches; they may differ from a
    2-D ``cv2.resize`` of each patch by 1.
    """
    k, side = crops.shape[:2]
    flat = crops.astype(np.float32).reshape(k * side, side, 3)
    wide = cv2.resize(flat, (size_px, k * side), interpolation=cv2.INTER_AREA).reshape(k, side, size_px, 3)
    turned = np.ascontiguousarray(wide.transpose(0, 2, 1, 3)).reshape(k * size_px, side, 3)
    both = cv2.resize(turned, (size_px, k * size_px), interpolation=cv2.INTER_AREA)
    both = both.reshape(k, size_px, size_px, 3).transpose(0, 2, 1, 3)
    return np.clip(np.floor(both + 0.5), 0, 255).astype(np.uint8)


def _strips(coords: np.ndarray, downsample: float, crop_px: int, max_read_px: int) -> list[np.ndarray]:
    """Group patches into horizontal strips, one region read each, in row-major reading order.

    A strip holds patches with the same top edge whose successive gaps are at most a quarter patch
    (grid neighbours: gaps of 0 or 1 px from flooring a fractional step) and spans at most
    ``max_read_px`` level px. Returns index arrays into ``coords``, each sorted by x.
    """
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    x_level = coords[order, 0] / downsample
    y = coords[order, 1]
    gap_px = x_level[1:] - (x_level[:-1] + crop_px)
    run_start = np.concatenate([[True], (y[1:] != y[:-1]) | (gap_px > crop_px / 4)])
    run_id = np.cumsum(run_start) - 1
    run_origin = x_level[run_start][run_id]
    # Cut long runs into pieces of fixed width from the run's first patch; one level px of slack for
    # rounding keeps each read within max_read_px.
    piece = np.floor((x_level - run_origin) / (max_read_px - crop_px - 1)).astype(np.int64)
    new_strip = np.concatenate([[True], (run_id[1:] != run_id[:-1]) | (piece[1:] != piece[:-1])])
    return np.split(order, np.flatnonzero(new_strip)[1:])


def _read_strip(slide, coords: np.ndarray, downsample: float, level: int, crop_px: int,
                patch_size_px: int) -> np.ndarray:
    """Read one strip of patches (see ``_strips``) and return them shrunk: uint8 (K, p, p, 3) RGB."""
    k = len(coords)
    origin = coords[0]
    offsets = np.rint((coords[:, 0] - origin[0]) / downsample).astype(np.int64)
    width = int(offsets[-1]) + crop_px
    rgba = np.asarray(slide.read_region((int(origin[0]), int(origin[1])), level, (width, crop_px)))
    if not np.array_equal(offsets, np.arange(k) * crop_px):
        # Put the patches side by side, gaps and overlaps removed: (crop, K * crop, 4). Gathering whole
        # pixels as uint32 is several times faster than gathering 4-byte rows of uint8.
        pixels = rgba.view(np.uint32).reshape(crop_px, width)
        columns = (offsets[:, None] + np.arange(crop_px)).ravel()
        rgba = np.take(pixels, columns, axis=1).view(np.uint8).reshape(crop_px, -1, 4)
    mosaic = _composite_on_white(rgba)
    if crop_px == patch_size_px:
        small = mosaic
    elif crop_px > patch_size_px:
        # INTER_AREA maps each crop_px block of the mosaic onto exactly patch_size_px output px (the
        # scale is the same ratio), so one call equals a cv2.resize of each patch.
        small = cv2.resize(mosaic, (k * patch_size_px, patch_size_px), interpolation=cv2.INTER_AREA)
    else:
        # Enlarging interpolates across a patch edge; resize the patches apart instead.
        crops = np.ascontiguousarray(mosaic.reshape(crop_px, k, crop_px, 3).transpose(1, 0, 2, 3))
        return _resize_batch(crops, patch_size_px)
    return small.reshape(patch_size_px, k, patch_size_px, 3).transpose(1, 0, 2, 3)


def read_patches(slide, coords_level0, patch_level0_px: float, level: int, patch_size_px: int = 96,
                 max_read_px: int = 4096, read_threads: int | None = None) -> np.ndarray:
    """Read square patches through bounded strip reads and shrink them to ``patch_size_px``.

    Patches that sit side by side on a row (a grid row of ``roi_grid``) are read as one strip of at
    most ``max_read_px`` level px; strips go in row-major order, so OpenSlide's tile cache serves the
    tiles that neighbouring strips share, and only the pixels of patches (plus gaps under a quarter
    patch) are read. Each patch is ``round(patch_level0_px / downsample)`` level px, placed to the
    nearest level px from its strip's first patch, and shrunk with ``cv2.INTER_AREA``, one call per
    strip. Strips are read by ``read_threads`` threads (OpenSlide is thread-safe and releases the
    GIL, as does OpenCV). When ``patch_level0_px / patch_size_px`` equals the level's integer
    downsample and the patches lie on a grid of that step (``roi_grid``), the result equals a direct
    ``read_region`` of each patch at that level; otherwise it equals ``cv2.resize(..., INTER_AREA)``
    of each patch's own read.

    Args:
        slide: an OpenSlide.
        coords_level0: int (K, 2) level-0 (x, y) top-left corners.
        patch_level0_px: patch side in level-0 px.
        level: pyramid level to read (its downsample should be <= patch_level0_px / patch_size_px).
        patch_size_px: output side in px.
        max_read_px: largest region side, in px of ``level``, read at once.
        read_threads: threads reading strips; None for the CPUs this process may use, at most 4.

    Returns:
        uint8 (K, patch_size_px, patch_size_px, 3) RGB, in the order of ``coords_level0``.

    Raises:
        SlideError: ``max_read_px`` cannot hold one patch.
    """
    coords = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
    out = np.empty((len(coords), patch_size_px, patch_size_px, 3), np.uint8)
    if len(coords) == 0:
        return out
    downsample = float(slide.level_downsamples[level])
    crop_px = max(1, round(patch_level0_px / downsample))
    if max_read_px - crop_px - 1 < 1:
        raise SlideError(f"max_read_px {max_read_px} is too small for one patch ({crop_px} px at level {level})")
    strips = _strips(coords, downsample, crop_px, max_read_px)

    def read(strip: np.ndarray) -> None:
        out[strip] = _read_strip(slide, coords[strip], downsample, level, crop_px, patch_size_px)

    threads = min(len(strips), read_threads or min(4, _usable_cpus()))
    if threads <= 1:
        for strip in strips:
            read(strip)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, strips))
    return out


def read_thumbnail(slide, thumbnail_px: int = 1024, max_read_px: int = 4096) -> tuple[np.ndarray, float]:
    """Low-resolution RGB overview built from bounded reads (``get_thumbnail`` reads a level whole).

    The level read is shrunk by an integer factor to at most ``thumbnail_px``. Among the levels that
    need no upsampling, the one giving the largest thumbnail is read, the coarsest of equals: a slide
    whose 16x level is 944 px wide gets its 944 px thumbnail from that level, not by shrinking the 4x
    level 4-fold (16 times the pixels read for the same size).

    Args:
        slide: an OpenSlide.
        thumbnail_px: longest side, at most, in px.
        max_read_px: largest region side read at once, in px of the level read.

    Returns:
        thumbnail: uint8 (h, w, 3) RGB, composited on white.
        scale: thumbnail px per level-0 px.
    """
    longest_level0_px = max(slide.dimensions)
    finest = pick_level(slide.level_downsamples, max(1.0, longest_level0_px / thumbnail_px))
    longest_px = np.asarray(slide.level_dimensions, np.int64).max(axis=1)[finest:]
    factors = np.maximum(1, -(-longest_px // thumbnail_px))
    sides = -(-longest_px // factors)
    # Largest thumbnail first, then the coarsest level (fewest pixels read) among equals.
    level = finest + int(np.flatnonzero(sides == sides.max())[-1])
    downsample = float(slide.level_downsamples[level])
    width, height = slide.level_dimensions[level]
    # An integer shrink factor makes every region map onto whole thumbnail pixels.
    factor = int(factors[level - finest])
    thumb_w, thumb_h = math.ceil(width / factor), math.ceil(height / factor)
    tile_px = max(1, max_read_px // factor)
    thumbnail = np.empty((thumb_h, thumb_w, 3), np.uint8)
    for ty in range(0, thumb_h, tile_px):
        for tx in range(0, thumb_w, tile_px):
            w, h = min(tile_px, thumb_w - tx), min(tile_px, thumb_h - ty)
            region = read_rgb(slide, round(tx * factor * downsample), round(ty * factor * downsample),
                              level, w * factor, h * factor)
            if factor > 1:
                region = cv2.resize(region, (w, h), interpolation=cv2.INTER_AREA)
            thumbnail[ty:ty + h, tx:tx + w] = region
    return thumbnail, 1.0 / (factor * downsample)


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


def read_filtered(slide, coords: np.ndarray, grid: Grid, *, max_read_px: int = 4096,
                  quality: dict | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Read patches in batches of ``PATCH_BATCH`` and quality-filter them, so rejected pixels never pile up.

    Args:
        slide: an OpenSlide.
        coords: int (K, 2) level-0 top-left corners, in the order wanted.
        grid: the slide's ``Grid``.
        max_read_px: largest region side read at once, in px of the level read.
        quality: keyword arguments of ``filter_patches``; default ``DLBCL_QUALITY``.

    Yields:
        Per consecutive batch of ``coords``: keep bool (B,), reason str (B,) ('' where kept) and the
        kept patches uint8 (keep.sum(), p, p, 3) RGB.
    """
    quality = DLBCL_QUALITY if quality is None else quality
    for start in range(0, len(coords), PATCH_BATCH):
        patches = read_patches(slide, coords[start:start + PATCH_BATCH], grid.patch_level0_px, grid.level,
                               grid.patch_size_px, max_read_px)
        keep, reason = filter_patches(patches, **quality)
        yield keep, reason, patches[keep]


def _read_all(slide, coords: np.ndarray, grid: Grid, max_read_px: int, quality: dict | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``read_filtered`` collected: keep (K,), reason (K,), kept patches (keep.sum(), p, p, 3)."""
    batches = list(read_filtered(slide, coords, grid, max_read_px=max_read_px, quality=quality))
    p = grid.patch_size_px
    return (np.concatenate([np.zeros(0, bool), *(b[0] for b in batches)]),
            np.concatenate([np.zeros(0, "<U1"), *(b[1] for b in batches)]),
            np.concatenate([np.empty((0, p, p, 3), np.uint8), *(b[2] for b in batches)]))


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
        keep, reason, x = _read_all(slide, coords, grid, max_read_px, quality)
    except openslide.OpenSlideError as exc:
        raise SlideError(f"cannot read slide {name}: {exc}") from exc
    finally:
        slide.close()
    core = tissue.pieces(coords + grid.patch_level0_px / 2, grid.patch_level0_px)
    return TissueTiles(grid, tissue, x, coords[keep], core[keep], coords[~keep], core[~keep], reason[~keep])


# ---------------------------------------------------------------- ROIs: positives and negatives


def _roi_cells(rois: np.ndarray, roi_ids: list[str], grid: Grid) -> tuple[np.ndarray, np.ndarray, list, int]:
    """Positive cells: ``roi_grid`` of each well-formed ROI clipped to the slide.

    Returns coords int64 (K, 2), ROI index (K,), skipped ROIs [{item, reason, detail}], ROIs clipped."""
    width, height = grid.width_px, grid.height_px
    well_formed = (rois[:, 0] < rois[:, 2]) & (rois[:, 1] < rois[:, 3])
    clipped = np.stack([np.maximum(rois[:, 0], 0), np.maximum(rois[:, 1], 0),
                        np.minimum(rois[:, 2], width), np.minimum(rois[:, 3], height)], axis=1)
    inside = (clipped[:, 0] < clipped[:, 2]) & (clipped[:, 1] < clipped[:, 3])
    rois_clipped = int((well_formed & inside & np.any(clipped != rois, axis=1)).sum())
    skipped, coords, roi_index = [], [np.zeros((0, 2), np.int64)], [np.zeros(0, np.int64)]
    for index, roi in enumerate(rois):
        item = f"{grid.slide}:{roi_ids[index]}"
        if not well_formed[index]:
            skipped.append({"item": item, "reason": "roi_empty",
                            "detail": f"box {roi.tolist()} has xs >= xe or ys >= ye"})
        elif not inside[index]:
            skipped.append({"item": item, "reason": "roi_outside_slide",
                            "detail": f"box {roi.tolist()} lies outside the slide ({width} x {height} px)"})
        else:
            cells = grid.snap(roi_grid(clipped[index], grid.patch_level0_px))
            if len(cells) == 0:
                skipped.append({"item": item, "reason": "roi_smaller_than_patch",
                                "detail": f"box {roi.tolist()} holds no {grid.patch_level0_px:.1f} px patch"})
            coords.append(cells)
            roi_index.append(np.full(len(cells), index))
    return np.concatenate(coords), np.concatenate(roi_index), skipped, rois_clipped


def _outside_boxes(cells: np.ndarray, patch_level0_px: float, boxes: np.ndarray) -> np.ndarray:
    """bool (K,): the patch at each cell (K, 2) intersects none of the boxes (R, 4)."""
    start, end = cells[:, None, :], cells[:, None, :] + patch_level0_px
    touches = np.all((start < boxes[None, :, 2:]) & (end > boxes[None, :, :2]), axis=2)
    return ~touches.any(axis=1)


def _nearest_roi_per_component(distance: np.ndarray, component: np.ndarray) -> np.ndarray:
    """ROI index (K,) for each negative patch: the ROI nearest to any patch of its tissue piece.

    distance: (K, R) patch-to-ROI distances; component: (K,) tissue piece, 0 = none (then the patch's own
    nearest ROI). One group per piece keeps a core's patches in one split: with nearest-ROI-per-patch a
    core lying between two patients' ROIs was split between them and could leak across train and test."""
    per_component = np.full((int(component.max(initial=0)) + 1, distance.shape[1]), np.inf)
    np.minimum.at(per_component, component, distance)
    return np.where(component > 0, per_component[component].argmin(axis=1), distance.argmin(axis=1))


def _box_distance(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Euclidean distance (K, R) from points (K, 2) to boxes (R, 4); 0 inside a box."""
    dx = np.maximum(np.maximum(boxes[None, :, 0] - points[:, None, 0], 0), points[:, None, 0] - boxes[None, :, 2])
    dy = np.maximum(np.maximum(boxes[None, :, 1] - points[:, None, 1], 0), points[:, None, 1] - boxes[None, :, 3])
    return np.hypot(dx, dy)


def _negative_groups(tissue: TissueMap, grid: Grid, coords: np.ndarray, boxes: np.ndarray,
                     box_groups: np.ndarray) -> np.ndarray:
    """Group str (K,) of each negative: that of the ROI nearest to its tissue piece (``_nearest_roi_per_component``),
    or the slide's file name when the slide has no well-formed ROI."""
    if len(boxes) == 0:
        return np.full(len(coords), grid.slide)
    centres = coords + grid.patch_level0_px / 2
    core = tissue.pieces(centres, grid.patch_level0_px)
    return box_groups[_nearest_roi_per_component(_box_distance(centres, boxes.astype(np.float64)), core)]


NEGATIVE_MODES = ("all", "cores_without_roi", "none")


def _negative_candidates(tissue: TissueMap, grid: Grid, boxes: np.ndarray, positive_coords: np.ndarray,
                         mode: str) -> np.ndarray:
    """Negative candidate cells int64 (K, 2), row by row: tissue cells that intersect no ROI box (R, 4)
    (``all``), and only on tissue pieces holding no ROI (``cores_without_roi``), or none (``none``).

    A piece holds an ROI when the centre of one of the ROI's positive cells, or of the box, lies on it."""
    if mode not in NEGATIVE_MODES:
        raise SlideError(f"negatives must be one of {', '.join(NEGATIVE_MODES)}, got {mode!r}")
    if mode == "none":
        return np.zeros((0, 2), np.int64)
    cells = tissue_cells(tissue, grid)
    cells = cells[_outside_boxes(cells, grid.patch_level0_px, boxes)]
    if mode == "cores_without_roi" and len(boxes):
        side = grid.patch_level0_px
        points = np.concatenate([positive_coords + side / 2, (boxes[:, :2] + boxes[:, 2:]) / 2])
        with_roi = np.setdiff1d(tissue.pieces(points, side), [0])
        cells = cells[~np.isin(tissue.pieces(cells + side / 2, side), with_roi)]
    return cells


def _sample_negatives(slide, candidates: np.ndarray, n_wanted: int, grid: Grid, max_read_px: int,
                      quality: dict | None, rng: np.random.Generator) -> dict:
    """Read random candidates in rounds until ``n_wanted`` pass the quality filter (or none are left).

    Each round draws the candidates still needed divided by the pass rate seen so far, plus 10 % and 8,
    so that a round or two usually suffice and few patches are read only to be dropped.

    Returns dict of int index arrays into ``candidates``: ``kept`` (n_wanted or fewer), ``rejected`` with
    ``reason`` (str), ``dropped`` (read and passed but beyond n_wanted, or never drawn), and the kept
    patches ``x`` in the order of ``kept``; ``n_read``.
    """
    order = rng.permutation(len(candidates))
    kept, kept_x, rejected, reason, surplus = [], [], [], [], []
    n_kept = n_read = drawn = 0
    while n_kept < n_wanted and drawn < len(order):
        pass_rate = max(n_kept / n_read, 0.05) if n_read else 1.0
        n = min(len(order) - drawn, math.ceil((n_wanted - n_kept) / pass_rate * 1.1) + 8)
        batch = np.sort(order[drawn:drawn + n])
        drawn += n
        keep, why, x = _read_all(slide, candidates[batch], grid, max_read_px, quality)
        n_read += n
        take = np.flatnonzero(keep)
        extra = rng.permutation(len(take))[n_wanted - n_kept:]  # beyond the need: dropped, at random
        used = np.setdiff1d(np.arange(len(take)), extra)
        kept.append(batch[take[used]])
        kept_x.append(x[used])
        surplus.append(batch[take[extra]])
        rejected.append(batch[~keep])
        reason.append(why[~keep])
        n_kept += len(used)
    p = grid.patch_size_px
    return {"kept": np.concatenate([np.zeros(0, np.int64), *kept]),
            "x": np.concatenate([np.empty((0, p, p, 3), np.uint8), *kept_x]),
            "rejected": np.concatenate([np.zeros(0, np.int64), *rejected]),
            "reason": np.concatenate([np.zeros(0, "<U1"), *reason]),
            "dropped": np.sort(np.concatenate([np.zeros(0, np.int64), *surplus, order[drawn:]])),
            "n_read": n_read}


@dataclass
class SlideTiles:
    """What ``tile_slide`` returns for one slide.

    ``x`` uint8 (K, p, p, 3) kept patches, positives first; ``y`` uint8 (K,) 1 positive / 0 negative;
    ``group`` str (K,); ``coords`` int64 (K, 2) level-0 top-left; ``rejected_coords`` (M, 2),
    ``rejected_y`` (M,), ``rejected_reason`` str (M,) for patches the quality filter rejected;
    ``dropped_coords`` (D, 2), ``dropped_y`` (D,) for cells left out by the balance (most never read);
    ``patches_read`` patches read from the slide; ``counts`` {"positive"/"negative": {"kept": n,
    "rejected": {reason: n}} (negative also "dropped": n), "skipped": {reason: n}, "rois_clipped": n}; ``skipped``
    [{"item": "<slide>:<roi id>", "reason": code, "detail": text}] with codes roi_empty (xs >= xe or
    ys >= ye), roi_outside_slide, roi_smaller_than_patch, roi_all_patches_rejected; ``tissue`` the
    thumbnail and its tissue mask (None once dropped).
    """

    grid: Grid
    x: np.ndarray
    y: np.ndarray
    group: np.ndarray
    coords: np.ndarray
    rejected_coords: np.ndarray
    rejected_y: np.ndarray
    rejected_reason: np.ndarray
    dropped_coords: np.ndarray
    dropped_y: np.ndarray
    patches_read: int
    counts: dict
    skipped: list
    tissue: TissueMap | None

    @property
    def slide(self) -> str:
        return self.grid.slide


_SKIP_ORDER = {"roi_empty": 0, "roi_outside_slide": 1, "roi_smaller_than_patch": 2, "roi_all_patches_rejected": 3}


def tile_slide(path, rois, roi_ids: list[str], groups: list[str], *, target_mpp: float = 0.972,
               patch_size_px: int = 96, mpp_override: float | None = None,
               allow_objective_power: bool = False, scale_tolerance: float = SCALE_TOLERANCE,
               max_read_px: int = 4096, quality: dict | None = None, negatives: str = "all",
               balance: bool = False, seed: int = 0, thumbnail_px: int = 1024) -> SlideTiles:
    """Tile one slide: positives on a grid inside each ROI, negatives on tissue outside all ROIs.

    Stages: the grid (``slide_grid``); the tissue map (``read_tissue``); positive cells (``roi_grid`` of
    each ROI clipped to the slide, group = the ROI's group) and negative candidates (tissue cells that
    intersect no well-formed ROI; see ``negatives``); read and quality filter (``read_filtered``) --
    without ``balance`` positives and every candidate in one pass, so neighbours share slide tiles;
    with it the positives, then only as many random candidates as needed for one negative per kept
    positive (``_sample_negatives``), so negatives that would be thrown away are never read; negative
    groups (the group of the ROI nearest to the negative's tissue piece, or the slide's file name when
    the slide has no well-formed ROI).

    Args:
        path: slide file.
        rois: int (R, 4) (xs, ys, xe, ye) level-0 px, xe/ye exclusive.
        roi_ids: R names used in ``skipped`` (e.g. the CSV row).
        groups: R group names (patient ids).
        target_mpp: output um/px (PCam: 0.243 * 4 = 0.972).
        patch_size_px: output patch side in px.
        mpp_override: um/px for slides without ``openslide.mpp-x``.
        allow_objective_power: else fall back to 10 / objective power.
        scale_tolerance: relative upsampling a pyramid level may need and still be read (``pick_level``).
        max_read_px: largest region side read at once, in px of the level read.
        quality: thresholds for ``filter_patches``; default ``DLBCL_QUALITY`` (S > 0.07, V < 0.8).
        negatives: ``all`` tissue outside every ROI, ``cores_without_roi`` only tissue pieces (cores)
            that hold no ROI, or ``none``.
        balance: as many negatives as kept positives on this slide (fewer where the slide has fewer);
            the positives are all kept.
        seed: seeds the negative sample, together with the slide's file name.
        thumbnail_px: longest thumbnail side in px.

    Returns:
        A ``SlideTiles``.

    Raises:
        SlideError: missing or unreadable slide, no scale, or a target finer than the slide.
    """
    name = Path(path).name
    rois = np.asarray(rois, dtype=np.int64).reshape(-1, 4)
    if not len(rois) == len(roi_ids) == len(groups):
        raise SlideError(f"slide {name}: {len(rois)} ROIs, {len(roi_ids)} ids and {len(groups)} groups")
    well_formed = (rois[:, 0] < rois[:, 2]) & (rois[:, 1] < rois[:, 3])
    slide = open_slide(path)
    try:
        # ---- grid and tissue
        grid = slide_grid(slide, name, target_mpp=target_mpp, patch_size_px=patch_size_px, mpp_override=mpp_override,
                          allow_objective_power=allow_objective_power, scale_tolerance=scale_tolerance)
        tissue = read_tissue(slide, thumbnail_px, max_read_px)
        # ---- positive cells inside the ROIs, negative candidates on tissue that touches no ROI
        pos_coords, pos_roi, skipped, rois_clipped = _roi_cells(rois, roi_ids, grid)
        candidates = _negative_candidates(tissue, grid, rois[well_formed], pos_coords, negatives)
        # ---- read and filter: everything in one pass, or positives and then a sample of negatives
        n_pos = len(pos_coords)
        if balance:
            pos_keep, pos_reason, pos_x = _read_all(slide, pos_coords, grid, max_read_px, quality)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            sample = _sample_negatives(slide, candidates, int(pos_keep.sum()), grid, max_read_px, quality, rng)
        else:
            keep, reason, kept_x = _read_all(slide, np.concatenate([pos_coords, candidates]), grid, max_read_px,
                                             quality)
            pos_keep, pos_reason, pos_x = keep[:n_pos], reason[:n_pos], kept_x[:int(keep[:n_pos].sum())]
            sample = {"kept": np.flatnonzero(keep[n_pos:]), "x": kept_x[len(pos_x):],
                      "rejected": np.flatnonzero(~keep[n_pos:]), "reason": reason[n_pos:][~keep[n_pos:]],
                      "dropped": np.zeros(0, np.int64), "n_read": len(candidates)}
    except openslide.OpenSlideError as exc:
        raise SlideError(f"cannot read slide {name}: {exc}") from exc
    finally:
        slide.close()

    # Kept negatives in the slide's row order, whatever order they were drawn in.
    row_order = np.lexsort((candidates[sample["kept"], 0], candidates[sample["kept"], 1]))
    neg_coords, neg_x = candidates[sample["kept"]][row_order], sample["x"][row_order]
    rejected_neg, rejected_neg_reason = candidates[sample["rejected"]], sample["reason"]
    kept_per_roi = np.bincount(pos_roi[pos_keep], minlength=len(rois))
    tried_per_roi = np.bincount(pos_roi, minlength=len(rois))
    for index in np.flatnonzero((tried_per_roi > 0) & (kept_per_roi == 0)):
        skipped.append({"item": f"{name}:{roi_ids[index]}", "reason": "roi_all_patches_rejected",
                        "detail": f"all {tried_per_roi[index]} patches failed the quality filter"})
    group_array = np.asarray(groups, dtype=str)
    neg_groups = _negative_groups(tissue, grid, neg_coords, rois[well_formed], group_array[well_formed])
    n_pos_kept, n_neg_kept, n_dropped = int(pos_keep.sum()), len(neg_coords), len(sample["dropped"])
    counts = {
        "positive": {"kept": n_pos_kept, "rejected": dict(Counter(pos_reason[~pos_keep].tolist()))},
        "negative": {"kept": n_neg_kept, "rejected": dict(Counter(rejected_neg_reason.tolist())),
                     "dropped": n_dropped},
        "skipped": dict(Counter(s["reason"] for s in skipped)),
        "rois_clipped": rois_clipped,
    }
    return SlideTiles(
        grid=grid, x=np.concatenate([pos_x, neg_x]),
        y=np.repeat(np.array([1, 0], np.uint8), [n_pos_kept, n_neg_kept]),
        group=np.concatenate([group_array[pos_roi[pos_keep]], neg_groups]).astype(str),
        coords=np.concatenate([pos_coords[pos_keep], neg_coords]),
        rejected_coords=np.concatenate([pos_coords[~pos_keep], rejected_neg]),
        rejected_y=np.repeat(np.array([1, 0], np.uint8), [int((~pos_keep).sum()), len(rejected_neg)]),
        rejected_reason=np.concatenate([pos_reason[~pos_keep], rejected_neg_reason]).astype(str),
        dropped_coords=candidates[sample["dropped"]], dropped_y=np.zeros(n_dropped, np.uint8),
        patches_read=n_pos + sample["n_read"], counts=counts,
        skipped=sorted(skipped, key=lambda s: (_SKIP_ORDER[s["reason"]], s["item"])), tissue=tissue)


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


# ---------------------------------------------------------------- annotations.csv (DLBCL-Morph ROIs)
# Read by 02 (tiling) and 07 (whole-slide maps scored against the ROIs), so it lives here.


# annotations.csv columns by name (after lower-casing and turning spaces and hyphens into "_"), with the
# other names each may go by; any order, other columns (e.g. a pandas index) ignored.
ANNOTATION_COLUMNS = {"patient_id": ("patient_id", "pat_id"), "tma_id": ("tma_id",), "stain": ("stain",),
                      "xs": ("xs",), "ys": ("ys",), "xe": ("xe",), "ye": ("ye",)}


def _column_name(text: str) -> str:
    return re.sub(r"[\s-]+", "_", text.strip().lower())


def annotation_columns(header: list[str], path: Path) -> dict[str, int]:
    """Index of each of ``ANNOTATION_COLUMNS`` in the header row.

    Raises:
        UserError: a column is missing or given twice (one line: expected names, names found)."""
    names = [_column_name(h) for h in header]
    found, problems = {}, []
    for column, aliases in ANNOTATION_COLUMNS.items():
        where = [i for i, name in enumerate(names) if name in aliases]
        if len(where) == 1:
            found[column] = where[0]
        else:
            problems.append(f"{'no' if not where else 'more than one'} {column!r} column")
    if problems:
        expected = ", ".join(" or ".join(a) for a in ANNOTATION_COLUMNS.values())
        raise UserError(f"{path}: {'; '.join(problems)}; expected a header row with the columns {expected} "
                        f"(any order, case and spaces ignored), found: {', '.join(map(repr, header)) or 'nothing'}")
    return found


def read_annotations(path: Path, stain: str) -> tuple[dict[str, list], list[dict], Counter]:
    """ROIs of one stain grouped by tma_id, the rows skipped as malformed, and the stains seen.

    Columns are found by name in the header row (``annotation_columns``). Blank rows (a trailing empty
    line, or only commas as spreadsheets export them) are ignored.

    Returns:
        ({tma_id: [(row_number, patient_id, (xs, ys, xe, ye)), ...]}, [{item, reason}, ...],
         Counter {stain: rows} over the well-formed rows)

    Raises:
        UserError: the file is missing or its header lacks a column.
    """
    if not path.is_file():
        raise UserError(f"annotations not found: {path} (expected the DLBCL-Morph layout TMA/annotations.csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    col = annotation_columns(rows[0] if rows else [], path)
    box_columns = [col[c] for c in ("xs", "ys", "xe", "ye")]
    width = max(col.values()) + 1
    by_slide: dict[str, list] = {}
    skipped, stains = [], Counter()
    for number, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row):
            continue
        if len(row) < width or not all(_is_number(row[i]) for i in box_columns):
            skipped.append({"item": f"annotations.csv row {number}", "reason": "malformed_row",
                            "detail": f"expected {width} columns with numeric xs, ys, xe, ye, got {row!r}"})
            continue
        stains[row[col["stain"]].strip()] += 1
        if row[col["stain"]].strip() != stain:
            continue
        box = tuple(int(float(row[i])) for i in box_columns)
        by_slide.setdefault(row[col["tma_id"]].strip(), []).append((number, row[col["patient_id"]].strip(), box))
    return by_slide, skipped, stains


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
