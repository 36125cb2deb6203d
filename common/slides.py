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
``common.overview.save_overview``.

The stages are public for other users of 02's grid (e.g. whole-slide prediction maps): ``slide_grid``
(scale, level, patch side), ``read_tissue`` / ``tissue_cells`` (thumbnail tissue test, cells of the
slide-wide grid, ``TissueMap.pieces`` for the connected tissue piece -- a TMA core -- under a point),
``read_filtered`` (batched read + quality filter) and ``tile_tissue`` (all tissue of a slide, no ROIs);
``tile_options`` turns the ``tile_dlbcl`` config section into their keyword arguments.

Usage:
    result = tile_slide("TMA/HE/131.svs", rois, roi_ids, groups, target_mpp=0.972)
    overview.save_overview("overview/131.png", result, rois)  # common.overview
    whole = tile_tissue("TMA/HE/131.svs", **tile_options(cfg["tile_dlbcl"]))  # whole.x, .coords, .core
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from common.filters import DLBCL_QUALITY, filter_patches, thresholds_from_config
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
