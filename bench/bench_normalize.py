"""Stain normalisation benchmarks: ``common.stain`` batched vs the reference libraries per patch.

Baselines (bench-only dependencies): torchstain 1.4.1 numpy ``MacenkoNormalizer`` and staintools 2.1.2
``StainNormalizer("vahadane")`` / ``ReinhardColorNormalizer``, each called once per patch, which is
how they are used. Both sides fit the same reference (tiatoolbox's target image) and transform the same
real H&E 96 x 96 patches; the baseline is timed on a subset. Each row also records how far the outputs
differ (mean absolute difference in 8-bit levels), so that a speed-up is never bought with a different
result unnoticed.

Inputs: ``bench_timing.Settings``. Outputs: ``bench_timing.Result`` in patches/s.
"""

from __future__ import annotations

import numpy as np
import staintools
import torch
from bench_timing import Result, Settings, compare, real_patches, stain_target
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

from common.stain import make_normalizer


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _transform_as_03_does(normalizer, patches: np.ndarray) -> np.ndarray:
    """Ours as 03 runs it: torch single-threaded, chunks side by side on the benchmark's thread count."""
    workers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return normalizer.transform(patches, workers=workers)
    finally:
        torch.set_num_threads(workers)


def _run(method: str, baseline_one, n_ours: int, n_baseline: int, settings: Settings, goal: float | None,
         baseline_name: str) -> Result:
    """Time ``make_normalizer(method)`` on ``n_ours`` patches against ``baseline_one(patch)`` in a loop."""
    patches = real_patches(n_ours)
    subset = patches[:n_baseline]
    ours = make_normalizer(method).fit(stain_target())

    def baseline() -> list[np.ndarray]:
        return [baseline_one(patch) for patch in subset]

    ours_rate, baseline_rate = compare(lambda: _transform_as_03_does(ours, patches), len(patches), baseline,
                                       len(subset), settings)
    difference = _mean_abs_diff(_transform_as_03_does(ours, subset), np.stack(baseline()))
    return Result(ours_rate, baseline_rate, "patches/s", goal,
                  note=f"{len(patches)} real H&E patches in one call vs {baseline_name} on {len(subset)} one "
                       f"by one; mean |ours - baseline| = {difference:.2f} levels; {ours.n_unchanged} "
                       f"of ours left unchanged",
                  extra={"mean_abs_diff_levels": round(difference, 3)})


def bench_macenko(settings: Settings) -> Result:
    """Macenko: ours batched vs torchstain 1.4.1 numpy per patch. Goal >= 8x."""
    reference = NumpyMacenkoNormalizer()
    reference.fit(stain_target())

    def one(patch: np.ndarray) -> np.ndarray:
        return reference.normalize(I=patch, stains=False)[0]

    n_ours, n_baseline = (256, 32) if settings.quick else (2048, 256)
    return _run("macenko", one, n_ours, n_baseline, settings, 8.0, "torchstain 1.4.1 numpy")


def bench_vahadane(settings: Settings) -> Result:
    """Vahadane: ours batched vs staintools 2.1.2 (SPAMS dictionary learning) per patch."""
    reference = staintools.StainNormalizer(method="vahadane")
    reference.fit(stain_target())
    n_ours, n_baseline = (64, 4) if settings.quick else (512, 24)
    return _run("vahadane", reference.transform, n_ours, n_baseline, settings, None, "staintools 2.1.2")


def bench_reinhard(settings: Settings) -> Result:
    """Reinhard: ours batched vs staintools 2.1.2 ``ReinhardColorNormalizer`` per patch."""
    reference = staintools.ReinhardColorNormalizer()
    reference.fit(stain_target())
    n_ours, n_baseline = (256, 32) if settings.quick else (2048, 256)
    return _run("reinhard", reference.transform, n_ours, n_baseline, settings, None, "staintools 2.1.2")
