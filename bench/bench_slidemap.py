"""Whole-slide maps (07's ``gradcam.slides``): ``slidemap.map_slide`` vs a plain per-patch loop.

Ours: ``map_slide`` end to end on a synthetic 4-core TMA slide (``common.demo``, 0.25 um/px level 0, read
at the level 02 picks for 0.972 um/px): thumbnail, tissue grid, strip reads, quality filter,
Reinhard (the demo's method) on each batch, a 3-class ResNet-18 (random weights; the speed does not
depend on them) in batches of 256, channels-last as 05 trains.
Baseline, the usual first script: for every patch ``map_slide`` classified, one ``read_region`` at the
same place and level, composite on white, ``cv2.resize(INTER_AREA)`` to 96 px, the same normaliser on
that one patch, and the model on a batch of one (fp32, contiguous, ``inference_mode``). Both open the
slide afresh on every call. The probabilities of the two must agree (the row records the largest
difference).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import openslide
import torch
from bench_data import _demo_slide
from bench_timing import REAL_DIR, Result, Settings, compare

from common import models, slidemap, stain, tiling

MEAN, STD = (0.70, 0.55, 0.70), (0.15, 0.20, 0.15)


def bench_slide_map(settings: Settings) -> Result:
    torch.manual_seed(0)
    model = models.build_model("resnet18", 3, "none").eval()
    target = cv2.cvtColor(cv2.imread(str(REAL_DIR / "he" / "tiatoolbox" / "target_image.png")), cv2.COLOR_BGR2RGB)
    normalizer = stain.make_normalizer("reinhard").fit(target)
    device = torch.device("cpu")
    predict = slidemap.make_predict(model, MEAN, STD, device, channels_last=True)
    with tempfile.TemporaryDirectory() as tmp:
        path, _, _, _ = _demo_slide(Path(tmp), settings.quick)

        def ours() -> slidemap.SlideMap:
            return slidemap.map_slide(path, predict, normalizer, progress=False)[0]

        smap = ours()
        coords, n_patches = smap.coords, len(smap.coords)
        mean_t = torch.as_tensor(MEAN, dtype=torch.float32)
        std_t = torch.as_tensor(STD, dtype=torch.float32)
        with openslide.OpenSlide(str(path)) as slide:
            level = tiling.slide_grid(slide, path.name).level  # the level 02 and map_slide read
            crop_px = round(smap.size_px / slide.level_downsamples[level])
            dims = slide.dimensions

        def baseline() -> np.ndarray:
            out = np.empty((n_patches, 3), np.float32)
            with openslide.OpenSlide(str(path)) as slide, torch.inference_mode():
                for i, (x, y) in enumerate(coords):
                    rgba = np.asarray(slide.read_region((int(x), int(y)), level, (crop_px, crop_px)))
                    alpha = rgba[..., 3:4].astype(np.uint16)
                    rgb = ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
                    patch = normalizer.transform(cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA)[None])
                    inputs = models.to_input(torch.from_numpy(patch), mean_t, std_t, False)
                    out[i] = torch.softmax(model(inputs), dim=1)[0].numpy()
            return out

        difference = float(np.abs(baseline() - smap.probs).max())
        ours_rate, baseline_rate = compare(ours, n_patches, baseline, n_patches, settings)
    return Result(ours_rate, baseline_rate, "patches/s", 3.0,
                  note=f"map_slide end to end ({n_patches} tissue patches of {len(np.unique(smap.core))} cores, "
                       f"slide {dims[0]} x {dims[1]}, level {level}, {crop_px} px -> 96 px, Reinhard, ResNet-18 "
                       f"batches of 256, channels-last) vs per patch read_region + composite + resize + "
                       f"normalise + ResNet-18 on one patch; max |p_ours - p_baseline| = {difference:.1e}",
                  extra={"n_patches": n_patches, "max_abs_prob_diff": difference})
