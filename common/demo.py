"""Deterministic synthetic demo data in the real on-disk formats of PatchCamelyon and DLBCL-Morph.

`make demo` runs the whole pipeline on a fresh machine without the real datasets, so this module writes
a small dataset that the very same code reads as if it were real:

- PCam (`write_demo_pcam`): `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5` (or whole-file
  gzipped `.h5.gz`) with `x` uint8 (N, 96, 96, 3) RGB and `y` uint8 (N, 1, 1, 1), the official
  `..._meta.csv` files (`,coord_y,coord_x,tumor_patch,center_tumor_patch,wsi`), and `demo_junk.csv`
  (`split,index,kind`) listing the deliberately bad patches (blank glass, brown IHC, blurred): the
  known-junk CSV that 01's grid search scores against (`filter_pcam.junk_csv`), as a user's own would be.
- DLBCL-Morph (`write_demo_dlbcl`): `TMA/annotations.csv` (`patient_id,tma_id,stain,xs,ys,xe,ye`, ROI
  boxes in level-0 pixels) and `TMA/HE/<tma_id>.svs`: pyramidal tiled TIFFs (downsamples 1, 4, 16,
  zlib tiles, resolution tags) that OpenSlide opens as `generic-tiff` with `openslide.mpp-x` set.
  Each slide is a tissue microarray of round cores; lymphoma is rendered inside the ROI boxes and
  normal lymph node elsewhere. A few rows of another stain (CD10) are there to be ignored.

Rendering (``common.demo_render``): tissue as hematoxylin and eosin optical-density maps, turned into RGB
by the Beer-Lambert law; the classes differ in morphology, not colour.

Everything is deterministic from the seed (numpy `default_rng`, one stream per split and per slide).

Usage:
    python -m common.demo [--config configs/demo.yaml]       # writes demo.out_dir/{pcam,dlbcl}
    write_demo(Path("data/demo"), seed=0, pcam_per_split={"train": 1200, "valid": 300, "test": 300},
               dlbcl_slides=4, dlbcl_cores_per_slide=6)
"""

from __future__ import annotations

import csv
import gzip
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import tifffile

from common.demo_render import (
    CHUNK_PX,
    CORE_RADIUS_UM,
    DLBCL_STAINS,
    PATCH_PX,
    PCAM_MARGIN_PX,
    PCAM_STAINS,
    RENDER_MPP,
    jitter_stains,
    render_cores,
    render_pcam_chunk,
    roi_boxes,
)
from common.errors import UserError
from common.schema import SPLITS

# ---------------------------------------------------------------------------------------------------
# Scales and formats
# ---------------------------------------------------------------------------------------------------
PCAM_PREFIX = "camelyonpatch_level_2_split_"
PCAM_META_HEADER = ["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"]
DLBCL_HEADER = ["patient_id", "tma_id", "stain", "xs", "ys", "xe", "ye"]
SLIDE_DOWNSAMPLES = (1, 4, 16)
SLIDE_TILE_PX = 256
JUNK_KINDS = ("blank", "ihc", "blur")




class DemoError(UserError):
    """A bad argument to the demo writer (printed as one line, exit 2)."""


# ---------------------------------------------------------------------------------------------------
# Cell kinds
# ---------------------------------------------------------------------------------------------------




# ---------------------------------------------------------------------------------------------------
# Random fields and nucleus placement
# ---------------------------------------------------------------------------------------------------












# ---------------------------------------------------------------------------------------------------
# PatchCamelyon
# ---------------------------------------------------------------------------------------------------




def _check_pcam_args(n_per_split: dict, junk_fraction: float) -> None:
    if set(n_per_split) != set(SPLITS):
        raise DemoError(f"demo pcam_per_split must name exactly {', '.join(SPLITS)}; got {sorted(n_per_split)}")
    for split, n in n_per_split.items():
        if not isinstance(n, int | np.integer) or n < 2:
            raise DemoError(f"demo pcam_per_split.{split} = {n!r}: need an integer >= 2 (both labels)")
    if not 0 <= junk_fraction <= 0.5:
        raise DemoError(f"demo junk_fraction = {junk_fraction!r}: need a number in [0, 0.5]")


def _write_h5(path: Path, key: str, data: np.ndarray, gzip_file: bool) -> Path:
    """Write one official-layout HDF5 file (uncompressed dataset), whole-file gzipped if asked."""
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset(key, data=data)
    if not gzip_file:
        os.replace(tmp, path)
        return path
    gz_path = path.with_name(path.name + ".gz")
    gz_tmp = gz_path.with_name(gz_path.name + ".tmp")
    # mtime=0 and no stored name: the same data gives the same bytes.
    with open(tmp, "rb") as src, open(gz_tmp, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    tmp.unlink()
    os.replace(gz_tmp, gz_path)
    return gz_path


def write_demo_pcam(pcam_dir: Path, n_per_split: dict[str, int], seed: int, junk_fraction: float = 0.06,
                    gzip_files: bool = False) -> dict:
    """Write a synthetic PatchCamelyon in the official file layout.

    Labels are ~50/50; a positive has carcinoma in its centre 32 x 32 px (the PCam rule), and a few
    negatives have carcinoma only outside it (`tumor_patch` True, `center_tumor_patch` False). Patches
    come from several fake slides (`wsi`) per split, no slide in two splits, each slide with its own
    stain jitter. `junk_fraction` of every split, spread over both labels, is junk: blank glass, brown
    IHC-like tissue or blurred tissue; their indices go to `demo_junk.csv` (`split,index,kind`).

    Args:
        pcam_dir: output folder (created).
        n_per_split: patches per split, keys exactly train, valid, test, each >= 2.
        seed: the one seed; each split has its own stream, so a split's content does not depend on the
            sizes of the others.
        junk_fraction: fraction of each split that is junk, in [0, 0.5].
        gzip_files: write `.h5.gz` (whole file gzipped, as distributed) instead of `.h5`.

    Returns:
        dict: `files` (paths written), `junk_csv` (path), `counts` {split: {n, positive, junk}}.

    Raises:
        DemoError: bad sizes or junk fraction.
    """
    _check_pcam_args(n_per_split, junk_fraction)
    pcam_dir = Path(pcam_dir)
    pcam_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    junk_rows_csv: list[tuple[str, int, str]] = []
    counts: dict[str, dict[str, int]] = {}
    next_slide = {"normal": 1, "tumor": 1, "test": 1}
    for split_no, split in enumerate(SPLITS):
        n = int(n_per_split[split])
        rng = np.random.default_rng([seed, 101, split_no])
        labels = np.zeros(n, np.uint8)
        labels[rng.permutation(n)[: n // 2]] = 1

        # Fake slides: tumour slides give positives and negatives, normal slides negatives only.
        n_slides = int(np.clip(round(n / 40), 2, 40))
        n_tumour_slides = max(1, n_slides // 2)
        kinds = ["tumor"] * n_tumour_slides + ["normal"] * (n_slides - n_tumour_slides)
        names = []
        for kind in kinds:
            key = "test" if split == "test" else kind
            prefix = "camelyon16_test" if split == "test" else f"camelyon16_train_{kind}"
            names.append(f"{prefix}_{next_slide[key]:03d}")
            next_slide[key] += 1
        # Half the negatives come from tumour slides, so that no slide's colour stands for a label;
        # slides differ less in colour than patches do (stain amounts vary most from patch to patch).
        from_tumour_slide = (labels == 1) | (rng.random(n) < 0.5)
        slide = np.where(from_tumour_slide, rng.integers(0, n_tumour_slides, n),
                         rng.integers(n_tumour_slides, max(n_slides, n_tumour_slides + 1), n)) % n_slides
        slide_stains = jitter_stains(rng, PCAM_STAINS, n_slides, 0.015)
        slide_io = rng.uniform(242, 247, n_slides)
        slide_od = rng.uniform([0.49, 0.28], [0.55, 0.32], (n_slides, 2))
        target_od = slide_od[slide] * rng.lognormal(0, 0.2, (n, 2))
        periphery = (labels == 0) & (rng.random(n) < 0.04)

        n_junk = int(round(junk_fraction * n))
        junk = np.zeros(n, np.int64)
        junk_rows = rng.permutation(n)[:n_junk]
        junk[junk_rows] = np.arange(n_junk) % 3 + 1
        junk_rows_csv += [(split, int(i), JUNK_KINDS[junk[i] - 1]) for i in np.flatnonzero(junk)]

        x = np.empty((n, PATCH_PX, PATCH_PX, 3), np.uint8)
        tumour_any = np.zeros(n, bool)
        tumour_centre = np.zeros(n, bool)
        chunk = max(1, CHUNK_PX // (PATCH_PX + 2 * PCAM_MARGIN_PX) ** 2)
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            x[part], tumour_any[part], tumour_centre[part] = render_pcam_chunk(
                rng, labels[part], periphery[part], slide_stains[slide[part]], slide_io[slide[part]],
                target_od[part], junk[part])
        # Blank glass keeps its planned label (junk spans both labels); the CSV flags follow y.
        blank = junk == 1
        tumour_centre[blank] = labels[blank] == 1
        tumour_any |= tumour_centre
        if not np.array_equal(tumour_centre, labels == 1):
            raise RuntimeError("demo PCam: rendered tumour masks disagree with the planned labels")

        stem = pcam_dir / f"{PCAM_PREFIX}{split}"
        files.append(_write_h5(stem.with_name(stem.name + "_x.h5"), "x", x, gzip_files))
        files.append(_write_h5(stem.with_name(stem.name + "_y.h5"), "y", labels.reshape(n, 1, 1, 1), gzip_files))
        coords = rng.integers(0, 3000, (n, 2)) * 32  # level-0 px on the fake slide, like PCam's
        meta_path = stem.with_name(stem.name + "_meta.csv")
        with open(meta_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(PCAM_META_HEADER)
            writer.writerows(zip(range(n), coords[:, 0].tolist(), coords[:, 1].tolist(),
                                 map(str, tumour_any.tolist()), map(str, tumour_centre.tolist()),
                                 (names[s] for s in slide), strict=True))
        files.append(meta_path)
        counts[split] = {"n": n, "positive": int(labels.sum()), "junk": n_junk}
    junk_csv = pcam_dir / "demo_junk.csv"
    with open(junk_csv, "w", newline="") as f:
        csv.writer(f).writerows([("split", "index", "kind"), *junk_rows_csv])
    return {"files": files, "junk_csv": junk_csv, "counts": counts}


# ---------------------------------------------------------------------------------------------------
# DLBCL-Morph
# ---------------------------------------------------------------------------------------------------




def _write_pyramid(path: Path, level0: np.ndarray, slide_mpp: float) -> None:
    """Write a tiled pyramidal TIFF (downsamples 1, 4, 16; zlib tiles; resolution tags in px/cm)."""
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp) as tif:
        for i, down in enumerate(SLIDE_DOWNSAMPLES):
            level = level0 if down == 1 else cv2.resize(
                level0, (level0.shape[1] // down, level0.shape[0] // down), interpolation=cv2.INTER_AREA)
            px_per_cm = 1e4 / (slide_mpp * down)
            tif.write(level, photometric="rgb", tile=(SLIDE_TILE_PX, SLIDE_TILE_PX), compression="zlib",
                      compressionargs={"level": 1}, resolution=(px_per_cm, px_per_cm),
                      resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1, maxworkers=2)
    os.replace(tmp, path)


def _check_slide(path: Path, slide_mpp: float) -> None:
    """Fail loudly if OpenSlide does not read the slide as a pyramid with the written mpp."""
    with openslide.OpenSlide(path) as slide:
        mpp = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
        if slide.level_count < 2 or not abs(mpp - slide_mpp) <= 1e-3:
            raise RuntimeError(f"demo slide {path}: OpenSlide sees {slide.level_count} levels, mpp {mpp}")


@dataclass(frozen=True)
class _SlideJob:
    """Everything one worker needs to write one TMA slide."""

    path: Path
    seed: int
    slide_no: int
    patients: tuple[int, ...]  # patient id of each core
    slide_mpp: float
    width_px: int
    height_px: int
    n_cols: int
    pitch_px: int
    margin_px: int


def _write_slide(job: _SlideJob) -> list[list]:
    """Render, write and check one TMA slide; return its annotation rows (H&E boxes, then 2 CD10 rows)."""
    rng = np.random.default_rng([job.seed, 203, job.slide_no])
    tma_id = job.path.stem
    n_cores = len(job.patients)
    scale = RENDER_MPP / job.slide_mpp  # level-0 px per render px
    stains = jitter_stains(rng, DLBCL_STAINS, 1, 0.04)[0]
    io = rng.uniform(236, 246)
    radii = rng.uniform(*CORE_RADIUS_UM, n_cores) / RENDER_MPP
    n_boxes = rng.choice([0, 1, 1, 2], n_cores)
    n_boxes[0] = max(1, n_boxes[0])  # every slide has lymphoma
    boxes = [roi_boxes(rng, r, int(b)) for r, b in zip(radii, n_boxes, strict=True)]
    level0 = np.full((job.height_px, job.width_px, 3), int(np.clip(np.rint(io), 0, 255)), np.uint8)
    side = int(np.ceil(2 * radii.max() + 8))
    side_level0 = round(side * scale)
    centre = (side - 1) / 2
    rows = []
    cores_per_chunk = max(1, CHUNK_PX // side ** 2)
    for start in range(0, n_cores, cores_per_chunk):
        part = slice(start, min(n_cores, start + cores_per_chunk))
        rgb = render_cores(rng, radii[part], boxes[part], side, stains, io)
        for j, core_rgb in enumerate(rgb, start=start):
            row, col = divmod(j, job.n_cols)
            top = job.margin_px + row * job.pitch_px + int(rng.integers(0, job.pitch_px - side_level0 + 1))
            left = job.margin_px + col * job.pitch_px + int(rng.integers(0, job.pitch_px - side_level0 + 1))
            level0[top:top + side_level0, left:left + side_level0] = cv2.resize(
                core_rgb, (side_level0, side_level0), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
            # Render px -> level-0 px, rounded inwards so that a box stays inside the lymphoma.
            first = np.ceil((boxes[j][:, :2] + centre + 0.5) * scale).astype(int) + (left, top)
            last = np.floor((boxes[j][:, 2:] + centre + 0.5) * scale).astype(int) + (left, top)
            rows.extend([job.patients[j], tma_id, "HE", *a.tolist(), *b.tolist()]
                        for a, b in zip(first, last, strict=True))
    # Another stain's boxes for the same TMA: no CD10 slide exists, the reader must filter by stain.
    rows.extend([r[0], tma_id, "CD10", r[3] + 40, r[4] + 40, r[5] + 40, r[6] + 40] for r in rows[:2])
    _write_pyramid(job.path, level0, job.slide_mpp)
    _check_slide(job.path, job.slide_mpp)
    return rows


def write_demo_dlbcl(dlbcl_dir: Path, n_slides: int, cores_per_slide: int, seed: int, slide_mpp: float = 0.5,
                     n_patients: int | None = None, workers: int | None = None) -> dict:
    """Write a synthetic DLBCL-Morph: H&E TMA slides and `annotations.csv`.

    Each slide holds `cores_per_slide` round cores (diameter 0.85-1.05 mm) on glass in a grid. Each
    core belongs to one patient (patients may have several cores, on any slide) and has 0, 1 or 2 ROI
    boxes (the first core of a slide always has one); lymphoma is rendered inside the boxes and normal
    lymph node elsewhere. Tissue is drawn at 0.972 um/px and resized to `slide_mpp`. Each slide's H&E
    rows are followed by two rows of another stain (CD10) for the same TMA id; no CD10 slide is
    written, so a reader must filter by the stain column.

    Args:
        dlbcl_dir: output folder; writes `TMA/annotations.csv` and `TMA/HE/<tma_id>.svs`.
        n_slides: number of H&E slides (>= 1), named TA101, TA102, ...
        cores_per_slide: cores per slide (>= 1).
        seed: the one seed; each slide has its own stream (results do not depend on `workers`).
        slide_mpp: level-0 resolution in um/px (written to the TIFF resolution tags).
        n_patients: distinct patients (<= number of cores); default three quarters of the cores.
        workers: processes writing slides in parallel; default min(n_slides, CPU count). They are
            spawned, so a calling script needs the usual `if __name__ == "__main__":` guard.

    Returns:
        dict: `annotations` (path), `slides` (paths), `n_cores`, `n_patients`, `n_roi` (H&E boxes).

    Raises:
        DemoError: bad counts or mpp.
    """
    n_cores = n_slides * cores_per_slide
    if n_slides < 1 or cores_per_slide < 1:
        raise DemoError(f"demo dlbcl: need >= 1 slide and >= 1 core per slide, got {n_slides} x {cores_per_slide}")
    if not 0.05 <= slide_mpp <= 5:
        raise DemoError(f"demo dlbcl slide_mpp = {slide_mpp!r}: need um/px in [0.05, 5]")
    n_patients = max(1, (3 * n_cores) // 4) if n_patients is None else n_patients
    if not 1 <= n_patients <= n_cores:
        raise DemoError(f"demo dlbcl n_patients = {n_patients}: need 1..{n_cores} (one core at least each)")
    dlbcl_dir = Path(dlbcl_dir)
    he_dir = dlbcl_dir / "TMA" / "HE"
    he_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng([seed, 202])
    patient_ids = rng.choice(np.arange(10000, 100000), n_patients, replace=False)
    core_patient = np.concatenate([np.arange(n_patients), rng.integers(0, n_patients, n_cores - n_patients)])
    core_patient = patient_ids[rng.permutation(core_patient)].reshape(n_slides, cores_per_slide)

    # Layout: a grid of square canvases (the largest core plus a rim) 0.1 mm apart, 0.15 mm margin,
    # slide sides multiples of 16 so that the pyramid's downsamples are exact.
    canvas_level0 = round(int(np.ceil(2 * CORE_RADIUS_UM[1] / RENDER_MPP + 8)) * RENDER_MPP / slide_mpp)
    pitch = canvas_level0 + int(0.1e3 / slide_mpp)
    n_cols = int(np.ceil(np.sqrt(cores_per_slide * 1.5)))
    n_rows = int(np.ceil(cores_per_slide / n_cols))
    margin = int(0.15e3 / slide_mpp)
    step = SLIDE_DOWNSAMPLES[-1]
    width = -(-(2 * margin + n_cols * pitch) // step) * step
    height = -(-(2 * margin + n_rows * pitch) // step) * step
    jobs = [_SlideJob(he_dir / f"TA{101 + i}.svs", seed, i, tuple(int(p) for p in core_patient[i]), slide_mpp,
                      width, height, n_cols, pitch, margin) for i in range(n_slides)]
    workers = min(n_slides, os.cpu_count() or 1) if workers is None else max(1, workers)
    if workers == 1:
        slide_rows = [_write_slide(job) for job in jobs]
    else:
        # Spawned processes: safe with OpenCV's and tifffile's threads, unlike fork.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            slide_rows = list(pool.map(_write_slide, jobs))
    rows = [row for part in slide_rows for row in part]

    annotations = dlbcl_dir / "TMA" / "annotations.csv"
    with open(annotations, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DLBCL_HEADER)
        writer.writerows(rows)
    return {"annotations": annotations, "slides": [job.path for job in jobs], "n_cores": n_cores,
            "n_patients": n_patients, "n_roi": sum(r[2] == "HE" for r in rows)}


def write_demo(out_dir: Path, seed: int, pcam_per_split: dict[str, int], dlbcl_slides: int,
               dlbcl_cores_per_slide: int) -> dict:
    """Write the whole demo: PCam into `out_dir/pcam`, DLBCL-Morph into `out_dir/dlbcl`.

    Returns:
        dict: {"pcam": write_demo_pcam's result, "dlbcl": write_demo_dlbcl's result}.
    """
    out_dir = Path(out_dir)
    return {"pcam": write_demo_pcam(out_dir / "pcam", pcam_per_split, seed),
            "dlbcl": write_demo_dlbcl(out_dir / "dlbcl", dlbcl_slides, dlbcl_cores_per_slide, seed)}


def main(argv: list[str] | None = None) -> int:
    """`python -m common.demo [--config FILE] [--set key=value]...`: write the demo into demo.out_dir."""
    from common.cli import parse
    from common.config import load_config

    args = parse(argv, __doc__)
    cfg = load_config(args.config, args.overrides)
    demo = cfg["demo"]
    out_dir = Path(demo["out_dir"])
    print(f"== demo data | seed {cfg['run']['seed']} | output {out_dir}")
    result = write_demo(out_dir, cfg["run"]["seed"], demo["pcam_per_split"], demo["dlbcl_slides"],
                        demo["dlbcl_cores_per_slide"])
    for split, count in result["pcam"]["counts"].items():
        print(f"   pcam {split}: {count['n']} patches, {count['positive']} positive, {count['junk']} junk")
    dlbcl = result["dlbcl"]
    print(f"   dlbcl: {len(dlbcl['slides'])} slides, {dlbcl['n_cores']} cores, {dlbcl['n_patients']} patients, "
          f"{dlbcl['n_roi']} H&E ROI boxes")
    return 0


if __name__ == "__main__":
    from common.cli import run

    sys.exit(run(main))
