"""02 · Tile the DLBCL-Morph H&E TMA slides into 96x96 patches at PCam's scale (thesis §5.1.2).

Reads (data.dlbcl_dir), the release as published:
    TMA/annotations.csv          columns found by name in the header row (any order, case and spaces
                                 ignored, others ignored): patient_id (or pat_id), tma_id, stain,
                                 xs, ys, xe, ye (ROI boxes in level-0 px); rows of other stains ignored
    TMA/<stain>/<tma_id>.svs     the slides (OpenSlide), µm/px from openslide.mpp-x
Writes (runs/<run>/02_tile_dlbcl/):
    dlbcl.h5                     patch set: y = 1 inside an ROI (lymphoma), 0 tissue outside every
                                 ROI (the thesis's "remaining areas"); group = patient id; coords level-0
    overview/<tma_id>.png        thumbnail with ROIs, kept (green) and rejected (red) patch boxes
    summary.json                 counts per slide, and every skipped row, ROI or slide with its reason:
                                 malformed_row, missing_slide, slide_error (unreadable, no mpp),
                                 roi_empty, roi_outside_slide, roi_smaller_than_patch,
                                 roi_all_patches_rejected; `outputs` lists dlbcl.h5 when this run wrote it
Fails (exit 2, summary.json with `error`) when lymphoma, or negatives with tile_dlbcl.negatives, get no patch
(e.g. every slide skipped: the line names the first slide's reason, such as a missing mpp, with advice).

Usage:
    python 02_tile_dlbcl.py --config config.yaml [--set tile_dlbcl.mpp_override=0.25]
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import cli, slides
from common.config import UserError
from common.patchset import PatchSetWriter
from common.slides import read_annotations
from common.steps import begin_step, provenance, write_summary

STEP = "02_tile_dlbcl"


def tile_one(job: dict) -> dict:
    """Tile one slide in a worker process (each worker opens its own slide); the thumbnail stays here."""
    t = job["params"]
    rois = job["rois"]
    boxes = np.array([r[2] for r in rois], np.int64).reshape(-1, 4)
    try:
        result = slides.tile_slide(
            job["path"], boxes,
            [f"{job['tma_id']} row {r[0]}" for r in rois], [r[1] for r in rois],
            **slides.tile_options(t), negatives=t["negatives"])
    except slides.SlideError as err:
        return {"tma_id": job["tma_id"], "error": str(err)}
    slides.save_overview(job["overview"], result, boxes)
    result.tissue = None
    return {"tma_id": job["tma_id"], "tiles": result}


def balance(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a 50/50 subsample (the larger class subsampled), sorted; all indices when one class is
    absent, which main() allows only with tile_dlbcl.negatives: false."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n = min(len(pos), len(neg))
    if n == 0:
        return np.arange(len(y))
    return np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


def failure_message(empty: list[str], found: dict[str, int], skipped: list[dict], parts: list,
                    n_slides: int, missing_pattern: Path) -> str:
    """Why a class got no patch: the top skip and quality-filter reasons with counts, the slide path
    looked for when slides were missing (the usual cause: a stain folder named differently), and the
    first slide's error when no slide could be tiled (e.g. no mpp, with advice that fits the slide)."""
    reasons = Counter(s["reason"] for s in skipped)
    for cls in empty:
        for part in parts:
            for reason, n in part.counts["positive" if cls == "lymphoma" else "negative"]["rejected"].items():
                reasons[f"{cls}_patch_{reason}"] += n
    top = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(3)) or "nothing was skipped or rejected"
    message = (f"no {' and no '.join(empty)} patches ({found['lymphoma']} lymphoma, {found['negative']} negative "
               f"from {len(parts)} of {n_slides} slides); top reasons: {top}")
    if reasons["missing_slide"]:
        folders = sorted(p.name for p in missing_pattern.parent.parent.iterdir() if p.is_dir())
        message += (f"; {reasons['missing_slide']} of {n_slides} slides missing, looked for {missing_pattern} "
                    f"(folders in {missing_pattern.parent.parent}: {', '.join(folders) or 'none'})")
    errors = [s for s in skipped if s["reason"] == "slide_error"]
    if errors and not parts:
        message += f"; no slide could be tiled, {errors[0]['item']}: {errors[0]['detail']}"
    return message


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    cfg, _ = cli.start(argv, __doc__, STEP)
    t = cfg["tile_dlbcl"]
    tma = Path(cfg["data"]["dlbcl_dir"]) / "TMA"
    out = begin_step(cfg, STEP)
    (out / "overview").mkdir(exist_ok=True)
    by_slide, skipped, stains = read_annotations(tma / "annotations.csv", t["stain"])
    if not by_slide:
        seen = ", ".join(f"{stain!r} ({n} rows)" for stain, n in stains.most_common()) or "none"
        raise UserError(f"{tma / 'annotations.csv'} has no rows with stain {t['stain']!r} (tile_dlbcl.stain); "
                        f"stains present: {seen}")
    print(f"   input {tma}: {sum(map(len, by_slide.values()))} {t['stain']} ROIs on {len(by_slide)} slides")

    jobs = []
    for tma_id, rois in sorted(by_slide.items()):
        path = tma / t["stain"] / f"{tma_id}.svs"
        if not path.is_file():
            skipped.append({"item": f"slide {tma_id}", "reason": "missing_slide", "detail": str(path)})
            continue
        jobs.append({"tma_id": tma_id, "path": str(path), "rois": rois, "params": t,
                     "overview": str(out / "overview" / f"{tma_id}.png")})

    # ---- tile the slides in parallel; collect patches in slide order
    workers = min(t["workers"], max(1, len(jobs)))
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext() as pool:
        mapped = pool.map(tile_one, jobs) if pool else map(tile_one, jobs)  # one worker: in-process
        results = list(tqdm(mapped, total=len(jobs), desc="tile slides", unit="slide"))
    per_slide, parts = {}, []
    for res in results:
        if "error" in res:
            skipped.append({"item": f"slide {res['tma_id']}", "reason": "slide_error", "detail": res["error"]})
            continue
        tiles = res["tiles"]
        skipped += tiles.skipped
        per_slide[res["tma_id"]] = {"level": tiles.grid.level, "counts": tiles.counts, "kept": len(tiles.y)}
        parts.append(tiles)

    for item in skipped[:10]:
        print(f"   skipped {item['item']}: {item['reason']} ({item.get('detail', '')})")

    # ---- a patch set without lymphoma (or without the negatives asked for) trains nothing: fail loudly
    y = np.concatenate([np.zeros(0, np.uint8), *(p.y for p in parts)]).astype(np.uint8)
    found = {"lymphoma": int((y == 1).sum()), "negative": int((y == 0).sum())}
    empty = [cls for cls in ("lymphoma", "negative") if found[cls] == 0 and (cls == "lymphoma" or t["negatives"])]
    if empty:
        message = failure_message(empty, found, skipped, parts, len(by_slide), tma / t["stain"] / "<tma_id>.svs")
        write_summary(out, STEP, cfg, started, slides=per_slide, n_patches=0, found=found, skipped=skipped,
                      error=message, outputs=[])
        raise UserError(f"{message}; see {out / 'summary.json'}")
    n_total = len(y)
    x = np.concatenate([p.x for p in parts])
    group = np.concatenate([p.group for p in parts])
    coords = np.concatenate([p.coords for p in parts])
    keep = balance(y, np.random.default_rng(cfg["run"]["seed"])) if t["balance"] else np.arange(len(y))

    with PatchSetWriter(out / "dlbcl.h5", source="dlbcl", split="all", mpp=t["target_mpp"],
                        provenance=provenance(cfg, STEP)) as writer:
        writer.append(x[keep], y[keep], group[keep], coords[keep])
    n_pos, n_neg = int((y[keep] == 1).sum()), int((y[keep] == 0).sum())
    write_summary(out, STEP, cfg, started, slides=per_slide, n_patches=len(keep), n_positive=n_pos,
                  n_negative=n_neg, n_before_balance=n_total, skipped=skipped, outputs=["dlbcl.h5"])
    print(f"   wrote {len(keep)} patches ({n_pos} lymphoma, {n_neg} negative) from {len(parts)} slides; "
          f"{len(skipped)} items skipped (see summary.json)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
