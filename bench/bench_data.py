"""Data-path benchmarks: 01's patch filter, 02's slide tiling and 05's input pipeline vs the usual way.

- filter: ``common.filters.filter_patches`` (all patches per OpenCV call) vs the same statistics
  (Gaussian blur, HSV, saturation-weighted circular mean hue, mean S and V) computed patch by patch
  with ``cv2.GaussianBlur`` and ``cv2.cvtColor``.
- filter_full: the same with the per-pixel tests on (brown fraction, Laplacian variance), the baseline
  computing them per patch in plain numpy/OpenCV.
- tiling: ``common.slides.tile_slide`` (what 02 runs per slide: thumbnail, grid, bounded region reads,
  batched resize, 02's quality filter) vs a loop of ``read_region`` + composite on white + ``cv2.resize``
  + the same quality filter per patch over the same coordinates, on a synthetic 40x (0.25 um/px)
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

import tempfile
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import tifffile
import torch
from bench_timing import Result, Settings, compare, real_patches
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from common import data, demo, filters, models, slide_io, slides, tiling
from common.config import load_config

SLIDE_MPP = 0.25  # um/px at level 0: a 40x scan like DLBCL-Morph's; 02 reads its 4x level for 0.972
BATCH_SIZE = 64  # the thesis's batch size
ROOT = Path(__file__).resolve().parents[1]
TEXTURE = ROOT / "tests" / "data" / "he" / "tiatoolbox" / "target_image.png"


def _hsv_means_one(patch: np.ndarray, blur_sigma_px: float) -> np.ndarray:
    """The baseline's statistics of one uint8 (96, 96, 3) patch: float64 (3,) hue, saturation, value."""
    img = cv2.GaussianBlur(patch.astype(np.float32) / 255.0, (0, 0), blur_sigma_px,
                           borderType=cv2.BORDER_REFLECT_101)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).reshape(-1, 3)
    angle = np.deg2rad(hsv[:, 0])
    hue = np.mod(np.arctan2((hsv[:, 1] * np.sin(angle)).mean(), (hsv[:, 1] * np.cos(angle)).mean()) / (2 * np.pi), 1)
    return np.array([hue, hsv[:, 1].mean(), hsv[:, 2].mean()])


def _measures_one(patch: np.ndarray, blur_sigma_px: float) -> np.ndarray:
    """The baseline's filter measures of one uint8 (96, 96, 3) patch, written plainly: float64 (5,) hue,
    saturation, value (``_hsv_means_one``), brown fraction (per-pixel optical density) and the variance of
    the grey image's 4-neighbour Laplacian (``common.filters.MEASURES``)."""
    od = -np.log((patch.astype(np.float64) + 1) / 256)
    tissue = od.sum(axis=2) > filters.TISSUE_OD
    brown = tissue & (od[..., 2] > filters.BROWN_BLUE_PER_GREEN_OD * od[..., 1])
    grey = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
    laplacian = cv2.Laplacian(grey, cv2.CV_32F, ksize=1)[1:-1, 1:-1]
    return np.concatenate([_hsv_means_one(patch, blur_sigma_px),
                           [brown.sum() / max(tissue.sum(), 1), laplacian.var()]])


def _filter_vs_per_patch(settings: Settings, thresholds: dict, measure_one) -> tuple[float, float, float, np.ndarray,
                                                                                     np.ndarray, int]:
    """``filter_patches`` on real patches vs ``measure_one(patch, blur_sigma_px)`` per patch and the same
    thresholds. Returns ours and the baseline's patches/s, the share of equal keep decisions, the baseline's
    subset, its measures (the columns of ``MEASURES`` it computes) and the patches ours ran on."""
    patches = real_patches(512 if settings.quick else 4096)
    subset = patches[:64 if settings.quick else 512]

    def baseline_measures() -> np.ndarray:
        return np.stack([measure_one(p, thresholds["blur_sigma_px"]) for p in subset])

    def baseline() -> np.ndarray:
        return filters.keep_from_means(baseline_measures(), **thresholds)[0]

    ours_rate, baseline_rate = compare(lambda: filters.filter_patches(patches, **thresholds), len(patches),
                                       baseline, len(subset), settings)
    theirs = baseline_measures()
    theirs_keep = filters.keep_from_means(theirs, **thresholds)[0]
    agree = float((filters.filter_patches(subset, **thresholds)[0] == theirs_keep).mean())
    return ours_rate, baseline_rate, agree, subset, theirs, len(patches)


def bench_filter(settings: Settings) -> Result:
    """01's filter: batched ``filter_patches`` vs per-patch OpenCV, same thresholds, same patches."""
    # The baseline computes the HSV means only, so both sides run the HSV tests alone.
    thresholds = {k: v for k, v in filters.DEFAULT_THRESHOLDS.items() if k not in ("max_brown_fraction",
                                                                                    "min_laplacian_var")}
    ours_rate, baseline_rate, agree, subset, theirs, n = _filter_vs_per_patch(settings, thresholds, _hsv_means_one)
    difference = np.abs(filters.hsv_means(subset, thresholds["blur_sigma_px"]) - theirs)
    difference[:, 0] = np.minimum(difference[:, 0], 1 - difference[:, 0])  # hue is circular
    return Result(ours_rate, baseline_rate, "patches/s", 2.0,
                  note=f"{n} real H&E patches vs {len(subset)} one by one (GaussianBlur + cvtColor "
                       f"per patch); ours on {cv2.getNumThreads()} OpenCV threads; keep decisions agree on "
                       f"{agree:.1%}; max |mean H, S, V ours - baseline| = {difference.max():.1e}",
                  extra={"max_abs_diff_means": float(f"{difference.max():.3g}")})


def bench_filter_full(settings: Settings) -> Result:
    """01's whole default filter (HSV means, brown pixels, focus) batched vs the same measures per patch."""
    thresholds = filters.DEFAULT_THRESHOLDS
    ours_rate, baseline_rate, agree, subset, theirs, n = _filter_vs_per_patch(settings, thresholds, _measures_one)
    difference = np.abs(filters.patch_measures(subset, thresholds["blur_sigma_px"])[:, 3:] - theirs[:, 3:])
    return Result(ours_rate, baseline_rate, "patches/s", 2.0,
                  note=f"{n} real H&E patches vs {len(subset)} one by one (_measures_one: GaussianBlur + "
                       f"cvtColor, float64 optical density, cv2.Laplacian per patch); keep decisions agree on "
                       f"{agree:.1%}; max |brown fraction, Laplacian variance ours - baseline| = "
                       f"{difference[:, 0].max():.1e}, {difference[:, 1].max():.1e}",
                  extra={"max_abs_diff_brown": float(f"{difference[:, 0].max():.3g}"),
                         "max_abs_diff_laplacian": float(f"{difference[:, 1].max():.3g}")})


def _demo_slide(folder: Path, quick: bool) -> tuple[Path, np.ndarray, list[str], list[str]]:
    """Write one synthetic TMA slide and return its path, H&E ROIs (R, 4), ROI ids and patient ids."""
    # One slide: write it in this process (the default spawns worker processes).
    written = demo.write_demo_dlbcl(folder, n_slides=1, cores_per_slide=1 if quick else 4, seed=0,
                                    slide_mpp=SLIDE_MPP, workers=1)
    rows = np.loadtxt(written["annotations"], delimiter=",", skiprows=1, dtype=str, ndmin=2)
    rows = rows[rows[:, 2] == "HE"]
    return written["slides"][0], rows[:, 3:7].astype(np.int64), [str(i) for i in range(len(rows))], list(rows[:, 0])


def bench_tiling(settings: Settings) -> Result:
    """02's ``tile_slide`` with 02's quality rule vs the same patches read and filtered one by one.

    Like with like: the baseline is handed the coordinates ``tile_slide`` read (kept and rejected,
    positives and negatives; it computes no thumbnail or grid of its own, which ours pays for), reads
    each with one ``read_region`` at the level 02 chose, composites on white, shrinks to 96 px with
    ``cv2.resize(INTER_AREA)`` and measures it for 02's quality filter (``config.yaml``'s ``tile_dlbcl``:
    HSV means, brown pixels, focus) plainly, patch by patch (``_measures_one``); the thresholds are then
    applied to all measures at once. Its keep decisions are compared with ``tile_slide``'s. The note
    adds ``read_patches`` alone against the reading part of the baseline. Every call opens the slide
    afresh, so no side starts with a warm OpenSlide tile cache.
    """
    quality = tiling.tile_options(load_config(ROOT / "config.yaml")["tile_dlbcl"])["quality"]
    with tempfile.TemporaryDirectory() as tmp:
        path, rois, roi_ids, groups = _demo_slide(Path(tmp), settings.quick)

        def ours() -> slides.SlideTiles:
            return slides.tile_slide(path, rois, roi_ids, groups, target_mpp=0.972, patch_size_px=96, quality=quality)

        tiled = ours()
        coords = np.concatenate([tiled.coords, tiled.rejected_coords])
        expected_keep = np.arange(len(coords)) < len(tiled.coords)
        level, patch_level0_px = tiled.grid.level, tiled.grid.patch_level0_px
        n_patches = len(coords)

        def ours_read() -> np.ndarray:
            with openslide.OpenSlide(str(path)) as slide:
                return slide_io.read_patches(slide, coords, patch_level0_px, level, 96)

        def read_one_by_one(slide: openslide.OpenSlide):
            """Per patch: one read_region, composite on white, INTER_AREA resize; uint8 (96, 96, 3) each."""
            crop_px = round(patch_level0_px / slide.level_downsamples[level])
            for x, y in coords:
                rgba = np.asarray(slide.read_region((int(x), int(y)), level, (crop_px, crop_px)))
                alpha = rgba[..., 3:4].astype(np.uint16)
                rgb = ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
                yield cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA)

        def baseline_read() -> np.ndarray:
            with openslide.OpenSlide(str(path)) as slide:
                return np.stack(list(read_one_by_one(slide)))

        def baseline() -> np.ndarray:
            """keep bool (K,): each patch measured as it is read, the thresholds applied at the end."""
            with openslide.OpenSlide(str(path)) as slide:
                measures = np.stack([_measures_one(p, quality["blur_sigma_px"]) for p in read_one_by_one(slide)])
            return filters.keep_from_means(measures, **quality)[0]

        agree = float((baseline() == expected_keep).mean())
        difference = int(np.abs(ours_read().astype(np.int16) - baseline_read().astype(np.int16)).max())
        ours_rate, baseline_rate = compare(ours, n_patches, baseline, n_patches, settings)
        read_rate, read_baseline_rate = compare(ours_read, n_patches, baseline_read, n_patches, settings)
        dims = tiled.grid.width_px, tiled.grid.height_px
    read_ratio = read_rate / read_baseline_rate
    return Result(ours_rate, baseline_rate, "patches/s", 2.0,
                  note=f"tile_slide end to end (thumbnail, grid, {n_patches} patches of {len(rois)} ROIs + negatives, "
                       f"02's quality filter with the IHC and focus tests; level {level}, {patch_level0_px:.0f} "
                       f"level-0 px -> 96 px, slide {dims[0]} x {dims[1]}) vs per-patch read_region + composite + "
                       f"INTER_AREA resize + the same filter's measures computed plainly on each patch, over the same "
                       f"{n_patches} patches; "
                       f"keep decisions agree on {agree:.1%}; read_patches alone {read_rate:.0f} vs "
                       f"{read_baseline_rate:.0f} patches/s (x{read_ratio:.2f}); max |read_patches - baseline| = "
                       f"{difference} levels",
                  extra={"read_patches_only": round(read_rate, 1), "read_patches_ratio": round(read_ratio, 3),
                         "keep_agreement": agree, "max_abs_diff_levels": difference})


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
