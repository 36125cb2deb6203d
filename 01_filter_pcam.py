"""01 · Filter PatchCamelyon by HSV thresholds (thesis §5.1.2): keep H&E tissue, drop glass and IHC.

Reads (data.pcam_dir), the official release as downloaded, or torchvision's root (files in its pcam/):
    camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5  (or .h5.gz, decompressed once into
                                                              data.cache_dir; see common/pcam.py)
    camelyonpatch_level_2_split_{split}_meta.csv             (optional: `wsi` becomes each patch's group;
                                                              without it every group is 'unknown')
Writes (runs/<run>/01_filter_pcam/):
    {train,valid,test}.h5      patch sets of the kept patches: always all three splits, which 03 reads
    test_official.h5           the whole official test split, unfiltered: 06 scores the PCam benchmark on it
                               from this step's last run
    rejected_<split>.png       contact sheet of rejected examples
    grid_search.json, grid_kept.png, grid_rejected.png   (filter_pcam.grid_search: true; scored on a
                               sample of filter_pcam.grid_search_samples train patches)
    summary.json               per split: kept / rejected counts by label and reason, the files read, the
                               meta CSV and `groups` (slide, or unknown without it); `outputs` lists the
                               patch sets this run wrote (none when it failed: a split kept no patch, exit 2)

Usage:
    python 01_filter_pcam.py --config config.yaml [--set filter_pcam.max_patches_per_split=1000]
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from common import cli, filters, pcam, plots
from common.config import SPLITS, UserError
from common.patchset import PatchSetWriter
from common.steps import begin_step, check_free_space, provenance, write_json, write_summary

STEP = "01_filter_pcam"
PCAM_MPP = 0.972  # µm/px: Camelyon16's 0.243 µm/px at 40x, undersampled 4x
# MD5 of the decompressed .h5 files (the .gz MD5s in torchvision's table check the download itself)
MD5_H5 = {
    "train_x": "01844da899645b4d6f84946d417ba453", "train_y": "0781386bf6c2fb62d58ff18891466aca",
    "valid_x": "81cf9680f1724c40673f10dc88e909b1", "valid_y": "94d8aacc249253159ce2a2e78a86e658",
    "test_x": "2614b2e6717d6356be141d9d6dbfcb7e", "test_y": "11ed647efe9fe457a4eb45df1dba19ba",
}
NO_META = ("   note: no meta CSV (camelyonpatch_level_2_split_<split>_meta.csv) for split {splits} in {folder}: its "
           "patches get group 'unknown' and coords -1. Lost: the slide grouping, so 06 reports patch-level "
           "confidence intervals instead of slide-level ones (patches of one slide are correlated: patch-level "
           "intervals are too narrow); the official splits themselves stay slide-disjoint. The CSVs are on "
           "Zenodo only ({zenodo}; torchvision's PCAM never downloads them): put them in {folder} and rerun 01.")


# ---------------------------------------------------------------- locating and checking the files


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def open_h5(path: Path) -> h5py.File:
    """Open an HDF5 file for reading; a corrupt or unreadable one is the user's to replace."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:  # h5py: 'file signature not found', truncated file, permission denied
        raise UserError(f"cannot open {path} as HDF5 ({str(exc).splitlines()[0]}); is the download complete? "
                        "Delete it and download it again (see the README)") from exc


def open_split(pcam_dir: Path, split: str, verify_md5: bool, cache_dir: Path) -> tuple[h5py.File, h5py.File]:
    """Open x and y of a split and check keys, shapes and dtypes against the official release."""
    paths = {kind: pcam.locate(pcam_dir, split, kind, cache_dir) for kind in ("x", "y")}
    if verify_md5:
        for kind, path in paths.items():
            if (got := md5(path)) != MD5_H5[f"{split}_{kind}"]:
                raise UserError(f"{path} has MD5 {got}, expected {MD5_H5[f'{split}_{kind}']} (corrupt download?)")
    fx = open_h5(paths["x"])
    try:
        fy = open_h5(paths["y"])
    except UserError:
        fx.close()
        raise
    for f, kind, tail in ((fx, "x", (96, 96, 3)), (fy, "y", (1, 1, 1))):
        if kind not in f:
            raise UserError(f"{f.filename} has no dataset '{kind}' (keys: {', '.join(f.keys())})")
        ds = f[kind]
        if ds.dtype != np.uint8 or ds.ndim != 1 + len(tail) or tuple(ds.shape[1:]) != tail:
            expected = ", ".join(map(str, tail))
            raise UserError(f"{f.filename}: '{kind}' is {ds.dtype} {ds.shape}, expected uint8 (N, {expected})")
    if len(fx["x"]) != len(fy["y"]):
        raise UserError(f"{fx.filename} has {len(fx['x'])} patches but {fy.filename} has {len(fy['y'])} labels")
    return fx, fy


def read_meta(path: Path | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Group (`wsi`) and level-0 coords (x, y) per patch from the meta CSV; 'unknown' / -1 without it."""
    if path is None:
        return np.full(n, "unknown"), np.full((n, 2), -1, np.int64)
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])  # an empty file: every column is missing
    need = ("coord_x", "coord_y", "wsi")
    if not set(need) <= set(header):
        raise UserError(f"{path} lacks columns {', '.join(c for c in need if c not in header)}")
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=str, usecols=[header.index(c) for c in need],
                       ndmin=2)
    if len(table) < n:
        raise UserError(f"{path} has {len(table)} rows for {n} patches")
    coords = table[:n, :2].astype(float).astype(np.int64)
    group = table[:n, 2]
    return group, coords


# ---------------------------------------------------------------- the filter


def filter_split(fx, fy, group, coords, writer: PatchSetWriter, thresholds: dict, n: int, chunk: int,
                 desc: str) -> tuple[dict, np.ndarray]:
    """Filter patches [0, n) chunk by chunk into `writer`; return counts and up to 64 rejected examples."""
    counts: dict[str, dict[str, int]] = {}
    rejected_examples = []
    for start in tqdm(range(0, n, chunk), desc=desc, unit="chunk"):
        stop = min(start + chunk, n)
        x, y = fx["x"][start:stop], fy["y"][start:stop].reshape(-1)
        keep, reason = filters.filter_patches(x, **thresholds, chunk_size=chunk)
        writer.append(x[keep], y[keep], group[start:stop][keep], coords[start:stop][keep])
        for label in np.unique(y):
            sel = y == label
            names, num = np.unique(np.where(keep[sel], "kept", reason[sel]), return_counts=True)
            bucket = counts.setdefault(f"label_{label}", {})
            for name, k in zip(names, num, strict=True):
                bucket[name] = bucket.get(name, 0) + int(k)
        if sum(len(r) for r in rejected_examples) < 64:
            rejected_examples.append(x[~keep][:64])
    examples = np.concatenate(rejected_examples)[:64] if rejected_examples else np.empty((0, 96, 96, 3), np.uint8)
    return counts, examples


def copy_unfiltered(fx, fy, group, coords, writer: PatchSetWriter, n: int, chunk: int) -> None:
    """Patches [0, n) into `writer` as they are: the official test split, for a score comparable with
    published PCam results (a filtered test split drops mostly easy near-glass negatives)."""
    for start in tqdm(range(0, n, chunk), desc="copy test_official", unit="chunk"):
        stop = min(start + chunk, n)
        writer.append(fx["x"][start:stop], fy["y"][start:stop].reshape(-1), group[start:stop], coords[start:stop])


def candidates(thresholds: dict) -> list[dict]:
    """Threshold candidates around the configured ones, plus the thesis's preset."""
    grid = [dict(thresholds), dict(filters.THESIS_PRESET)]
    s_lo = (thresholds["saturation_range"] or (0.0, None))[0] or 0.0
    v_hi = (thresholds["value_range"] or (None, 1.0))[1] or 1.0
    for ds in (-0.03, 0.0, 0.03, 0.06):
        for dv in (-0.05, 0.0, 0.03):
            cand = dict(thresholds)
            cand["saturation_range"] = (round(max(0.0, s_lo + ds), 3), None)
            cand["value_range"] = ((thresholds["value_range"] or (None, None))[0], round(min(1.0, v_hi + dv), 3))
            grid.append(cand)
    return grid


def grid_search(cfg: dict, fx, fy, split: str, out: Path, thresholds: dict) -> dict:
    """Score threshold candidates on a seeded sample; contact sheets of kept vs rejected (defaults)."""
    fc = cfg["filter_pcam"]
    n = len(fy["y"])
    rng = np.random.default_rng(cfg["run"]["seed"])
    index = np.sort(rng.choice(n, min(fc["grid_search_samples"], n), replace=False))
    x, y = fx["x"][index], fy["y"][index].reshape(-1)
    junk_file = Path(cfg["data"]["pcam_dir"]) / "demo_junk.json"
    is_junk = None
    if junk_file.is_file():  # known junk indices (the demo) make precision/recall of rejection possible
        junk = json.loads(junk_file.read_text()).get(split, {})
        is_junk = np.isin(index, np.concatenate([np.asarray(v, np.int64) for v in junk.values()] or [[]]))
    results = filters.grid_search(x, is_junk, y, candidates(thresholds))
    for r in results:  # F1 of rejecting junk, where junk is known
        p, q = r.get("precision", float("nan")), r.get("recall", float("nan"))
        r["f1"] = 2 * p * q / (p + q) if p + q > 0 else float("nan")
    # Without known junk every F1 is NaN: any "best" would just be the loosest candidate, so there is none.
    scored = [r for r in results if np.isfinite(r["f1"])]
    best = max(scored, key=lambda r: r["f1"]) if scored else None
    keep, _ = filters.filter_patches(x, **thresholds)
    plots.contact_sheet(out / "grid_kept.png", x[keep][:128])
    plots.contact_sheet(out / "grid_rejected.png", x[~keep][:128])
    write_json(out / "grid_search.json", {"split": split, "n_samples": len(index), "best": best, "results": results})
    print(f"   grid search on {len(index)} {split} patches: {len(results)} candidates")
    if best is not None:
        print(f"   best (max F1 of rejecting junk): {best}")
    else:
        why = f"{junk_file} not found" if is_junk is None else f"no known junk among the sampled {split} patches"
        print(f"   no best candidate: F1 needs known junk ({why}); judge grid_kept.png, grid_rejected.png "
              "and the kept fractions in grid_search.json")
    return {"n_candidates": len(results), "best": best}


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    cfg, _ = cli.start(argv, __doc__, STEP)
    fc = cfg["filter_pcam"]
    pcam_dir = Path(cfg["data"]["pcam_dir"])
    out = begin_step(cfg, STEP)
    thresholds = {k: (tuple(fc[k]) if fc[k] is not None else None)
                  for k in ("hue_range", "saturation_range", "value_range")}
    thresholds["blur_sigma_px"] = fc["blur_sigma_px"]
    cache_dir = pcam.default_cache_dir(cfg)
    print(f"   input {pcam_dir} (a .gz is decompressed once into {cache_dir})\n   thresholds {thresholds}")
    meta = {split: pcam.meta_csv(pcam_dir, split) for split in SPLITS}
    if no_meta := [split for split, path in meta.items() if path is None]:
        print(NO_META.format(splits=", ".join(no_meta), folder=pcam_dir, zenodo=pcam.ZENODO))

    per_split, total_kept, grid = {}, 0, None
    for split in SPLITS:
        fx, fy = open_split(pcam_dir, split, fc["verify_md5"], cache_dir)
        files = [fx.filename, fy.filename]
        with fx, fy:
            n = len(fy["y"]) if fc["max_patches_per_split"] is None else min(len(fy["y"]), fc["max_patches_per_split"])
            group, coords = read_meta(meta[split], n)
            # at most every patch is kept: stop now rather than on a full disk halfway through
            check_free_space(out, n * int(np.prod(fx["x"].shape[1:])), f"the kept patches of the {split} split",
                             "free space there or move run.output_root to a disk with room")
            with PatchSetWriter(out / f"{split}.h5", source="pcam", split=split, mpp=PCAM_MPP,
                                provenance=provenance(cfg, STEP)) as writer:
                counts, rejected = filter_split(fx, fy, group, coords, writer, thresholds, n,
                                                fc["chunk_size"], f"filter {split}")
                kept = writer.n
            plots.contact_sheet(out / f"rejected_{split}.png", rejected)
            if split == "test":
                with PatchSetWriter(out / "test_official.h5", source="pcam", split="test", mpp=PCAM_MPP,
                                    provenance=provenance(cfg, STEP)) as writer:
                    copy_unfiltered(fx, fy, group, coords, writer, n, fc["chunk_size"])
            if fc["grid_search"] and split == "train":
                grid = grid_search(cfg, fx, fy, split, out, thresholds)
        per_split[split] = {"n_in": n, "kept": kept, "rejected": n - kept, "by_label": counts, "files": files,
                            "meta_csv": meta[split], "groups": "slide" if meta[split] else "unknown"}
        total_kept += kept
        print(f"   {split}: kept {kept} / {n}  {json.dumps(counts)}")

    # A split without patches would break every later step that reads it: the whole run fails.
    empty = [split for split, counts in per_split.items() if counts["kept"] == 0]
    outputs = [] if empty else [*(f"{split}.h5" for split in per_split), "test_official.h5"]
    write_summary(out, STEP, cfg, started, splits=per_split, kept=total_kept, thresholds=thresholds,
                  grid_search=grid, outputs=outputs)
    if empty:
        print(f"error: no patch of split {', '.join(empty)} passed the filter; check the filter_pcam thresholds "
              f"against rejected_{empty[0]}.png and the counts in {out / 'summary.json'}", file=sys.stderr)
        return 2
    print(f"   wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
