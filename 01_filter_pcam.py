"""01 · Quality-filter PatchCamelyon: keep sharp H&E tissue, drop glass, IHC (DAB) and out-of-focus patches.

Tests per patch (common/filters.py, thresholds in filter_pcam): mean HSV hue, saturation and value after a
light blur (thesis §5.1.2), the fraction of brown tissue pixels (ihc_like) and the variance of the grey
Laplacian (out_of_focus).

Reads (data.pcam_dir), the official release as downloaded, or torchvision's root (files in its pcam/):
    camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5  (or .h5.gz, decompressed once into
                                                              data.cache_dir; see common/pcam.py)
    camelyonpatch_level_2_split_{split}_meta.csv             (optional: `wsi` becomes each patch's group;
                                                              without it every group is 'unknown')
Writes (runs/<run>/01_filter_pcam/):
    {train,valid,test}.h5      patch sets of the kept patches: always all three splits, which 03 reads
    test_official.h5           the whole official test split, unfiltered: 06 scores the PCam benchmark on it
                               from this step's last run
    rejected_<split>.png       a row of examples per rejection reason, with its count
    kept_<split>.png           a row of kept examples per label
    grid_search.json, grid_<threshold>.png   (filter_pcam.grid_search: true) each threshold swept alone on
                               filter_pcam.grid_search_samples train patches: kept fraction per label,
                               precision/recall against filter_pcam.junk_csv when given, and per value the
                               patches just rejected and just kept
    summary.json               per split: kept / rejected counts by label and reason, the mean-V
                               distribution of the kept patches, the files read, the meta CSV and `groups`
                               (slide, or unknown without it); `outputs` lists the patch sets this run
                               wrote (none when it failed: a split kept no patch, exit 2)

Usage:
    python 01_filter_pcam.py --config config.yaml [--set filter_pcam.max_patches_per_split=1000]
"""

from __future__ import annotations

import csv
import hashlib
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from common import cli, filter_search, filters, pcam, plots
from common.errors import UserError
from common.patchset import PatchSetWriter
from common.schema import SPLITS
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

EXAMPLES_PER_ROW = 8  # patches per row in rejected_<split>.png and kept_<split>.png


def filter_split(fx, fy, group, coords, writer: PatchSetWriter, thresholds: dict, n: int, chunk: int,
                 desc: str) -> dict:
    """Filter patches [0, n) chunk by chunk into `writer`.

    Returns counts {label_<y>: {kept | <reason>: n}}, the mean V of every kept patch (float32), and the
    first EXAMPLES_PER_ROW examples per rejection reason and per label among the kept.
    """
    counts: dict[str, dict[str, int]] = {}
    kept_value, rejected_examples, kept_examples = [], {}, {}
    for start in tqdm(range(0, n, chunk), desc=desc, unit="chunk"):
        stop = min(start + chunk, n)
        x, y = fx["x"][start:stop], fy["y"][start:stop].reshape(-1)
        measures = filters.patch_measures(x, thresholds["blur_sigma_px"], chunk)
        keep, reason = filters.keep_from_means(measures, **thresholds)
        writer.append(x[keep], y[keep], group[start:stop][keep], coords[start:stop][keep])
        kept_value.append(measures[keep, 2])
        for label in np.unique(y):
            sel = y == label
            names, num = np.unique(np.where(keep[sel], "kept", reason[sel]), return_counts=True)
            bucket = counts.setdefault(f"label_{label}", {})
            for name, k in zip(names, num, strict=True):
                bucket[name] = bucket.get(name, 0) + int(k)
            add_examples(kept_examples, int(label), x[sel & keep])
        for name in np.unique(reason[~keep]):
            add_examples(rejected_examples, str(name), x[reason == name])
    return {"counts": counts, "kept_value": np.concatenate([np.zeros(0, np.float32), *kept_value]),
            "rejected_examples": rejected_examples, "kept_examples": kept_examples}


def copy_unfiltered(fx, fy, group, coords, writer: PatchSetWriter, n: int, chunk: int) -> None:
    """Patches [0, n) into `writer` as they are: the official test split, for a score comparable with
    published PCam results (a filtered test split drops mostly easy near-glass negatives)."""
    for start in tqdm(range(0, n, chunk), desc="copy test_official", unit="chunk"):
        stop = min(start + chunk, n)
        writer.append(fx["x"][start:stop], fy["y"][start:stop].reshape(-1), group[start:stop], coords[start:stop])


def add_examples(store: dict, key, images: np.ndarray) -> None:
    """Top up store[key] (a list of patches) to EXAMPLES_PER_ROW from `images`."""
    have = store.setdefault(key, [])
    have += list(images[:EXAMPLES_PER_ROW - len(have)])


def rejected_by_reason(counts: dict) -> dict[str, int]:
    """Totals per rejection reason over the labels, in REJECT_REASONS order; reasons with no patch left out."""
    total = {r: sum(bucket.get(r, 0) for bucket in counts.values()) for r in filters.REJECT_REASONS}
    return {r: k for r, k in total.items() if k}


def example_figures(out: Path, split: str, n: int, result: dict, by_reason: dict[str, int]) -> None:
    """rejected_<split>.png: a row per reason with its count; kept_<split>.png: a row per label."""
    rows = [(f"{reason}: {k} of {n} patches ({k / n:.1%})", np.array(result["rejected_examples"][reason]))
            for reason, k in by_reason.items()]
    plots.example_rows(out / f"rejected_{split}.png",
                       f"01 · PCam {split}: rejected patches, first {EXAMPLES_PER_ROW} per reason",
                       rows or [(f"no patch rejected (of {n})", np.zeros((0, 96, 96, 3), np.uint8))])
    rows = [(f"label {label}: kept {result['counts'][f'label_{label}'].get('kept', 0)} patches", np.array(images))
            for label, images in sorted(result["kept_examples"].items())]
    plots.example_rows(out / f"kept_{split}.png", f"01 · PCam {split}: kept patches, first {EXAMPLES_PER_ROW} "
                       "per label", rows or [("no patch kept", np.zeros((0, 96, 96, 3), np.uint8))])


# ---------------------------------------------------------------- grid search

SWEEP_PER_ROW = 6  # patches on each side of a threshold in the grid_<knob>.png sheets


def read_junk(path: Path, split: str, n: int) -> np.ndarray:
    """bool (n,): True for the patches of `split` listed in a known-junk CSV with columns split,index."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise UserError(f"cannot read filter_pcam.junk_csv {path}: {exc.strerror or exc}") from exc
    if rows and not {"split", "index"} <= set(rows[0]):
        raise UserError(f"{path}: need columns split,index (and optionally kind), got {', '.join(rows[0])}")
    index = []
    for line, row in enumerate(rows, start=2):
        if row["split"] != split:
            continue
        if not (row["index"] or "").strip().isdigit() or int(row["index"]) >= n:
            raise UserError(f"{path} line {line}: index {row['index']!r} is not a patch index of the {split} "
                            f"split (0..{n - 1})")
        index.append(int(row["index"]))
    mask = np.zeros(n, bool)
    mask[index] = True
    return mask


def grid_search(cfg: dict, fx, fy, split: str, out: Path, thresholds: dict) -> dict:
    """Sweep each configured threshold alone on a seeded sample: kept fraction per label, precision/recall
    of rejecting known junk (filter_pcam.junk_csv), and a sheet of the patches either side of each value."""
    fc = cfg["filter_pcam"]
    n = len(fy["y"])
    rng = np.random.default_rng(cfg["run"]["seed"])
    index = np.sort(rng.choice(n, min(fc["grid_search_samples"], n), replace=False))
    x, y = fx["x"][index], fy["y"][index].reshape(-1)
    is_junk = None if fc["junk_csv"] is None else read_junk(Path(fc["junk_csv"]), split, n)[index]
    measures = filters.patch_measures(x, thresholds["blur_sigma_px"])
    candidates, sheets = [dict(thresholds), dict(filters.THESIS_PRESET)], []
    tags = [{"knob": "configured", "value": None}, {"knob": "thesis_preset", "value": None}]
    for key, end, column, steps in filter_search.SWEEPS:
        current = thresholds[key] if end is None or thresholds[key] is None else thresholds[key][end]
        if current is None:
            continue  # this limit is off: nothing to sweep around
        values = sorted({round(current * s if key.startswith("min_") else float(np.clip(current + s, 0, 1)), 6)
                         for s in steps} | {current})
        eligible, _ = filters.keep_from_means(measures, **filter_search.with_value(thresholds, key, end, None))
        rows = []
        for value in values:
            candidate = filter_search.with_value(thresholds, key, end, value)
            candidates.append(candidate)
            tags.append({"knob": filter_search.knob_name(key, end), "value": value})
            distance = filter_search.margin(measures, key, end, column, value)
            inside, outside = filter_search.borderline(distance, eligible, SWEEP_PER_ROW)
            kept = filters.keep_from_means(measures, **candidate)[0].mean()
            mark = " (configured)" if value == current else ""
            rows.append((f"{filter_search.knob_name(key, end)} = {value:g}{mark}: {kept:.1%} of the sample kept",
                         x[outside], x[inside]))
        sheets.append(plots.threshold_sheet(
            out / f"grid_{filter_search.knob_name(key, end)}.png",
            f"01 · grid search on {len(index)} PCam {split} patches: {filter_search.knob_name(key, end)} "
            "(others as configured)", rows))
    results = [{**tag, **row} for tag, row in
               zip(tags, filter_search.grid_search(measures, candidates, labels=y, is_junk=is_junk), strict=True)]
    # Without known junk there is no F1: any "best" would just be the loosest candidate, so there is none.
    scored = [r for r in results if np.isfinite(r.get("f1", float("nan")))]
    best = max(scored, key=lambda r: r["f1"]) if scored else None
    write_json(out / "grid_search.json", {"split": split, "n_samples": len(index), "junk_csv": fc["junk_csv"],
                                          "n_known_junk": None if is_junk is None else int(is_junk.sum()),
                                          "best": best, "results": results})
    print(f"   grid search on {len(index)} {split} patches: {len(results)} candidates, "
          f"{len(sheets)} sheets (grid_<threshold>.png)")
    if best is not None:
        which = best["knob"] if best["value"] is None else f"{best['knob']} = {best['value']:g}"
        print(f"   best (max F1 of rejecting known junk): {which}, F1 {best['f1']:.3f}, "
              f"kept {best['kept_fraction']:.1%}")
    else:
        why = "no filter_pcam.junk_csv given" if is_junk is None else f"no known junk among the sampled {split} patches"
        print(f"   no best candidate: F1 needs known junk ({why}); choose by eye from the grid_<threshold>.png "
              "sheets and the kept fractions per label in grid_search.json")
    return {"n_candidates": len(results), "best": best}


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    cfg, _ = cli.start(argv, __doc__, STEP)
    fc = cfg["filter_pcam"]
    pcam_dir = Path(cfg["data"]["pcam_dir"])
    out = begin_step(cfg, STEP)
    thresholds = filters.thresholds_from_config(fc)
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
                result = filter_split(fx, fy, group, coords, writer, thresholds, n, fc["chunk_size"],
                                      f"filter {split}")
                kept = writer.n
            by_reason = rejected_by_reason(result["counts"])
            example_figures(out, split, n, result, by_reason)
            if split == "test":
                with PatchSetWriter(out / "test_official.h5", source="pcam", split="test", mpp=PCAM_MPP,
                                    provenance=provenance(cfg, STEP)) as writer:
                    copy_unfiltered(fx, fy, group, coords, writer, n, fc["chunk_size"])
            if fc["grid_search"] and split == "train":
                grid = grid_search(cfg, fx, fy, split, out, thresholds)
        brightness = filters.brightness_summary(result["kept_value"])
        per_split[split] = {"n_in": n, "kept": kept, "rejected": n - kept, "rejected_by_reason": by_reason,
                            "by_label": result["counts"], "kept_mean_value": brightness, "files": files,
                            "meta_csv": meta[split], "groups": "slide" if meta[split] else "unknown"}
        total_kept += kept
        reasons = ", ".join(f"{r} {k}" for r, k in by_reason.items()) or "none"
        print(f"   {split}: kept {kept} / {n}; rejected by reason: {reasons}; kept mean V p5/p50/p95 "
              f"{brightness['p5']}/{brightness['p50']}/{brightness['p95']}")

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
