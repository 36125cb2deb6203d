"""07 · Where does the model look? Grad-CAM on test patches (thesis §6.3, Figure 15), as pictures and as
a number: the fraction of CAM mass inside the centre 32x32 px (PCam's label region), measured on the
rectified CAM at the layer's own resolution (ResNet: 3x3 cells of 32 px). A uniform map gives
32²/96² ≈ 0.111 (chance), a map on the centre cell alone 1.0 (the maximum); the thesis saw PCam
models look at the centre and DLBCL models not.

Reads:  runs/<run>/05_train/<experiment>/ (model, split), runs/<run>/06_evaluate/<experiment>/predictions.csv
Writes (runs/<run>/07_gradcam/<experiment>/):
    grid_<source>.png   rows of (true class -> predicted class) cells: each patch beside its CAM overlay,
                        the centre square outlined, true / predicted class and probability under each
    cam_stats.json      centre-mass fraction per source and true class (mean, std, n), and per outcome;
                        chance and maximum of the statistic at the CAM's resolution
    cam_stats.md        the same as a short table
    slides/<slide_id>/  with gradcam.slides: whole-slide maps (common/slidemap.py): patches.csv, cores.csv,
                        heatmap.png, patches.geojson (QuPath), slide_cam.png with gradcam.slide_cam
    slides_summary.json, slides.md   the maps scored against annotated ROIs over test patients' cores
    summary.json

Usage:
    python 07_gradcam.py --config config.yaml --set train.task=pcam
    python 07_gradcam.py --config config.yaml --set train.task=mixed --set gradcam.slides=[my_node.svs]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import cli, data, engine, gradcam, models, plots, slide_io, slidemap, stain, tiling
from common.annotations import read_annotations
from common.errors import UserError
from common.steps import atomic_path, require_step, step_dir, write_experiments_summary, write_json, write_summary

STEP = "07_gradcam"
STATS_PER_CELL = 256  # patches per (source, class) for the centre-mass statistic


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{path} is missing: run `python 06_evaluate.py` for this experiment first")
    table = np.loadtxt(path, delimiter=",", dtype=str, ndmin=2)
    cols = dict(zip(table[0], table[1:].T, strict=True))
    for key in ("index", "label", "pred"):
        cols[key] = cols[key].astype(np.int64)
    return cols


def cams_for(model, x: np.ndarray, target: np.ndarray, meta: dict, device, batch_size: int = 64) -> np.ndarray:
    """Rectified Grad-CAM maps float32 (N, h, w) at the target layer's resolution of uint8 patches
    x (N, 96, 96, 3) for the classes target (N,) (06's predictions, so that a map explains the class its
    grid row names, with or without TTA); `gradcam.upsample` makes the figure maps."""
    mean = torch.as_tensor(meta["mean"], device=device)
    std = torch.as_tensor(meta["std"], device=device)
    layer = gradcam.default_target_layer(model)
    out = [gradcam.grad_cam_lowres(model, models.to_input(torch.from_numpy(x[s:s + batch_size]).to(device), mean,
                                                          std, False), layer, target=target[s:s + batch_size])
           for s in range(0, len(x), batch_size)]
    return np.concatenate(out)


def slide_maps(cfg: dict, model, meta: dict, device, folder: Path, split: dict) -> dict | None:
    """Whole-slide maps (gradcam.slides) into folder/slides/<slide_id>/, scored against annotated ROIs over
    the cores of test patients only (slides_summary.json, slides.md). None when gradcam.slides is null."""
    gc, t, classes = cfg["gradcam"], cfg["tile_dlbcl"], meta["class_names"]
    if gc["slides"] is None:
        return None
    tma = Path(cfg["data"]["dlbcl_dir"]) / "TMA"
    csv_path = tma / "annotations.csv"
    rows = read_annotations(csv_path, t["stain"])[0] if csv_path.is_file() else {}
    # {tma_id: (int64 (R, 4) ROI boxes, str (R,) patient ids)}; a slide outside annotations.csv has no ROIs
    annotations = {k: (np.array([r[2] for r in v], np.int64), np.array([r[1] for r in v], str))
                   for k, v in rows.items()}
    # A patient in both test and another split (a random split) is not a test patient.
    test_patients = set(split["group"][split["split"] == "test"]) - set(split["group"][split["split"] != "test"])
    if gc["slides"] == "test":
        paths = [tma / t["stain"] / f"{tma_id}.svs" for tma_id, (_, patients) in sorted(annotations.items())
                 if test_patients & set(patients)]
    else:
        paths = [Path(p) for p in gc["slides"]]
    state = json.loads((require_step(cfg, "03_normalize") / meta["method"] / "normalizer.json").read_text())
    normalizer = stain.from_json(state["state"])
    predict = slidemap.make_predict(model, meta["mean"], meta["std"], device, cfg["train"]["channels_last"],
                                    cfg["train"]["bf16"])
    cam = slidemap.make_cam(model, meta["mean"], meta["std"], device) if gc["slide_cam"] else None
    maps, written, failed = [], {}, []
    for path in tqdm(paths, desc="slide maps", unit="slide"):
        boxes, patients = annotations.get(path.stem, (None, None))
        try:
            smap, _ = slidemap.map_slide(
                path, predict, normalizer, rois=boxes, roi_patients=patients, **tiling.tile_options(t),
                device=str(device), cam=cam)
        except slide_io.SlideError as err:
            failed.append({"slide": str(path), "error": str(err)})
            print(f"   skipped slide {path}: {err}")
            continue
        cores = slidemap.core_table(smap, classes, gc["core_call_fraction"])
        written[path.stem] = slidemap.write_slide_map(folder / "slides" / path.stem, smap, classes, cores)
        maps.append((smap, cores))
    score = (slidemap.score_maps(maps, classes, gc["roi_class"], test_patients) if gc["roi_class"] in classes
             else None)
    summary = {"slides": written, "failed": failed, "n_test_patients": len(test_patients), "score": score}
    write_json(folder / "slides_summary.json", summary)
    lines = ["| slide | patches | cores | ROI / outside patches (test cores) | AUC | core accuracy |",
             "|---|---|---|---|---|---|"]
    per_slide = {} if score is None else score["per_slide"]
    for smap, _ in maps:
        s = per_slide.get(smap.slide, {})
        auc, accuracy = (f"{s[k]:.3f}" if k in s else "" for k in ("auc", "core_accuracy"))
        lines.append(f"| {smap.slide} | {len(smap.coords)} | {written[Path(smap.slide).stem]['cores']} | "
                     f"{s.get('n_roi_patches', '')} / {s.get('n_outside_patches', '')} | {auc} | {accuracy} |")
    if score is not None:
        lines.append(f"| all | | | {score['n_roi_patches']} / {score['n_outside_patches']} | {score['auc']:.3f} | "
                     f"{score['core_accuracy']:.3f} ({score['n_cores']} cores) |")
        lines.append(f"\nAUC: p_{gc['roi_class']} of patches inside ROIs vs the rest of test patients' cores "
                     "(unannotated tissue, not known benign); core accuracy: test cores called "
                     f"{gc['roi_class']}.")
    with atomic_path(folder / "slides.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"   slide maps: {len(maps)} of {len(paths)} slides in {folder / 'slides'} "
          f"({len(failed)} failed to open; see {folder / 'slides_summary.json'})")
    if paths and not maps:
        raise UserError(f"no slide map written: all {len(paths)} slides failed (see {folder / 'slides_summary.json'})")
    return summary


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    cfg, device = cli.start(argv, __doc__, STEP)
    gc, seed = cfg["gradcam"], cfg["run"]["seed"]
    model, meta, split = engine.load_experiment(cfg, cfg["evaluate"]["checkpoint"])
    model.to(device)
    name = engine.experiment_name(cfg)
    pred = read_predictions(require_step(cfg, "06_evaluate") / name / "predictions.csv")
    engine.require_same_checkpoint(require_step(cfg, "06_evaluate") / name / "metrics.json", meta)
    source_dir = require_step(cfg, "03_normalize") / meta["method"]
    folder = step_dir(cfg, STEP) / name
    folder.mkdir(exist_ok=True)
    classes = meta["class_names"]
    rng = np.random.default_rng(seed)

    # ---- the centre-mass statistic on a seeded sample per (source, true class)
    stats, per_outcome = {}, {}
    for src in np.unique(pred["source"]):
        for k, cls in enumerate(classes):
            pick = np.flatnonzero((pred["source"] == src) & (pred["label"] == k))
            if len(pick) == 0:
                continue
            pick = np.sort(rng.permutation(pick)[:STATS_PER_CELL])
            x = data.read_patches(source_dir, pred["file"][pick], pred["index"][pick])
            cams = cams_for(model, x, pred["pred"][pick], meta, device)
            frac = gradcam.centre_mass(cams, gc["center_px"], patch_px=x.shape[1])
            cam_shape = cams.shape[1:]
            bounds = gradcam.centre_mass_bounds(cam_shape, gc["center_px"], patch_px=x.shape[1])
            stats[f"{src}/{cls}"] = {"mean": float(frac.mean()), "std": float(frac.std()), "n": len(pick)}
            for j, pc in enumerate(classes):
                sel = pred["pred"][pick] == j
                if sel.any():
                    per_outcome[f"{src}/{cls}->{pc}"] = {"mean": float(frac[sel].mean()), "n": int(sel.sum())}
    chance, maximum = bounds
    write_json(folder / "cam_stats.json", {"center_px": gc["center_px"], "chance": chance, "maximum": maximum,
                                           "cam_shape": list(cam_shape), "per_source_class": stats,
                                           "per_outcome": per_outcome})
    lines = [f"Fraction of Grad-CAM mass in the centre {gc['center_px']}x{gc['center_px']} px, on the rectified "
             f"{cam_shape[0]}x{cam_shape[1]} map: chance (uniform map) {chance:.3f}, maximum (all mass in the "
             f"centre) {maximum:.3f}.", "",
             "| source / true class | centre-mass fraction | chance | maximum | n |", "|---|---|---|---|---|"]
    lines += [f"| {key} | {v['mean']:.3f} ± {v['std']:.3f} | {chance:.3f} | {maximum:.3f} | {v['n']} |"
              for key, v in stats.items()]
    with atomic_path(folder / "cam_stats.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")

    # ---- grids: per source, one row per (true -> predicted) cell, each patch beside its overlay (Figure 15)
    grids, n_cols = [], gc["n_per_cell"]
    for src in np.unique(pred["source"]):
        images, overlays, captions, titles = [], [], [], []
        for k, cls in enumerate(classes):
            for j, pc in enumerate(classes):
                pick = np.flatnonzero((pred["source"] == src) & (pred["label"] == k) & (pred["pred"] == j))
                if len(pick) == 0:
                    continue
                pick = np.sort(rng.permutation(pick)[:n_cols])
                x = data.read_patches(source_dir, pred["file"][pick], pred["index"][pick])
                cams = gradcam.upsample(cams_for(model, x, pred["pred"][pick], meta, device), x.shape[1:3])
                pad = ((0, n_cols - len(pick)), (0, 0), (0, 0), (0, 0))
                images.append(np.pad(x, pad))
                overlays.append(np.pad(gradcam.overlay(x, cams), pad))
                prob = pred[f"p_{pc}"][pick].astype(float)
                captions += [f"true {cls} · pred {pc} (p {p:.2f})" for p in prob] + [""] * (n_cols - len(pick))
                titles.append(f"true {cls} → predicted {pc} ({'correct' if k == j else 'wrong'})")
        if titles:
            grids.append(str(plots.cam_grid(folder / f"grid_{src}.png", np.stack(images), np.stack(overlays),
                                            captions, titles, n_cols, f"{name} · {src}", gc["center_px"])))
    # ---- whole-slide maps (gradcam.slides)
    slide_maps(cfg, model, meta, device, folder, split)
    write_summary(folder, STEP, cfg, started, experiment=name, cam_stats=stats, grids=grids)
    write_experiments_summary(folder.parent, STEP, cfg, started)
    print("\n".join(lines))
    print(f"   wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
