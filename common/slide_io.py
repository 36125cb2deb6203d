"""Reading pixels from OpenSlide: opening a slide, its scale (mpp), the pyramid level to read, regions,
batches of patches and thumbnails, every read bounded by ``max_read_px`` per side and composited on white.

Patches are read as strips of grid neighbours (their own pixels only, not the glass between them), in
row order so that OpenSlide's tile cache serves shared tiles, on a few threads. Transparent pixels
(outside the scanned area) are composited on white, never turned black by a bare ``convert('RGB')``.
``common.tiling`` builds the slide-wide patch grid on these reads, ``common.slides`` 02's ROI tiling.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import openslide

from common.errors import UserError


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
