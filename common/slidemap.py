"""Whole-slide maps: a trained patch classifier run over all tissue of a slide (07, ``gradcam.slides``).

A pathologist's question after training is "run it on my slide and show me where it sees cancer, and
which kind". This module answers it with the pipeline's own parts, so a map sees exactly what the
model saw in training: 02's tiler and tissue/quality rules (``common.tiling``, ``common.filters``) at
the experiment's scale, 03's fitted stain normaliser (``common.stain``), 05's model input and device
switches (``common.engine``). Patches are read, filtered, normalised and classified in batches of
``batch_patches`` through bounded strip reads (``slide_io.read_patches``), so memory stays bounded on a
100k x 100k slide: only coordinates and probabilities are kept for the whole slide.

Inputs: a slide file (any OpenSlide format), a ``predict`` function (uint8 patches -> class
probabilities), a fitted ``stain.Normalizer``; optionally ROI boxes ``int (R, 4)`` (xs, ys, xe, ye)
level-0 px with one patient id each (DLBCL-Morph ``annotations.csv``).
Outputs (``write_slide_map``, one folder per slide):
    patches.csv      x, y (level-0 top-left), size_px (level-0 side), core, p_<class>..., roi
    cores.csv        core, x0, y0, x1, y1 (level-0 box), n_patches, p_<class> means, call, patient
    heatmap.png      thumbnail with the predicted class coloured by its probability, ROIs, core calls
    patches.geojson  one Polygon per patch in level-0 px, QuPath's "tile" objects (File > Import objects)
    slide_cam.png    optional: Grad-CAM of the predicted class stitched over the tissue

Usage:
    smap = map_slide("TMA/HE/131.svs", predict, normalizer, rois=boxes, roi_patients=patients)
    write_slide_map(out / "131", smap, class_names)
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from common import engine, gradcam, models, plots, slide_io, tiling
from common.errors import UserError
from common.steps import atomic_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import Patch  # noqa: E402

# Colour per class index (matplotlib's tab10, RGB 0-255), the same in heatmap.png and the GeoJSON.
CLASS_COLOURS = np.array([[31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14], [148, 103, 189],
                          [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]],
                         np.uint8)
CAM_CELL_PX = 16  # side of one patch's Grad-CAM cell in slide_cam.png


@dataclass
class SlideMap:
    """One slide's map: where the patches lie, which tissue piece each is in, what the model says.

    coords int64 (K, 2) level-0 top-left; size_px the level-0 side each patch covers; core int64 (K,)
    the connected tissue piece (TMA core; 0 = none) under the patch centre; probs float32 (K, C);
    roi int8 (K,) 1 when the patch centre lies in an ROI, 0 outside, -1 when the slide has no ROIs;
    rois int64 (R, 4) and roi_patients str (R,) as given; thumbnail uint8 (h, w, 3) and
    thumbnail_scale (thumbnail px per level-0 px); rejected {reason: n} from the quality filter;
    cams float32 (K, 96, 96) Grad-CAM maps of the predicted class, or None.
    """

    slide: str
    dimensions: tuple[int, int]
    coords: np.ndarray
    size_px: float
    core: np.ndarray
    probs: np.ndarray
    roi: np.ndarray
    rois: np.ndarray
    roi_patients: np.ndarray
    thumbnail: np.ndarray
    thumbnail_scale: float
    rejected: dict
    cams: np.ndarray | None = None


def make_predict(model, mean, std, device: torch.device, channels_last: bool = False, bf16: bool = False,
                 batch_size: int = 256):
    """A ``predict(x)`` for ``map_slide``: uint8 (B, H, W, 3) -> float32 (B, C) class probabilities.

    Probabilities come from ``engine.log_probabilities`` (one logit -> [1 - p, p]; else softmax), so the
    columns are the experiment's classes; bf16 autocast only on CUDA, as in 05."""
    model.to(device).eval()
    use_bf16 = bf16 and device.type == "cuda"

    def predict(x: np.ndarray) -> np.ndarray:
        logits = engine.predict_logits(model, x, mean, std, device, batch_size, channels_last=channels_last,
                                       bf16=use_bf16)
        return engine.log_probabilities(logits).exp().float().numpy()

    return predict


def make_cam(model, mean, std, device: torch.device, batch_size: int = 64):
    """A ``cam(x, target)`` for ``map_slide``: Grad-CAM float32 (B, H, W) of classes target int (B,)."""
    layer = gradcam.default_target_layer(model)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device)

    def cam(x: np.ndarray, target: np.ndarray) -> np.ndarray:
        out = [gradcam.grad_cam(model, models.to_input(torch.from_numpy(x[s:s + batch_size]).to(device), mean_t,
                                                       std_t, False), layer, target=target[s:s + batch_size])
               for s in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.empty((0, *x.shape[1:3]), np.float32)

    return cam


def roi_flags(coords: np.ndarray, size_px: float, rois: np.ndarray) -> np.ndarray:
    """int8 (K,): 1 when a patch centre lies inside any ROI box (xe, ye exclusive), 0 otherwise; all -1
    when there are no ROIs (the slide is not annotated)."""
    rois = np.asarray(rois, np.float64).reshape(-1, 4)
    if len(rois) == 0:
        return np.full(len(coords), -1, np.int8)
    centre = coords + size_px / 2
    inside = ((centre[:, None, 0] >= rois[None, :, 0]) & (centre[:, None, 0] < rois[None, :, 2])
              & (centre[:, None, 1] >= rois[None, :, 1]) & (centre[:, None, 1] < rois[None, :, 3]))
    return inside.any(axis=1).astype(np.int8)


def map_slide(path, predict, normalizer, *, rois=None, roi_patients=None, target_mpp: float = 0.972,
              patch_size_px: int = 96, mpp_override: float | None = None, allow_objective_power: bool = False,
              scale_tolerance: float = tiling.SCALE_TOLERANCE, max_read_px: int = 4096, quality: dict | None = None,
              device: str = "cpu", cam=None,
              keep_patches: bool = False, progress: bool = True):
    """Classify every tissue patch of a slide.

    Tiling is 02's, through its public stages (``tiling.slide_grid``, ``read_tissue``, ``tissue_cells``,
    ``read_filtered``): a slide-wide grid of ``patch_size_px`` patches at ``target_mpp``, cells with >= 50 %
    tissue on the thumbnail, kept by ``filter_patches(**quality)`` (default 02's ``DLBCL_QUALITY``), read
    ``tiling.PATCH_BATCH`` at a time through bounded strip reads. Kept patches are normalised by
    ``normalizer`` as 03 normalised the training patches (``fit_scope="group"``: one stain estimate per
    tissue piece, per batch for a piece larger than a batch) and classified by ``predict``. Candidates
    go core by core, in row order within a core.

    Args:
        path: slide file.
        predict: uint8 (B, p, p, 3) -> float (B, C) probabilities (``make_predict``).
        normalizer: a fitted ``stain.Normalizer`` (03's ``<method>/normalizer.json``).
        rois, roi_patients: int (R, 4) level-0 boxes and R patient ids, or None (not annotated).
        target_mpp, patch_size_px, mpp_override, allow_objective_power, scale_tolerance, max_read_px, quality: as
            ``slides.tile_slide`` (``tiling.tile_options(cfg["tile_dlbcl"])`` gives 02's).
        device: torch device for the stain arithmetic.
        cam: optional ``cam(x, target)`` (``make_cam``) for Grad-CAM of the predicted class.
        keep_patches: also return the normalised patches uint8 (K, p, p, 3) (tests; unbounded memory).
        progress: show a progress bar.

    Returns:
        A ``SlideMap``, and the kept normalised patches when ``keep_patches`` (else None).

    Raises:
        SlideError: missing or unreadable slide, no scale, or a target finer than the slide.
    """
    name = Path(path).name
    rois = np.asarray([] if rois is None else rois, np.int64).reshape(-1, 4)
    roi_patients = np.asarray([] if roi_patients is None else roi_patients, str)
    slide = slide_io.open_slide(path)
    try:
        grid = tiling.slide_grid(slide, name, target_mpp=target_mpp, patch_size_px=patch_size_px,
                                 mpp_override=mpp_override, allow_objective_power=allow_objective_power,
                                 scale_tolerance=scale_tolerance)
        tissue = tiling.read_tissue(slide, max_read_px=max_read_px)
        coords = tiling.tissue_cells(tissue, grid)
        core = tissue.pieces(coords + grid.patch_level0_px / 2, grid.patch_level0_px).astype(np.int64)
        order = np.lexsort((coords[:, 0], coords[:, 1], core))
        coords, core = coords[order], core[order]
        keep, reasons, probs, cams, kept_x, start = [], Counter(), [], [], [], 0
        bar = tqdm(total=len(coords), desc=f"map {name}", unit="patch", disable=not progress, leave=False)
        for ok, reason, x, _ in tiling.read_filtered(slide, coords, grid, max_read_px=max_read_px, quality=quality):
            groups = core[start:start + len(ok)][ok]
            start += len(ok)
            keep.append(ok)
            reasons.update(reason[~ok].tolist())
            x = normalizer.transform(x, groups=groups, device=device) if len(x) else x
            p = predict(x) if len(x) else None
            if p is not None:
                probs.append(p)
                if cam is not None:
                    cams.append(cam(x, p.argmax(axis=1)))
            if keep_patches:
                kept_x.append(x)
            bar.update(len(ok))
        bar.close()
    except slide_io.openslide.OpenSlideError as exc:
        raise slide_io.SlideError(f"cannot read slide {name}: {exc}") from exc
    finally:
        slide.close()
    keep = np.concatenate([np.zeros(0, bool), *keep])
    # The read side in level-0 px: whole level px, as slide_io.read_patches reads them.
    size_px = max(1, round(grid.patch_level0_px / grid.level_downsample)) * grid.level_downsample
    coords = coords[keep]
    smap = SlideMap(slide=name, dimensions=(grid.width_px, grid.height_px), coords=coords, size_px=float(size_px),
                    core=core[keep], probs=np.concatenate(probs) if probs else np.zeros((0, 0), np.float32),
                    roi=roi_flags(coords, size_px, rois), rois=rois, roi_patients=roi_patients,
                    thumbnail=tissue.thumbnail, thumbnail_scale=tissue.scale, rejected=dict(reasons),
                    cams=np.concatenate(cams) if cams else None)
    patches = np.concatenate(kept_x) if kept_x else None
    return smap, patches


def core_table(smap: SlideMap, class_names: list[str], call_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """One row per tissue piece (core) with patches: its level-0 box, patch count, mean probabilities,
    the call and the patient of the ROIs whose patches lie in it.

    The call is what a pathologist reads off a core: the non-negative class (class 0 is the negative
    one, as in the patch-set labels) predicted for the most patches, when that is at least
    ``call_fraction`` of the core's patches (a lymphoma focus in a core of normal node makes a lymphoma
    core); else the negative class. ``call_fraction`` is the share of patches predicted as the call.
    ``patient`` is "" when no ROI lies in the core, patients joined with ";" when ROIs of several
    patients share one piece (cores closer than half a patch merge, see ``tiling.TissueMap.pieces``).

    Returns:
        {"core": int (M,), "x0", "y0", "x1", "y1": int (M,), "n_patches": int (M,),
         "p_<class>": float (M,), "call": str (M,), "call_fraction": float (M,), "patient": str (M,)}
    """
    ids, inverse, counts = np.unique(smap.core, return_inverse=True, return_counts=True)
    m = len(ids)
    sums = np.zeros((m, len(class_names)))
    np.add.at(sums, inverse, smap.probs)
    means = sums / np.maximum(counts, 1)[:, None]
    votes = np.zeros((m, len(class_names)))
    np.add.at(votes, (inverse, smap.probs.argmax(axis=1)), 1)
    shares = votes / np.maximum(counts, 1)[:, None]
    top = 1 + shares[:, 1:].argmax(axis=1) if len(class_names) > 1 else np.zeros(m, np.int64)
    call = np.where(shares[np.arange(m), top] >= call_fraction, top, 0)
    x0 = np.full(m, np.iinfo(np.int64).max)
    y0 = x0.copy()
    x1 = np.full(m, np.iinfo(np.int64).min)
    y1 = x1.copy()
    np.minimum.at(x0, inverse, smap.coords[:, 0])
    np.minimum.at(y0, inverse, smap.coords[:, 1])
    end = np.ceil(smap.coords + smap.size_px).astype(np.int64)
    np.maximum.at(x1, inverse, end[:, 0])
    np.maximum.at(y1, inverse, end[:, 1])
    patient = np.full(m, "", dtype=object)
    if len(smap.rois):
        # The ROI a patch centre lies in names the core's patient: the same centre rule as `roi`.
        centre = smap.coords + smap.size_px / 2
        boxes = smap.rois.astype(np.float64)
        inside = ((centre[:, None, 0] >= boxes[None, :, 0]) & (centre[:, None, 0] < boxes[None, :, 2])
                  & (centre[:, None, 1] >= boxes[None, :, 1]) & (centre[:, None, 1] < boxes[None, :, 3]))
        core_has_roi = np.zeros((m, len(boxes)), bool)
        np.logical_or.at(core_has_roi, inverse, inside)
        for row in np.flatnonzero(core_has_roi.any(axis=1)):  # one loop step per core, not per patch
            patient[row] = ";".join(sorted(set(smap.roi_patients[core_has_roi[row]].tolist())))
    table = {"core": ids, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "n_patches": counts}
    table.update({f"p_{c}": means[:, k] for k, c in enumerate(class_names)})
    table["call"] = np.asarray(class_names, dtype=object)[call]
    table["call_fraction"] = shares[np.arange(m), call]
    table["patient"] = patient
    return table


def _write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Columns of equal length (already formatted or plain numbers) as one CSV, written atomically."""
    header = list(columns)
    table = np.stack([np.asarray(v).astype(str) for v in columns.values()], axis=1) if columns else None
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table.tolist())


def patches_columns(smap: SlideMap, class_names: list[str]) -> dict[str, np.ndarray]:
    """patches.csv's columns: x, y, size_px, core, p_<class> (4 decimals), roi ("" unannotated)."""
    cols = {"x": smap.coords[:, 0], "y": smap.coords[:, 1],
            "size_px": np.char.mod("%.3f", np.full(len(smap.coords), smap.size_px)), "core": smap.core}
    cols.update({f"p_{c}": np.char.mod("%.4f", smap.probs[:, k]) for k, c in enumerate(class_names)})
    cols["roi"] = np.where(smap.roi < 0, "", smap.roi.astype(str))
    return cols


def geojson(smap: SlideMap, class_names: list[str]) -> dict:
    """A GeoJSON FeatureCollection that QuPath imports: one "tile" per patch, its square as a closed
    Polygon ring in level-0 px (x right, y down), the predicted class as its classification and one
    measurement "p_<class>" per class."""
    s = smap.size_px
    x, y = smap.coords[:, 0].astype(np.float64), smap.coords[:, 1].astype(np.float64)
    rings = np.stack([np.stack([x, y], 1), np.stack([x + s, y], 1), np.stack([x + s, y + s], 1),
                      np.stack([x, y + s], 1), np.stack([x, y], 1)], axis=1)  # (K, 5, 2)
    pred = smap.probs.argmax(axis=1)
    colours = CLASS_COLOURS[np.arange(len(class_names)) % len(CLASS_COLOURS)].tolist()
    probs = np.round(smap.probs.astype(np.float64), 4)
    # The format needs one object per patch; everything numeric above is computed for all at once.
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                 "properties": {"objectType": "tile",
                                "classification": {"name": class_names[k], "color": colours[k]},
                                "measurements": dict(zip((f"p_{c}" for c in class_names), p, strict=True))}}
                for ring, k, p in zip(rings.tolist(), pred.tolist(), probs.tolist(), strict=True)]
    return {"type": "FeatureCollection", "features": features}


def _grid_lookup(smap: SlideMap, shape: tuple[int, int], values: np.ndarray, fill) -> np.ndarray:
    """Paint per-patch values onto an image of `shape` at thumbnail scale: each pixel takes the value of
    the patch whose square holds it (patches lie on one slide-wide grid), `fill` elsewhere."""
    step = smap.size_px
    cols = np.rint(smap.coords[:, 0] / step).astype(np.int64)
    rows = np.rint(smap.coords[:, 1] / step).astype(np.int64)
    n_cols, n_rows = int(np.ceil(smap.dimensions[0] / step)) + 1, int(np.ceil(smap.dimensions[1] / step)) + 1
    grid = np.full((n_rows, n_cols), -1, np.int64)
    grid[rows, cols] = np.arange(len(rows))
    h, w = shape
    pixel_col = np.minimum((np.arange(w) + 0.5) / smap.thumbnail_scale // step, n_cols - 1).astype(np.int64)
    pixel_row = np.minimum((np.arange(h) + 0.5) / smap.thumbnail_scale // step, n_rows - 1).astype(np.int64)
    index = grid[pixel_row[:, None], pixel_col[None, :]]
    values = np.asarray(values)
    out = values[np.maximum(index, 0)]
    out[index < 0] = fill
    return out


def save_heatmap(path: Path, smap: SlideMap, class_names: list[str], calls: dict | None = None) -> Path:
    """heatmap.png: the thumbnail, each patch tinted with its predicted class's colour, opacity its
    probability (0.3 at chance .. 0.75 at 1); ROIs outlined in black; each core labelled with its call.

    calls: core_table's columns (core boxes and calls) plus "label" (text after the call), or None."""
    h, w = smap.thumbnail.shape[:2]
    image = smap.thumbnail.astype(np.float32)
    if len(smap.coords):
        pred = smap.probs.argmax(axis=1)
        chance = 1.0 / max(2, len(class_names))
        alpha = 0.3 + 0.45 * np.clip((smap.probs.max(axis=1) - chance) / (1 - chance), 0, 1)
        colour = CLASS_COLOURS[pred % len(CLASS_COLOURS)].astype(np.float32)
        a = _grid_lookup(smap, (h, w), alpha, 0.0)[..., None]
        c = _grid_lookup(smap, (h, w), colour, 0.0)
        image = (1 - a) * image + a * c
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    for box in np.rint(smap.rois * smap.thumbnail_scale).astype(np.int32):
        cv2.rectangle(image, (int(box[0]), int(box[1])), (int(box[2]) - 1, int(box[3]) - 1), (0, 0, 0), 1)
    fig, ax = plt.subplots(figsize=(8, 8 * h / max(w, 1) + 0.6))
    ax.imshow(image)
    ax.set_axis_off()
    ax.set_title(f"{smap.slide}: predicted class (opacity = probability); black boxes = ROIs;\n"
                 "each core: its call and the share of its patches predicted so", fontsize=9)
    if calls is not None:
        for x0, y0, x1, call, p_text in zip(calls["x0"], calls["y0"], calls["x1"], calls["call"],
                                            calls["label"], strict=True):
            ax.text((x0 + x1) / 2 * smap.thumbnail_scale, y0 * smap.thumbnail_scale - 3, f"{call} {p_text}",
                    ha="center", va="bottom", fontsize=7,
                    bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})
    handles = [Patch(color=CLASS_COLOURS[k % len(CLASS_COLOURS)] / 255, label=c) for k, c in enumerate(class_names)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return plots.save_figure(fig, path)


def save_slide_cam(path: Path, smap: SlideMap) -> Path:
    """slide_cam.png: each patch's Grad-CAM (predicted class) shrunk to CAM_CELL_PX and placed at its grid
    position, blended (jet) over the thumbnail resized to the same grid."""
    step = smap.size_px
    n_cols, n_rows = int(np.ceil(smap.dimensions[0] / step)), int(np.ceil(smap.dimensions[1] / step))
    side = smap.cams.shape[1]
    factor = max(1, side // CAM_CELL_PX)
    cell = side // factor
    # Block means (INTER_AREA for an integer factor), all patches at once.
    small = smap.cams[:, :cell * factor, :cell * factor].reshape(-1, cell, factor, cell, factor).mean(axis=(2, 4))
    grid = np.zeros((n_rows, n_cols, cell, cell), np.float32)
    shown = np.zeros((n_rows, n_cols), bool)
    rows = np.minimum(np.rint(smap.coords[:, 1] / step).astype(np.int64), n_rows - 1)
    cols = np.minimum(np.rint(smap.coords[:, 0] / step).astype(np.int64), n_cols - 1)
    grid[rows, cols], shown[rows, cols] = small, True
    heat = grid.transpose(0, 2, 1, 3).reshape(n_rows * cell, n_cols * cell)
    covered = np.repeat(np.repeat(shown, cell, 0), cell, 1)
    width_px = round(n_cols * step * smap.thumbnail_scale)
    height_px = round(n_rows * step * smap.thumbnail_scale)
    canvas = np.full((max(height_px, smap.thumbnail.shape[0]), max(width_px, smap.thumbnail.shape[1]), 3), 255,
                     np.uint8)
    canvas[:smap.thumbnail.shape[0], :smap.thumbnail.shape[1]] = smap.thumbnail
    base = cv2.resize(canvas[:height_px, :width_px], (n_cols * cell, n_rows * cell), interpolation=cv2.INTER_AREA)
    jet = cv2.cvtColor(cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blend = np.where(covered[..., None], np.rint(0.55 * base + 0.45 * jet), base).astype(np.uint8)
    return plots._save_png(path, blend)


def write_slide_map(folder: Path, smap: SlideMap, class_names: list[str], cores: dict | None = None) -> dict:
    """Write patches.csv, cores.csv, heatmap.png, patches.geojson (and slide_cam.png with CAMs).

    cores: ``core_table(smap, class_names)`` when the caller has it already.

    Returns:
        {"patches": K, "cores": M, "rejected": {...}, "files": [names]}
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(folder / "patches.csv", patches_columns(smap, class_names))
    cores = core_table(smap, class_names) if cores is None else cores
    _write_csv(folder / "cores.csv", {k: (np.char.mod("%.4f", v.astype(np.float64)) if k.startswith(("p_", "call_"))
                                          else v) for k, v in cores.items()})
    labels = {**cores, "label": np.char.mod("%.0f%%", 100 * cores["call_fraction"])}
    save_heatmap(folder / "heatmap.png", smap, class_names, labels)
    with atomic_path(folder / "patches.geojson") as tmp:
        Path(tmp).write_text(json.dumps(geojson(smap, class_names), separators=(",", ":")))
    files = ["patches.csv", "cores.csv", "heatmap.png", "patches.geojson"]
    if smap.cams is not None and len(smap.cams):
        save_slide_cam(folder / "slide_cam.png", smap)
        files.append("slide_cam.png")
    return {"patches": len(smap.coords), "cores": len(cores["core"]), "rejected": smap.rejected, "files": files}


def score_maps(maps: list[tuple[SlideMap, dict]], class_names: list[str], roi_class: str,
               test_patients: set[str]) -> dict:
    """Score slide maps against their ROIs over test patients' cores only.

    A core counts when every patient of the ROIs in it is a test patient (core_table's ``patient``);
    cores without ROIs (patient unknown) and any core holding a training or validation patient's ROI
    are left out. Over the counted cores' patches: ROC AUC of ``p_<roi_class>`` for patches inside ROIs
    (roi = 1) against the rest of those cores (roi = 0: unannotated, not known benign); per core: the
    fraction of counted cores called ``roi_class`` (every ROI marks ``roi_class`` tissue).

    Args:
        maps: (SlideMap, core_table) per slide.

    Returns:
        {"roi_class", "auc", "n_roi_patches", "n_outside_patches", "core_accuracy", "n_cores",
         "per_slide": {slide: {same keys}}}; NaN where undefined (no ROI or no outside patch).
    """
    from sklearn.metrics import roc_auc_score

    if roi_class not in class_names:
        raise UserError(f"gradcam.roi_class = {roi_class!r} is not a class of this experiment ({class_names})")
    k = class_names.index(roi_class)

    def score(p: np.ndarray, roi: np.ndarray, calls: np.ndarray) -> dict:
        defined = 0 < roi.sum() < len(roi)
        return {"auc": float(roc_auc_score(roi, p)) if defined else float("nan"),
                "n_roi_patches": int(roi.sum()), "n_outside_patches": int((roi == 0).sum()),
                "core_accuracy": float(np.mean(calls == roi_class)) if len(calls) else float("nan"),
                "n_cores": len(calls)}

    per_slide, pooled = {}, []
    for smap, cores in maps:
        if len(smap.rois) == 0:
            continue
        counted = np.array([bool(p) and set(p.split(";")) <= test_patients for p in cores["patient"]], bool)
        use = np.isin(smap.core, cores["core"][counted])
        part = (smap.probs[use, k], smap.roi[use], cores["call"][counted])
        per_slide[smap.slide] = score(*part)
        pooled.append(part)
    if not pooled:
        return {"roi_class": roi_class, **score(np.zeros(0), np.zeros(0, np.int8), np.zeros(0)), "per_slide": {}}
    return {"roi_class": roi_class, **score(*(np.concatenate(v) for v in zip(*pooled, strict=True))),
            "per_slide": per_slide}
