"""ROI-labelled tiling of one DLBCL-Morph TMA slide (02): lymphoma inside the ROIs, negatives outside.

Inputs: a slide path, ROI boxes ``int (R, 4)`` as (xs, ys, xe, ye) in level-0 pixels (xe, ye
exclusive), one id and one group (patient id) per ROI.
Outputs (``tile_slide``, a ``SlideTiles``): positives -- patches on a grid inside each ROI, label 1;
negatives -- grid cells over tissue that touch no ROI, label 0; both quality-filtered; per-label
counts, skipped ROIs with reasons, and the thumbnail for ``common.overview.save_overview``.

The grid, scale, tissue test and batched reads are ``common.tiling``'s, the same for whole-slide maps;
this module adds what the ROIs decide: positive cells, negative candidates (``negatives``: all tissue
outside the ROIs, only cores without an ROI, or none), a balanced sample of negatives read only as far
as needed, and the negatives' groups (the patient of the nearest ROI on their tissue piece).

Usage:
    result = tile_slide("TMA/HE/131.svs", rois, roi_ids, groups, **tiling.tile_options(cfg["tile_dlbcl"]))
    overview.save_overview("overview/131.png", result, rois)  # common.overview
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide

from common.slide_io import SlideError, open_slide
from common.tiling import SCALE_TOLERANCE, Grid, TissueMap, read_all, read_tissue, roi_grid, slide_grid, tissue_cells

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
    patches ``x`` and their ``mean_value`` in the order of ``kept``; ``n_read`` and ``n_read_unused`` (read
    and passed but beyond n_wanted), so that n_read = len(kept) + len(rejected) + n_read_unused.
    """
    order = rng.permutation(len(candidates))
    kept, kept_x, kept_value, rejected, reason, surplus = [], [], [], [], [], []
    n_kept = n_read = drawn = 0
    while n_kept < n_wanted and drawn < len(order):
        pass_rate = max(n_kept / n_read, 0.05) if n_read else 1.0
        n = min(len(order) - drawn, math.ceil((n_wanted - n_kept) / pass_rate * 1.1) + 8)
        batch = np.sort(order[drawn:drawn + n])
        drawn += n
        keep, why, x, value = read_all(slide, candidates[batch], grid, max_read_px, quality)
        n_read += n
        take = np.flatnonzero(keep)
        extra = rng.permutation(len(take))[n_wanted - n_kept:]  # beyond the need: dropped, at random
        used = np.setdiff1d(np.arange(len(take)), extra)
        kept.append(batch[take[used]])
        kept_x.append(x[used])
        kept_value.append(value[used])
        surplus.append(batch[take[extra]])
        rejected.append(batch[~keep])
        reason.append(why[~keep])
        n_kept += len(used)
    p = grid.patch_size_px
    return {"kept": np.concatenate([np.zeros(0, np.int64), *kept]),
            "x": np.concatenate([np.empty((0, p, p, 3), np.uint8), *kept_x]),
            "mean_value": np.concatenate([np.zeros(0, np.float32), *kept_value]),
            "rejected": np.concatenate([np.zeros(0, np.int64), *rejected]),
            "reason": np.concatenate([np.zeros(0, "<U1"), *reason]),
            "dropped": np.sort(np.concatenate([np.zeros(0, np.int64), *surplus, order[drawn:]])),
            "n_read": n_read, "n_read_unused": sum(map(len, surplus))}


@dataclass
class SlideTiles:
    """What ``tile_slide`` returns for one slide.

    ``x`` uint8 (K, p, p, 3) kept patches, positives first; ``y`` uint8 (K,) 1 positive / 0 negative;
    ``group`` str (K,); ``coords`` int64 (K, 2) level-0 top-left; ``mean_value`` float32 (K,) the quality
    filter's mean HSV value (brightness) of each kept patch; ``rejected_coords`` (M, 2),
    ``rejected_y`` (M,), ``rejected_reason`` str (M,) for patches the quality filter rejected;
    ``dropped_coords`` (D, 2), ``dropped_y`` (D,) for cells left out by the balance (most never read);
    ``patches_read`` patches read from the slide; ``counts`` {"positive"/"negative": {"kept": n,
    "rejected": {reason: n}} (negative also "dropped": n cells left out by the balance, and "read_unused": n of
    them read and passed, beyond the one negative per positive), "skipped": {reason: n}, "rois_clipped": n}, so
    that patches_read = the kept, rejected and read_unused counts summed; ``skipped``
    [{"item": "<slide>:<roi id>", "reason": code, "detail": text}] with codes roi_empty (xs >= xe or
    ys >= ye), roi_outside_slide, roi_smaller_than_patch, roi_all_patches_rejected; ``tissue`` the
    thumbnail and its tissue mask (None once dropped).
    """

    grid: Grid
    x: np.ndarray
    y: np.ndarray
    group: np.ndarray
    coords: np.ndarray
    mean_value: np.ndarray
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
            pos_keep, pos_reason, pos_x, pos_value = read_all(slide, pos_coords, grid, max_read_px, quality)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            sample = _sample_negatives(slide, candidates, int(pos_keep.sum()), grid, max_read_px, quality, rng)
        else:
            keep, reason, kept_x, kept_value = read_all(slide, np.concatenate([pos_coords, candidates]), grid,
                                                        max_read_px, quality)
            n_pos_kept = int(keep[:n_pos].sum())
            pos_keep, pos_reason = keep[:n_pos], reason[:n_pos]
            pos_x, pos_value = kept_x[:n_pos_kept], kept_value[:n_pos_kept]
            sample = {"kept": np.flatnonzero(keep[n_pos:]), "x": kept_x[n_pos_kept:],
                      "mean_value": kept_value[n_pos_kept:],
                      "rejected": np.flatnonzero(~keep[n_pos:]), "reason": reason[n_pos:][~keep[n_pos:]],
                      "dropped": np.zeros(0, np.int64), "n_read": len(candidates), "n_read_unused": 0}
    except openslide.OpenSlideError as exc:
        raise SlideError(f"cannot read slide {name}: {exc}") from exc
    finally:
        slide.close()

    # Kept negatives in the slide's row order, whatever order they were drawn in.
    row_order = np.lexsort((candidates[sample["kept"], 0], candidates[sample["kept"], 1]))
    neg_coords, neg_x = candidates[sample["kept"]][row_order], sample["x"][row_order]
    neg_value = sample["mean_value"][row_order]
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
                     "dropped": n_dropped, "read_unused": sample["n_read_unused"]},
        "skipped": dict(Counter(s["reason"] for s in skipped)),
        "rois_clipped": rois_clipped,
    }
    return SlideTiles(
        grid=grid, x=np.concatenate([pos_x, neg_x]),
        y=np.repeat(np.array([1, 0], np.uint8), [n_pos_kept, n_neg_kept]),
        group=np.concatenate([group_array[pos_roi[pos_keep]], neg_groups]).astype(str),
        coords=np.concatenate([pos_coords[pos_keep], neg_coords]), mean_value=np.concatenate([pos_value, neg_value]),
        rejected_coords=np.concatenate([pos_coords[~pos_keep], rejected_neg]),
        rejected_y=np.repeat(np.array([1, 0], np.uint8), [int((~pos_keep).sum()), len(rejected_neg)]),
        rejected_reason=np.concatenate([pos_reason[~pos_keep], rejected_neg_reason]).astype(str),
        dropped_coords=candidates[sample["dropped"]], dropped_y=np.zeros(n_dropped, np.uint8),
        patches_read=n_pos + sample["n_read"], counts=counts,
        skipped=sorted(skipped, key=lambda s: (_SKIP_ORDER[s["reason"]], s["item"])), tissue=tissue)
