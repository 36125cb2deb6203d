"""Choosing quality-filter thresholds (01's ``filter_pcam.grid_search``): sweep each threshold alone
(``SWEEPS``, ``with_value``), score candidate thresholds on a sample (``grid_search``), and find the
patches just either side of one threshold for contact sheets (``margin``, ``borderline``).

All work on precomputed measures (``common.filters.patch_measures``), so sweeping many candidates
costs one pass over the pixels.

Usage:
    measures = filters.patch_measures(x, blur_sigma_px=1.0)
    rows = grid_search(measures, [DEFAULT_THRESHOLDS, THESIS_PRESET], labels=y, is_junk=junk)
"""

from __future__ import annotations

import numpy as np

from common.filters import FilterError, keep_from_means

# One-threshold-at-a-time sweeps: (config key, end of the range or None, MEASURES column, steps). An
# additive step for measures on 0..1, a factor for the Laplacian variance (it spans decades).
SWEEPS = (("saturation_range", 0, 1, (-0.04, -0.02, 0.02, 0.04)),
          ("saturation_range", 1, 1, (-0.04, -0.02, 0.02, 0.04)),
          ("value_range", 0, 2, (-0.1, -0.05, 0.05, 0.1)),
          ("value_range", 1, 2, (-0.1, -0.05, 0.05, 0.1)),
          ("hue_range", 0, 0, (-0.04, -0.02, 0.02, 0.04)),
          ("hue_range", 1, 0, (-0.02, -0.01, 0.01, 0.02)),
          ("max_brown_fraction", None, 3, (-0.2, -0.1, 0.1, 0.2)),
          ("min_laplacian_var", None, 4, (0.25, 0.5, 2.0, 4.0)))


def knob_name(key: str, end: int | None) -> str:
    """A threshold's name in file names and tables: the config key, or e.g. ``saturation_lo`` for one end."""
    if end is None:
        return key
    return key.replace("_range", "") + ("_lo" if end == 0 else "_hi")


def margin(measures: np.ndarray, key: str, end: int | None, column: int, value: float) -> np.ndarray:
    """Signed distance of each patch from one threshold, positive on the kept side (hue: circular)."""
    m = measures[:, column].astype(np.float64)
    if key == "hue_range":
        d = m - value if end == 0 else value - m
        return np.mod(d + 0.5, 1.0) - 0.5
    return m - value if (end == 0 or key.startswith("min_")) else value - m


def with_value(thresholds: dict, key: str, end: int | None, value) -> dict:
    """A copy of ``thresholds`` with one threshold (``key``, or one ``end`` of its range) set to ``value``;
    None switches it off (both ends of the circular hue range together)."""
    out = dict(thresholds)
    if end is None:
        out[key] = value
    elif key == "hue_range" and value is None:
        out[key] = None  # a circular range needs both ends
    else:
        bounds = list(thresholds[key])
        bounds[end] = value
        out[key] = tuple(bounds)
    return out


def borderline(distance: np.ndarray, eligible: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches just inside and just outside one threshold, for choosing it by eye.

    Args:
        distance: float (N,), signed distance of each patch's measure from the threshold (``margin``),
            positive on the kept side (e.g. saturation - floor, or ceiling - brown fraction).
        eligible: bool (N,), the patches that pass every other test (so this threshold alone decides).
        k: patches per side.

    Returns:
        inside: int (<= k,) indices of eligible kept patches, nearest to the threshold first;
        outside: int (<= k,) indices of eligible rejected patches, nearest first.
    """
    index = np.flatnonzero(eligible)
    inside, outside = index[distance[index] >= 0], index[distance[index] < 0]
    return (inside[np.argsort(distance[inside], kind="stable")[:k]],
            outside[np.argsort(-distance[outside], kind="stable")[:k]])


def grid_search(measures: np.ndarray, candidates: list[dict], labels: np.ndarray | None = None,
                is_junk: np.ndarray | None = None) -> list[dict]:
    """Score threshold candidates on precomputed measures of a sample (see ``patch_measures``).

    Args:
        measures: float (N, 5) with the columns ``MEASURES`` (or (N, 3) if no candidate uses the
            per-pixel tests), computed at the candidates' blur sigma.
        candidates: thresholds dicts as accepted by ``filter_patches`` (blur_sigma_px is ignored here).
        labels: (N,) any hashable label per patch (e.g. class) for kept fractions, or None.
        is_junk: bool (N,) True for patches known to be junk (glass, IHC, blur), or None.

    Returns:
        One dict per candidate, in order: ``thresholds`` (the candidate), ``kept_fraction`` (overall),
        ``kept_fraction_by_label`` ({label: fraction}, present when labels is given) and, when is_junk
        is given, ``precision``, ``recall`` and ``f1`` of rejection (positive class = junk; NaN when
        undefined).
    """
    n = len(measures)
    if is_junk is not None and len(is_junk) != n:
        raise FilterError(f"is_junk has {len(is_junk)} entries for {n} patches")
    if labels is not None and len(labels) != n:
        raise FilterError(f"labels has {len(labels)} entries for {n} patches")
    results = []
    for candidate in candidates:
        keep, _ = keep_from_means(measures, **candidate)
        row = {"thresholds": candidate, "kept_fraction": float(keep.mean()) if n else float("nan")}
        if labels is not None:
            label_array = np.asarray(labels)
            row["kept_fraction_by_label"] = {
                label.item() if hasattr(label, "item") else label: float(keep[label_array == label].mean())
                for label in np.unique(label_array)
            }
        if is_junk is not None:
            junk = np.asarray(is_junk, bool)
            rejected = ~keep
            hits = int((rejected & junk).sum())
            precision = hits / rejected.sum() if rejected.any() else float("nan")
            recall = hits / junk.sum() if junk.any() else float("nan")
            row["precision"], row["recall"] = float(precision), float(recall)
            row["f1"] = float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else float("nan")
        results.append(row)
    return results
