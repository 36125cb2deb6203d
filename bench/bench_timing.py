"""Shared benchmark harness: fair side-by-side timing and real H&E test patches.

Fairness rules every benchmark follows: ours and the baseline get the same input, run in the same
process with the same thread count, are warmed up before timing, and are timed in alternating rounds
(ours, baseline, ours, baseline, ...) so that load from other processes on a shared machine hits both
alike; the reported rate is the median over rounds. Per-item baselines may be timed on a subset and are
reported in items/s, like ours.

Inputs: callables to time; the real H&E images in ``tests/data/he``.
Outputs: ``Result`` rows (ours, baseline, unit, ratio, goal, note) and uint8 (N, 96, 96, 3) RGB patches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

REAL_DIR = Path(__file__).resolve().parents[1] / "tests" / "data"
PATCH_PX = 96
# Tissue test for choosing crops: torchstain's Macenko rule (every channel's OD >= 0.15 at Io = 240)
# must hold for this share of pixels, so that no per-patch baseline fails on a near-empty crop.
MIN_TISSUE_FRACTION = 0.5


@dataclass
class Settings:
    """How long and how often to time: ``seconds`` per timed call group, ``rounds`` alternations."""

    seconds: float
    rounds: int
    quick: bool


@dataclass
class Result:
    """One benchmark row: rates of ours and the baseline in ``unit``; ratio = ours / baseline."""

    ours: float
    baseline: float
    unit: str
    goal: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline > 0 else float("nan")

    def as_json(self) -> dict:
        row = {"ours": round(self.ours, 2), "baseline": round(self.baseline, 2), "unit": self.unit,
               "ratio": round(self.ratio, 3)}
        if self.goal is not None:
            row["goal"] = self.goal
            row["goal_met"] = bool(self.ratio >= self.goal)
        if self.note:
            row["note"] = self.note
        return {**row, **self.extra}


def items_per_second(fn: Callable[[], object], items_per_call: int, seconds: float) -> float:
    """Call ``fn`` until ``seconds`` have passed (at least once) and return items processed per second."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return items_per_call * calls / elapsed


def compare(ours: Callable[[], object], ours_items: int, baseline: Callable[[], object], baseline_items: int,
            settings: Settings) -> tuple[float, float]:
    """Median items/s of ours and of the baseline over alternating rounds, after one warm-up call each.

    Args:
        ours, baseline: zero-argument callables doing one unit of work each.
        ours_items, baseline_items: items (patches, images) one call processes.
        settings: seconds per timing and number of rounds.

    Returns:
        (ours items/s, baseline items/s).
    """
    ours()
    baseline()
    ours_rates, baseline_rates = [], []
    for _ in range(settings.rounds):
        ours_rates.append(items_per_second(ours, ours_items, settings.seconds))
        baseline_rates.append(items_per_second(baseline, baseline_items, settings.seconds))
    return statistics.median(ours_rates), statistics.median(baseline_rates)


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file; the alpha channel of RGBA PNGs is dropped."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FileNotFoundError(f"cannot read test image {path} (tests/data is part of the repository)")
    return np.ascontiguousarray(cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB))


def tissue_fraction(patches: np.ndarray) -> np.ndarray:
    """float64 (N,): share of pixels with OD >= 0.15 in every channel (Io = 240, torchstain's rule)."""
    # Smallest channel value = smallest-OD channel; OD >= 0.15 <=> I + 1 <= 240 * exp(-0.15).
    darkest_allowed = 240.0 * np.exp(-0.15) - 1.0
    return (patches.max(axis=3) <= darkest_allowed).mean(axis=(1, 2))


def real_patches(n: int, seed: int = 0) -> np.ndarray:
    """Real H&E tissue patches: 96 x 96 crops of ``tests/data/he/**/*.png`` with tissue.

    Crops lie on a non-overlapping grid; those with less than ``MIN_TISSUE_FRACTION`` tissue are dropped.
    The distinct crops (a few hundred) are repeated under random dihedral transforms up to ``n``.

    Args:
        n: number of patches wanted.
        seed: seed of the order and the transforms.

    Returns:
        uint8 (n, 96, 96, 3) RGB.
    """
    crops = []
    for path in sorted((REAL_DIR / "he").rglob("*.png")):
        image = read_rgb(path)
        rows, cols = image.shape[0] // PATCH_PX, image.shape[1] // PATCH_PX
        grid = image[:rows * PATCH_PX, :cols * PATCH_PX].reshape(rows, PATCH_PX, cols, PATCH_PX, 3)
        crops.append(grid.transpose(0, 2, 1, 3, 4).reshape(-1, PATCH_PX, PATCH_PX, 3))
    pool = np.concatenate(crops)
    pool = pool[tissue_fraction(pool) >= MIN_TISSUE_FRACTION]
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(pool), n)
    turns = rng.integers(0, 8, n)
    out = pool[pick]
    # Eight groups of dihedral views, not a loop over patches.
    for view in range(1, 8):
        sel = turns == view
        rotated = np.rot90(out[sel], view % 4, axes=(1, 2))
        out[sel] = rotated[:, :, ::-1] if view >= 4 else rotated
    return np.ascontiguousarray(out)


def stain_target() -> np.ndarray:
    """uint8 (1000, 1000, 3) RGB: tiatoolbox's stain-normalisation target, the reference of every stain bench."""
    return read_rgb(REAL_DIR / "he" / "tiatoolbox" / "target_image.png")
