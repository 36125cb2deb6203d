"""Data-path benchmarks: 01's patch filter, 02's slide tiling and 05's input pipeline vs the usual way.

- filter: ``common.filters.filter_patches`` (all patches per OpenCV call) vs the same statistics
  (Gaussian blur, HSV, saturation-weighted circular mean hue, mean S and V) computed patch by patch
  with ``cv2.GaussianBlur`` and ``cv2.cvtColor``.
- tiling: ``common.slides.tile_slide`` (what 02 runs per slide: thumbnail, grid, bounded region reads,
  batched resize, quality filter) vs a loop of ``read_region`` + composite on white + ``cv2.resize``
  per patch over the same coordinates (reading only, no filter), on a synthetic 40x (0.25 um/px)
  pyramidal TIFF from ``common.demo``; both open the slide afresh per call.
- input_pipeline: 05's batches (uint8 array in memory, sorted index per batch, ``to_input``,
  ``augment`` flips + 90-degree turns) vs torchvision ``ImageFolder`` over JPEG files + PIL transforms
  (flips, ``ToTensor``, ``Normalize``) + ``DataLoader(num_workers=2, persistent_workers=True)``.
- patch_reads: ``common.data.read_patches`` (one ``read_direct`` per run of consecutive rows) vs h5py
  fancy indexing ``x[sorted_rows]`` on the same scattered 2 % of a patch-set file (as 04 samples
  negatives and 06 its colour baseline from PCam train).

Inputs: ``bench_timing.Settings``. Outputs: ``bench_timing.Result`` in patches/s or images/s.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import tifffile
import torch
from bench_timing import Result, Settings, compare, items_per_second, real_patches
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from common import data, demo, filters, models, slide_io, slides

SLIDE_MPP = 0.25  # um/px at level 0: a 40x scan like DLBCL-Morph's; 02 reads its 4x level for 0.972
BATCH_SIZE = 64  # the thesis's batch size
TEXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "he" / "tiatoolbox" / "target_image.png"


def _hsv_means_one(patch: np.ndarray, blur_sigma_px: float) -> np.ndarray:
    """The baseline's statistics of one uint8 (96, 96, 3) patch: float64 (3,) hue, saturation, value."""
    img = cv2.GaussianBlur(patch.astype(np.float32) / 255.0, (0, 0), blur_sigma_px,
                           borderType=cv2.BORDER_REFLECT_101)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).reshape(-1, 3)
    angle = np.deg2rad(hsv[:, 0])
    hue = np.mod(np.arctan2((hsv[:, 1] * np.sin(angle)).mean(), (hsv[:, 1] * np.cos(angle)).mean()) / (2 * np.pi), 1)
    return np.array([hue, hsv[:, 1].mean(), hsv[:, 2].mean()])


def bench_filter(settings: Settings) -> Result:
    """01's filter: batched ``filter_patches`` vs per-patch OpenCV, same thresholds, same patches."""
    # The baseline computes the HSV means only, so both sides run the HSV tests alone.
    thresholds = {k: v for k, v in filters.DEFAULT_THRESHOLDS.items() if k not in ("max_brown_fraction",
                                                                                    "min_laplacian_var")}
    patches = real_patches(512 if settings.quick else 4096)
    subset = patches[:64 if settings.quick else 512]

    def baseline_means() -> np.ndarray:
        return np.stack([_hsv_means_one(p, thresholds["blur_sigma_px"]) for p in subset])

    def baseline() -> np.ndarray:
        return filters.keep_from_means(baseline_means(), **thresholds)[0]

    ours_rate, baseline_rate = compare(lambda: filters.filter_patches(patches, **thresholds), len(patches),
                                       baseline, len(subset), settings)
    agree = float((filters.filter_patches(subset, **thresholds)[0] == baseline()).mean())
    difference = np.abs(filters.hsv_means(subset, thresholds["blur_sigma_px"]) - baseline_means())
    difference[:, 0] = np.minimum(difference[:, 0], 1 - difference[:, 0])  # hue is circular
    return Result(ours_rate, baseline_rate, "patches/s", 2.0,
                  note=f"{len(patches)} real H&E patches vs {len(subset)} one by one (GaussianBlur + cvtColor "
                       f"per patch); ours on {cv2.getNumThreads()} OpenCV threads; keep decisions agree on "
                       f"{agree:.1%}; max |mean H, S, V ours - baseline| = {difference.max():.1e}",
                  extra={"max_abs_diff_means": float(f"{difference.max():.3g}")})


def _demo_slide(folder: Path, quick: bool) -> tuple[Path, np.ndarray, list[str], list[str]]:
    """Write one synthetic TMA slide and return its path, H&E ROIs (R, 4), ROI ids and patient ids."""
    # One slide: write it in this process (the default spawns worker processes).
    written = demo.write_demo_dlbcl(folder, n_slides=1, cores_per_slide=1 if quick else 4, seed=0,
                                    slide_mpp=SLIDE_MPP, workers=1)
    rows = np.loadtxt(written["annotations"], delimiter=",", skiprows=1, dtype=str, ndmin=2)
    rows = rows[rows[:, 2] == "HE"]
    return written["slides"][0], rows[:, 3:7].astype(np.int64), [str(i) for i in range(len(rows))], list(rows[:, 0])


def bench_tiling(settings: Settings) -> Result:
    """02's ``tile_slide`` (and its ``read_patches`` alone) vs per-patch ``read_region`` over the same patches.

    Like with like: the baseline reads every patch ``tile_slide`` reads (kept and rejected, positives
    and negatives), one ``read_region`` each at the level 02 chose, composites on white and shrinks to
    96 px with ``cv2.resize(INTER_AREA)``; it must return the very pixels ``read_patches`` returns.
    Every call opens the slide afresh, so no side starts with a warm OpenSlide tile cache.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path, rois, roi_ids, groups = _demo_slide(Path(tmp), settings.quick)
        tiled = slides.tile_slide(path, rois, roi_ids, groups, target_mpp=0.972, patch_size_px=96)
        coords = np.concatenate([tiled.coords, tiled.rejected_coords])
        level, patch_level0_px = tiled.grid.level, tiled.grid.patch_level0_px
        n_patches = len(coords)

        def ours() -> slides.SlideTiles:
            return slides.tile_slide(path, rois, roi_ids, groups, target_mpp=0.972, patch_size_px=96)

        def ours_read(read_threads: int | None = None) -> np.ndarray:
            with openslide.OpenSlide(str(path)) as slide:
                return slide_io.read_patches(slide, coords, patch_level0_px, level, 96, read_threads=read_threads)

        def baseline() -> np.ndarray:
            with openslide.OpenSlide(str(path)) as slide:
                crop_px = round(patch_level0_px / slide.level_downsamples[level])
                out = np.empty((n_patches, 96, 96, 3), np.uint8)
                for i, (x, y) in enumerate(coords):
                    rgba = np.asarray(slide.read_region((int(x), int(y)), level, (crop_px, crop_px)))
                    alpha = rgba[..., 3:4].astype(np.uint16)
                    rgb = ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
                    out[i] = cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA)
                return out

        difference = int(np.abs(ours_read().astype(np.int16) - baseline().astype(np.int16)).max())
        ours_rate, baseline_rate = compare(ours, n_patches, baseline, n_patches, settings)
        read_rate, read_baseline_rate = compare(ours_read, n_patches, baseline, n_patches, settings)
        one_thread_rate = items_per_second(lambda: ours_read(1), n_patches, settings.seconds)
        with openslide.OpenSlide(str(path)) as slide:
            dims = slide.dimensions
    threads = min(4, len(os.sched_getaffinity(0)))
    read_ratio = read_rate / read_baseline_rate
    return Result(ours_rate, baseline_rate, "patches/s", 2.0,
                  note=f"tile_slide end to end (thumbnail, {n_patches} patches of {len(rois)} ROIs + negatives, "
                       f"quality filter; level {level}, {patch_level0_px:.0f} level-0 px -> 96 px, slide {dims[0]} x "
                       f"{dims[1]}) vs per-patch read_region + composite + INTER_AREA resize of the same "
                       f"{n_patches} patches; read_patches alone {read_rate:.0f} vs {read_baseline_rate:.0f} "
                       f"patches/s (x{read_ratio:.2f}), {one_thread_rate:.0f} with 1 read thread ({threads} "
                       f"by default); max |read_patches - baseline| = {difference} levels",
                  extra={"read_patches_only": round(read_rate, 1), "read_patches_ratio": round(read_ratio, 3),
                         "read_patches_1_thread": round(one_thread_rate, 1), "read_threads": threads,
                         "max_abs_diff_levels": difference})


def _write_tma_pyramid(path: Path, width: int, height: int, core_px: int, pitch_px: int) -> np.ndarray:
    """A TMA-like tiled pyramidal TIFF (downsamples 1, 4, 16; zlib; 0.25 um/px): round cores of real H&E
    texture (the tiled ``target_image.png``) on white glass, written tile by tile (never whole in memory).

    Returns the core centres int (C, 2) in level-0 px."""
    texture = cv2.cvtColor(cv2.imread(str(TEXTURE)), cv2.COLOR_BGR2RGB)
    cols, rows = (width - pitch_px // 2) // pitch_px, (height - pitch_px // 2) // pitch_px
    centres = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1).reshape(-1, 2) * pitch_px + pitch_px // 2
    tile_px = 512

    def tiles(factor: int):
        small = cv2.resize(texture, (texture.shape[1] // factor, texture.shape[0] // factor),
                           interpolation=cv2.INTER_AREA) if factor > 1 else texture
        w, h = width // factor, height // factor
        for ty in range(0, h, tile_px):
            for tx in range(0, w, tile_px):
                yy, xx = np.mgrid[ty:ty + tile_px, tx:tx + tile_px] * factor
                # Distance to the nearest core centre of the regular grid.
                cx = np.clip(np.rint((xx - pitch_px // 2) / pitch_px), 0, cols - 1) * pitch_px + pitch_px // 2
                cy = np.clip(np.rint((yy - pitch_px // 2) / pitch_px), 0, rows - 1) * pitch_px + pitch_px // 2
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 < (core_px / 2) ** 2
                tile = np.full((tile_px, tile_px, 3), 242, np.uint8)
                if inside.any():
                    pattern = small[(np.arange(ty, ty + tile_px) % small.shape[0])[:, None],
                                    np.arange(tx, tx + tile_px) % small.shape[1]]
                    tile[inside] = pattern[inside]
                yield tile

    resolution = (1e4 / SLIDE_MPP, 1e4 / SLIDE_MPP)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, factor in enumerate((1, 4, 16)):
            tif.write(tiles(factor), shape=(height // factor, width // factor, 3), dtype=np.uint8,
                      tile=(tile_px, tile_px), compression="zlib", compressionargs={"level": 1}, photometric="rgb",
                      resolution=resolution, resolutionunit="CENTIMETER", subfiletype=1 if index else 0)
    return centres


def bench_tiling_full_slide(settings: Settings) -> Result:
    """02's tiler on a 40k x 30k px pyramidal TMA slide at 0.25 um/px vs today's level-0 path.

    Ours: ``tile_slide`` as 02 now runs it (``scale_tolerance`` 0.05: the 4x level is read and 93 px
    enlarged to 96; ``balance``: one negative drawn per kept positive before reading). Baseline: the same
    function as 02 ran it before (tolerance 0.01: level 0 read and 373 px shrunk to 96; every negative
    candidate read, 02 then discarding most of them to balance). Slide opened afresh per call.
    """
    width, height = (12_000, 9_000) if settings.quick else (40_000, 30_000)
    core_px, pitch_px = 4_000, 5_000  # 1.0 mm cores on a 1.25 mm pitch, as on a TMA
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tma.tiff"
        centres = _write_tma_pyramid(path, width, height, core_px, pitch_px)
        # One 1500 px (0.375 mm) ROI in every other core: 4 x 4 patches each.
        rois = np.concatenate([centres[::2] - 750, centres[::2] + 750], axis=1)
        ids, groups = [str(i) for i in range(len(rois))], [f"p{i}" for i in range(len(rois))]

        def ours() -> slides.SlideTiles:
            return slides.tile_slide(path, rois, ids, groups, balance=True)

        def baseline() -> slides.SlideTiles:
            return slides.tile_slide(path, rois, ids, groups, scale_tolerance=0.01, balance=False)

        new, old = ours(), baseline()
        ours_rate, baseline_rate = compare(ours, 1, baseline, 1, settings)
    n_written_old = 2 * min((old.y == 1).sum(), (old.y == 0).sum())
    return Result(ours_rate * 3600, baseline_rate * 3600, "slides/h", 5.0,
                  note=f"{width} x {height} px at {SLIDE_MPP} um/px, {len(rois)} ROIs; ours level {new.grid.level} "
                       f"({new.grid.level_mpp:.2f} um/px), {new.patches_read} patches read for {len(new.y)} kept; "
                       f"baseline level {old.grid.level}, {old.patches_read} read for {n_written_old} kept after "
                       "balance",
                  extra={"ours_level": new.grid.level, "baseline_level": old.grid.level,
                         "ours_patches_read": new.patches_read, "ours_patches_kept": len(new.y),
                         "baseline_patches_read": old.patches_read, "baseline_patches_kept": int(n_written_old)})


def _write_image_folder(folder: Path, patches: np.ndarray, labels: np.ndarray) -> None:
    """ImageFolder layout: <folder>/<label>/<index>.jpg, JPEG quality 95 (what many PCam loaders ship)."""
    for label in np.unique(labels):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (patch, label) in enumerate(zip(patches, labels, strict=True)):
        Image.fromarray(patch).save(folder / str(label) / f"{i:06d}.jpg", quality=95)


def bench_input_pipeline(settings: Settings) -> Result:
    """05's in-memory uint8 batches + on-device augmentation vs ImageFolder + PIL + DataLoader(2 workers)."""
    patches = real_patches(1024 if settings.quick else 4096)
    labels = np.arange(len(patches)) % 2
    mean, std = data.mean_std(patches)
    generator = torch.Generator().manual_seed(0)
    labels_t = torch.from_numpy(labels)
    mean_t, std_t = torch.as_tensor(mean), torch.as_tensor(std)

    def ours() -> float:
        # 05's train_one_epoch minus the model: sorted index per batch, to_input, augment.
        order = torch.randperm(len(patches), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            idx = np.sort(order[start:start + BATCH_SIZE])
            batch = data.augment(torch.from_numpy(patches[idx]), generator, True, True)
            inputs = models.to_input(batch, mean_t, std_t, False)
            total += float(inputs[0, 0, 0, 0]) + float(labels_t[idx][0])
        return total

    with tempfile.TemporaryDirectory() as tmp:
        _write_image_folder(Path(tmp), patches, labels)
        dataset = datasets.ImageFolder(tmp, transform=transforms.Compose([
            transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(), transforms.ToTensor(),
            transforms.Normalize(mean.tolist(), std.tolist())]))
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=2, persistent_workers=True)

        def baseline() -> float:
            total = 0.0
            for inputs, targets in loader:
                total += float(inputs[0, 0, 0, 0]) + float(targets[0])
            return total

        ours_rate, baseline_rate = compare(ours, len(patches), baseline, len(patches), settings)
    return Result(ours_rate, baseline_rate, "images/s", 3.0,
                  note=f"one epoch of {len(patches)} real H&E patches, batch {BATCH_SIZE}, CPU; baseline decodes "
                       f"JPEG (q 95) files each epoch with 2 worker processes and does flips only (no 90-degree "
                       f"turns), ours holds the set in memory as 05 does")


def bench_patch_reads(settings: Settings) -> Result:
    """Scattered rows of an HDF5 patch set: read_patches vs h5py fancy indexing, same rows."""
    n_rows = 2048 if settings.quick else 16384
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n_rows, n_rows // 50, replace=False))  # 2 %, like 5,000 of PCam's 262k
    with tempfile.TemporaryDirectory() as tmp:
        with h5py.File(Path(tmp) / "set.h5", "w") as f:  # the patch-set layout: 64-patch chunks
            f.create_dataset("x", data=np.resize(real_patches(512), (n_rows, 96, 96, 3)), chunks=(64, 96, 96, 3))
        names = np.full(len(rows), "set")

        def ours() -> np.ndarray:
            return data.read_patches(Path(tmp), names, rows)

        def baseline() -> np.ndarray:
            with h5py.File(Path(tmp) / "set.h5", "r") as f:
                return f["x"][rows]

        if not np.array_equal(ours(), baseline()):
            raise AssertionError("read_patches differs from h5py indexing")
        ours_rate, baseline_rate = compare(ours, len(rows), baseline, len(rows), settings)
    return Result(ours_rate, baseline_rate, "patches/s", None,
                  note=f"{len(rows)} sorted scattered rows (2 %) of a {n_rows}-patch set with 64-patch chunks; "
                       f"identical output")
