"""02 · Tile the DLBCL-Morph H&E TMA slides into 96x96 patches at PCam's scale (thesis §5.1.2).

Reads (data.dlbcl_dir), the release as published:
    TMA/annotations.csv          columns found by name in the header row (any order, case and spaces
                                 ignored, others ignored): patient_id (or pat_id), tma_id, stain,
                                 xs, ys, xe, ye (ROI boxes in level-0 px); rows of other stains ignored
    TMA/<stain>/<tma_id>.svs     the slides (OpenSlide), µm/px from openslide.mpp-x
Writes (runs/<run>/02_tile_dlbcl/):
    dlbcl.h5                     patch set: y = 1 inside an ROI (lymphoma), 0 tissue outside every
                                 ROI (the thesis's "remaining areas"; tile_dlbcl.negatives), i.e.
                                 unannotated tissue of lymphoma patients, not known to be benign;
                                 group = patient id; coords level-0; with balance 50/50, and negatives
                                 drawn before reading, one per kept lymphoma patch per slide
    overview/<tma_id>.png        thumbnail with a title and a legend with counts: ROIs, kept lymphoma, kept
                                 negatives, patches dropped by balance, patches rejected by the filter
    summary.json                 `slides`: per slide the level read, its µm/px, patches read and kept
                                 (before `n_positive_dropped_by_balance`, lymphoma dropped across slides
                                 where negatives ran short); `negatives_are`; counts (patches_read =
                                 written + n_positive_dropped_by_balance + rejected_by_reason +
                                 n_negative_read_unused); and every
                                 skipped row, ROI or slide with its reason:
                                 malformed_row, missing_slide, slide_error (unreadable, no mpp),
                                 roi_empty, roi_outside_slide, roi_smaller_than_patch,
                                 roi_all_patches_rejected; `outputs` lists dlbcl.h5 when this run wrote it
Fails (exit 2, summary.json with `error`) when lymphoma, or negatives with tile_dlbcl.negatives, get no patch
(e.g. every slide skipped: the line names the first slide's reason, such as a missing mpp, with advice).

Usage:
    python 02_tile_dlbcl.py --config config.yaml [--set tile_dlbcl.mpp_override=0.25]
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from common import cli, filters, overview, slide_io, slides, tiling
from common.annotations import read_annotations
from common.errors import UserError
from common.patchset import PatchSetWriter
from common.steps import begin_step, check_free_space, provenance, write_summary

STEP = "02_tile_dlbcl"
# What label 0 is, by tile_dlbcl.negatives: DLBCL-Morph's ROIs mark lymphoma, about one per core, and the
# rest of the tissue is unannotated tissue of the same lymphoma patients.
NEGATIVES_ARE = {
    "all": "unannotated tissue of lymphoma patients outside every ROI (other cores, core rims, the rest of "
           "a core with a small ROI): not known to be benign",
    "cores_without_roi": "tissue pieces (TMA cores) holding no ROI, of lymphoma patients: unannotated, "
                         "not known to be benign",
    "none": "no negatives were extracted (tile_dlbcl.negatives: none)",
}


def tile_one(job: dict) -> dict:
    """Tile one slide in a worker process (each worker opens its own slide); the thumbnail stays here."""
    t = job["params"]
    rois = job["rois"]
    boxes = np.array([r[2] for r in rois], np.int64).reshape(-1, 4)
    try:
        result = slides.tile_slide(
            job["path"], boxes,
            [f"{job['tma_id']} row {r[0]}" for r in rois], [r[1] for r in rois],
            **tiling.tile_options(t), negatives=t["negatives"], balance=t["balance"], seed=job["seed"])
    except slide_io.SlideError as err:
        return {"tma_id": job["tma_id"], "error": str(err)}
    overview.save_overview(job["overview"], result, boxes)
    result.tissue = None
    return {"tma_id": job["tma_id"], "tiles": result}


def tile_in_order(jobs: list[dict], workers: int) -> Iterator[dict]:
    """``tile_one`` over the jobs, results in job order, at most two per worker in flight, so that the
    patches held at once are bounded by the workers, not by the number of slides."""
    if workers == 1:  # in-process: simpler tracebacks, no pickling
        yield from map(tile_one, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(tile_one, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def estimate_bytes(jobs: list[dict], t: dict) -> float:
    """Bytes dlbcl.h5 will take at most: the ROIs' grid cells, doubled with balance (one negative per
    positive), else plus every cell of the slide; slides that cannot be opened count 0 (the workers
    report them)."""
    per_patch = 96 * 96 * 3 + 8 * 2 + 1 + 16  # pixels, coords, label, group string
    n_patches = 0
    for job in jobs:
        try:
            with slide_io.open_slide(job["path"]) as slide:
                grid = tiling.slide_grid(slide, Path(job["path"]).name, target_mpp=t["target_mpp"],
                                         mpp_override=t["mpp_override"], scale_tolerance=t["scale_tolerance"],
                                         allow_objective_power=t["allow_objective_power"])
        except slide_io.SlideError:
            continue
        boxes = np.array([r[2] for r in job["rois"]], np.float64).reshape(-1, 4)
        sides = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None) // grid.patch_level0_px
        positives = int(sides.prod(axis=1).sum())
        n_patches += 2 * positives if t["balance"] else positives + len(grid.cells())
    return n_patches * per_patch


def trim_positives(path: Path, n_drop: int, rng: np.random.Generator) -> np.ndarray:
    """Remove ``n_drop`` random label-1 patches from a patch set, copying it in chunks (memory bounded);
    returns bool (N,): the rows kept."""
    with h5py.File(path, "r") as f:
        y = f["y"][:]
    keep = np.ones(len(y), bool)
    keep[rng.choice(np.flatnonzero(y == 1), n_drop, replace=False)] = False
    untrimmed = path.with_name(f".{path.stem}_untrimmed.h5")
    path.replace(untrimmed)
    with h5py.File(untrimmed, "r") as f, PatchSetWriter(
            path, source=f.attrs["source"], split=f.attrs["split"], mpp=f.attrs["mpp"],
            provenance=json.loads(f.attrs["provenance"])) as writer:
        for start in range(0, len(y), 4096):
            rows = slice(start, start + 4096)
            chunk = keep[rows]
            writer.append(f["x"][rows][chunk], f["y"][rows][chunk], f["group"].asstr()[rows][chunk],
                          f["coords"][rows][chunk])
    untrimmed.unlink()
    return keep


def failure_message(empty: list[str], found: dict[str, int], skipped: list[dict], parts: list[dict],
                    n_slides: int, missing_pattern: Path) -> str:
    """Why a class got no patch: the top skip and quality-filter reasons with counts, the slide path
    looked for when slides were missing (the usual cause: a stain folder named differently), and the
    first slide's error when no slide could be tiled (e.g. no mpp, with advice that fits the slide)."""
    reasons = Counter(s["reason"] for s in skipped)
    for cls in empty:
        for part in parts:
            for reason, n in part["counts"]["positive" if cls == "lymphoma" else "negative"]["rejected"].items():
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
        jobs.append({"tma_id": tma_id, "path": str(path), "rois": rois, "params": t, "seed": cfg["run"]["seed"],
                     "overview": str(out / "overview" / f"{tma_id}.png")})

    # ---- tile the slides in parallel, streaming each slide's patches to the patch set
    check_free_space(out, estimate_bytes(jobs, t), "dlbcl.h5",
                     "free space there or point run.output_root at a larger disk")
    workers = min(t["workers"], max(1, len(jobs)))
    per_slide, found, kept_value = [], {"lymphoma": 0, "negative": 0}, []
    with PatchSetWriter(out / "dlbcl.h5", source="dlbcl", split="all", mpp=t["target_mpp"],
                        provenance=provenance(cfg, STEP)) as writer:
        for res in tqdm(tile_in_order(jobs, workers), total=len(jobs), desc="tile slides", unit="slide"):
            if "error" in res:
                skipped.append({"item": f"slide {res['tma_id']}", "reason": "slide_error", "detail": res["error"]})
                continue
            tiles = res["tiles"]
            writer.append(tiles.x, tiles.y, tiles.group, tiles.coords)
            skipped += tiles.skipped
            found["lymphoma"] += int((tiles.y == 1).sum())
            found["negative"] += int((tiles.y == 0).sum())
            kept_value.append(tiles.mean_value)  # the brightness rule's measure, as in 01
            per_slide.append({"slide": res["tma_id"], "level": tiles.grid.level, "level_mpp": tiles.grid.level_mpp,
                              "patches_read": tiles.patches_read, "patches_kept": len(tiles.y),
                              "counts": tiles.counts})

        for item in skipped[:10]:
            print(f"   skipped {item['item']}: {item['reason']} ({item.get('detail', '')})")
        # ---- a patch set without lymphoma (or without the negatives asked for) trains nothing: fail loudly
        # (with balance, a slide without lymphoma reads no negatives: then only the lymphoma is missing)
        wants_negatives = t["negatives"] != "none" and (found["lymphoma"] > 0 or not t["balance"])
        empty = [cls for cls in ("lymphoma", "negative")
                 if found[cls] == 0 and (cls == "lymphoma" or wants_negatives)]
        if empty:
            message = failure_message(empty, found, skipped, per_slide, len(by_slide),
                                      tma / t["stain"] / "<tma_id>.svs")
            write_summary(out, STEP, cfg, started, slides=per_slide, n_patches=0, found=found, skipped=skipped,
                          error=message, outputs=[])
            raise UserError(f"{message}; see {out / 'summary.json'}")  # the writer removes its partial file

    n_pos, n_neg = found["lymphoma"], found["negative"]
    n_trimmed = n_pos - n_neg if t["balance"] and 0 < n_neg < n_pos else 0
    kept_value = np.concatenate(kept_value)  # per written patch, in file order
    if n_trimmed:
        # Some slides had fewer usable negatives than lymphoma patches: drop lymphoma patches at random
        # across all slides (one streaming copy of the file, only in this case) to keep 50/50.
        kept_value = kept_value[trim_positives(out / "dlbcl.h5", n_trimmed, np.random.default_rng(cfg["run"]["seed"]))]
        print(f"   balance: dropped {n_pos - n_neg} of {n_pos} lymphoma patches, since some slides have fewer "
              "usable negatives than lymphoma patches (see tile_dlbcl.negatives)")
        n_pos = n_neg
    n_read = sum(s["patches_read"] for s in per_slide)
    n_read_unused = sum(s["counts"]["negative"]["read_unused"] for s in per_slide)
    by_reason = Counter()
    for part in per_slide:
        for cls in ("positive", "negative"):
            by_reason.update(part["counts"][cls]["rejected"])
    by_reason = {r: by_reason[r] for r in filters.REJECT_REASONS if by_reason[r]}
    brightness = filters.brightness_summary(kept_value)
    write_summary(out, STEP, cfg, started, n_patches=n_pos + n_neg, n_positive=n_pos, n_negative=n_neg,
                  patches_read=n_read, n_positive_dropped_by_balance=n_trimmed, rejected_by_reason=by_reason,
                  n_negative_read_unused=n_read_unused,
                  kept_mean_value=brightness,
                  negatives_are=NEGATIVES_ARE[t["negatives"]], slides=per_slide, skipped=skipped, outputs=["dlbcl.h5"])
    print(f"   wrote {n_pos + n_neg} patches ({n_pos} lymphoma, {n_neg} negative) from {len(per_slide)} slides, "
          f"{n_read} read ({n_read_unused} negatives read beyond the balance's need); {len(skipped)} items skipped "
          "(see summary.json)")
    print(f"   rejected by reason: {', '.join(f'{r} {n}' for r, n in by_reason.items()) or 'none'}; kept mean V "
          f"p5/p50/p95 {brightness['p5']:.4f}/{brightness['p50']:.4f}/{brightness['p95']:.4f}")
    print(f"   negatives: {NEGATIVES_ARE[t['negatives']]}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
