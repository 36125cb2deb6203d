"""Tasks, leak-free splits, in-memory batches and on-device augmentation for 05, 06 and 07.

A task (one entry of the config's `tasks:`, see config.yaml) names the patch sets it reads, maps each
source's labels to its classes, and says how to split them: `official` (each set keeps its own split),
`grouped` (sets without an official split are split by group, stratified, so that no slide or patient
is in two splits and every split holds every class) or `random` (patches at random, the thesis; one
patient can then sit in train and test), optionally class-balanced to `balanced_size` patches.

The split is written to the experiment folder as `split.csv` (split, file, index, group, source,
label) and read back by 06 and 07, so they see exactly the patches 05 used.
"""

from __future__ import annotations

import csv
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from common.errors import UserError
from common.schema import SPLITS
from common.steps import atomic_path

SPLIT_COLUMNS = ("split", "file", "index", "group", "source", "label")


@dataclass
class Split:
    """One split of a task in memory: x uint8 (N, 96, 96, 3), label int64 (N,), and per patch its
    group, source, the 03 file stem and the index in that file."""

    x: np.ndarray
    label: np.ndarray
    group: np.ndarray
    source: np.ndarray
    file: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def _read_meta(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"patch set not found: {path} (run 03_normalize.py first)")
    with h5py.File(path, "r") as f:
        return f["y"][:].astype(np.int64), f["group"].asstr()[:].astype(str)


def _grouped_assignment(groups: np.ndarray, label: np.ndarray, fractions: list[float],
                        rng: np.random.Generator) -> np.ndarray:
    """Assign whole groups to train/valid/test, stratified by class, so that every split holds every
    class wherever each class has groups enough.

    scikit-learn's StratifiedGroupKFold cuts the groups into folds of about the smallest fraction each
    (fewer where fewer than 3 folds would hold every class), with class mixes as alike as it can make them;
    folds holding every class are dealt first, one to each split, and the rest make up each split's
    share of the folds.

    Returns: str (N,) of split names.
    """
    n_groups = len(np.unique(groups))
    if n_groups < 3:
        raise UserError(f"only {n_groups} group(s) (slides/patients) to split into train, valid and test: "
                        f"a grouped split needs at least 3")
    shares = np.asarray(fractions) / np.sum(fractions)
    seed = int(rng.integers(2**31))
    present = np.unique(label)
    # Fewer folds where too few of them hold every class (single-group folds of one-class groups):
    # coarser fractions, every class in every split.
    for n_folds in range(int(min(max(round(1 / shares.min()), 3), n_groups)), 2, -1):
        folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        fold = np.empty(len(groups), np.int64)
        with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": checked later
            warnings.simplefilter("ignore", UserWarning)
            for k, (_, members) in enumerate(folds.split(np.zeros(len(groups)), label, groups)):
                fold[members] = k
        complete = np.array([np.isin(present, label[fold == k]).all() for k in range(n_folds)])
        if complete.sum() >= 3:
            break
    n_valid, n_test = (max(1, round(f * n_folds)) for f in shares[1:])
    order = rng.permutation(n_folds)
    order = order[np.argsort(~complete[order], kind="stable")]  # folds holding every class first
    names = (["test", "valid", "train"] + ["valid"] * (n_valid - 1) + ["test"] * (n_test - 1))[:n_folds]
    split_of_fold = np.full(n_folds, "train")
    split_of_fold[order[:len(names)]] = names
    return split_of_fold[fold]


def _check_every_class(cols: dict, classes: list[str]) -> None:
    """Raise UserError naming the first split that lacks a class, and how many groups hold that class."""
    for s in SPLITS:
        held = np.unique(cols["label"][cols["split"] == s])
        for k in np.setdiff1d(np.arange(len(classes)), held):
            mine = cols["label"] == k
            n_groups = len(np.unique(np.char.add(cols["source"][mine].astype(str), cols["group"][mine].astype(str))))
            raise UserError(f"the {s} split holds no {classes[k]!r} patch: {int(mine.sum())} patches of it in "
                            f"{n_groups} group(s) (slides/patients) cannot fill train, valid and test (a grouped "
                            f"split needs the class in at least 3 groups; a balanced one enough patches per split)")


def _random_assignment(n: int, fractions: list[float], rng: np.random.Generator) -> np.ndarray:
    bounds = np.cumsum(fractions) / np.sum(fractions)
    return np.array(SPLITS)[np.searchsorted(bounds, rng.random(n), side="right").clip(0, 2)]


def make_split(task: dict, folder: Path, seed: int) -> dict[str, np.ndarray]:
    """Choose the patches of each split for `task` (a validated `tasks.<name>` entry) from the patch
    sets in `folder`.

    Returns: columns split, file, index, group, source, label (the index of the task's class), one
    entry per chosen patch, in set order (balanced tasks: in file order within each set).
    Raises:
        UserError: a split that holds no patch of some class (too few groups or patches of it).
    """
    fractions, policy = task["split_fractions"], task["split"]
    rng = np.random.default_rng(seed)
    parts = []  # (split, file, index, group, source, label) per set; split "" = split by group below
    for stem, spec in task["sets"].items():
        y, g = _read_meta(folder / f"{stem}.h5")
        label = _task_labels(y, spec["labels"], task["classes"], folder / f"{stem}.h5")
        keep = np.flatnonzero(label >= 0)
        if policy == "random":
            sp = _random_assignment(len(keep), fractions, rng)
        else:
            sp = np.full(len(keep), spec.get("split", ""), dtype=object)
        parts.append((sp, np.full(len(keep), stem), keep, g[keep], np.full(len(keep), spec["source"]), label[keep]))
    split, file, index, group, source, label = (np.concatenate(c) for c in zip(*parts, strict=True))
    by_group = split == ""
    if by_group.any():  # groups of different sources are different slides or patients, whatever their names
        qualified = np.char.add(np.char.add(source[by_group].astype(str), "/"), group[by_group].astype(str))
        split[by_group] = _grouped_assignment(qualified, label[by_group], fractions, rng)
    cols = {"split": split.astype(str), "file": file, "index": index, "group": group, "source": source,
            "label": label}
    if task["balanced_size"] is not None:
        take = _balanced_take(cols, len(task["classes"]), task["balanced_size"], fractions, rng)
        cols = {k: v[take] for k, v in cols.items()}
    _check_every_class(cols, task["classes"])
    return cols


def _task_labels(y: np.ndarray, labels: list, classes: list[str], path: Path) -> np.ndarray:
    """int64 (N,) the task's class index of each source label in `y`, -1 where `labels` says null."""
    if len(y) and y.max() >= len(labels):
        raise UserError(f"{path} has source label {int(y.max())}, but its task's labels list gives classes for "
                        f"{len(labels)} labels ({labels})")
    lookup = np.array([-1 if c is None else classes.index(c) for c in labels], dtype=np.int64)
    return lookup[y]


def _even_shares(sizes: np.ndarray, n: int) -> np.ndarray:
    """How many of `n` draws each pool (int (K,) sizes) gives: equal shares where the pools allow it,
    a short pool's deficit taken from the others, a remainder from the last pools."""
    if sizes.sum() <= n:
        return sizes.copy()
    lo, hi = 0, int(sizes.max())
    while lo < hi:  # the highest level t with sum(min(sizes, t)) <= n (a few steps: log2 of the largest pool)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(sizes, mid).sum() <= n else (lo, mid - 1)
    share = np.minimum(sizes, lo)
    above = np.flatnonzero(sizes > lo)
    share[above[len(above) - (n - share.sum()):]] += 1
    return share


def _balanced_take(cols: dict, n_classes: int, size: int, fractions: list[float],
                   rng: np.random.Generator) -> np.ndarray:
    """Sorted rows of `cols`: per split, `size` x its fraction / n_classes patches of each class, each
    class drawn as evenly as possible from the sources that have it (in set order)."""
    split, label, source = cols["split"], cols["label"], cols["source"]
    sources = list(dict.fromkeys(source.tolist()))
    take = []
    for s, fraction in zip(SPLITS, fractions, strict=True):
        n = int(round(size * fraction / sum(fractions) / n_classes))
        for k in range(n_classes):
            pools = [rng.permutation(np.flatnonzero((split == s) & (label == k) & (source == src)))
                     for src in sources if ((label == k) & (source == src)).any()]
            shares = _even_shares(np.array([len(p) for p in pools]), n)
            take += [p[:m] for p, m in zip(pools, shares, strict=True)]
    return np.sort(np.concatenate(take))


def write_split(path: Path, cols: dict[str, np.ndarray]) -> None:
    """Write split columns as CSV (split, file, index, group, source, label)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows(zip(*(cols[c] for c in SPLIT_COLUMNS), strict=True))


def read_split(path: Path) -> dict[str, np.ndarray]:
    """Read the columns written by `write_split`."""
    if not path.is_file():
        raise UserError(f"split not found: {path} (run 05_train.py for this experiment first)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    table = np.array(rows[1:], dtype=str).reshape(-1, len(SPLIT_COLUMNS))
    cols = dict(zip(rows[0], table.T, strict=True))
    cols["index"] = cols["index"].astype(np.int64)
    cols["label"] = cols["label"].astype(np.int64)
    return cols


def load_split(cols: dict[str, np.ndarray], split: str, folder: Path, limit: int | None = None,
               seed: int = 0) -> Split:
    """Read the patches of one split into memory (one sorted read per file).

    Args:
        limit: at most this many patches, a seeded random subset (quick runs).
    """
    chosen = np.flatnonzero(cols["split"] == split)
    if limit is not None and len(chosen) > limit:
        chosen = np.sort(np.random.default_rng(seed).choice(chosen, limit, replace=False))
    if len(chosen) == 0:
        raise UserError(f"the {split} split is empty: too few patches or groups for train.split_fractions")
    file, index = cols["file"][chosen], cols["index"][chosen]
    x = read_patches(folder, file, index)
    return Split(x, cols["label"][chosen].astype(np.int64), cols["group"][chosen], cols["source"][chosen],
                 file, index)


def read_patches(folder: Path, file: np.ndarray, index: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) patches given, per patch, the stem of its patch-set file in `folder` and its
    row in that file; rows are read in file order, in runs of consecutive rows, into the result in the
    order given. A whole file in order (05 on PCam train) is one read straight into the result."""
    x = None
    for stem in np.unique(file):
        at = np.flatnonzero(file == stem)
        at = at[np.argsort(index[at], kind="stable")]
        with h5py.File(folder / f"{stem}.h5", "r") as f:
            if x is None:
                x = np.empty((len(index), *f["x"].shape[1:]), np.uint8)
            rows = index[at]
            in_place = bool((np.diff(at) == 1).all() and (np.diff(rows) > 0).all())
            if in_place:  # consecutive output slots, distinct rows: no buffer, no copy
                _read_rows_into(f["x"], rows, x[at[0]:at[-1] + 1])
            else:
                unique, inverse = np.unique(rows, return_inverse=True)
                buffer = np.empty((len(unique), *x.shape[1:]), np.uint8)
                _read_rows_into(f["x"], unique, buffer)
                x[at] = buffer[inverse]
    return x


def _read_rows_into(dataset: h5py.Dataset, rows: np.ndarray, out: np.ndarray) -> None:
    """Fill C-contiguous out (len(rows), ...) with the dataset's rows at strictly increasing `rows`.

    One read per run of consecutive rows, straight into `out`: h5py's fancy indexing costs ~6 ms a
    row whatever the spacing, and reading a
    dense range whole would hold a second copy of it."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(rows)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):  # one HDF5 read per run
        row = int(rows[start])
        dataset.read_direct(out, np.s_[row:row + end - start], np.s_[start:end])


def mean_std(x: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 (N, H, W, 3) images on the 0-1 scale.

    From per-channel 256-level histograms (OpenCV, chunks of `chunk` images): exact, no float copy of
    the data (float64 squares of PCam train needed ~3.5 GB of scratch and ~160 s). OpenCV counts in
    float32, exact below 2**24 per bin, so a chunk holds at most 2**24 pixels."""
    pixels_per_image = x.shape[1] * x.shape[2]
    chunk = max(1, min(chunk, (1 << 24) // pixels_per_image))
    counts = np.zeros((3, 256), np.int64)
    for start in range(0, len(x), chunk):  # bounded memory: one chunk's histogram at a time
        block = np.ascontiguousarray(x[start:start + chunk]).reshape(-1, 1, 3)
        for c in range(3):
            counts[c] += cv2.calcHist([block], [c], None, [256], [0, 256]).reshape(256).astype(np.int64)
    levels = np.arange(256, dtype=np.float64)
    n = counts.sum(axis=1)
    mean = counts @ levels / n
    var = counts @ levels**2 / n - mean**2
    std = np.sqrt(np.maximum(var, 1e-12))
    return (mean / 255).astype(np.float32), (std / 255).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _dihedral_maps(side_px: int, device: str) -> torch.Tensor:
    """int64 (8, side*side): for each dihedral transform (k quarter turns, then a horizontal flip for
    transforms 4-7), the source pixel of every output pixel, in row-major order."""
    grid = torch.arange(side_px * side_px).view(side_px, side_px)
    views = [torch.rot90(grid, k) for k in range(4)]
    views += [v.flip(1) for v in views]
    return torch.stack([v.reshape(-1) for v in views]).to(device)


def augment(batch: torch.Tensor, generator: torch.Generator, flips: bool, rot90: bool) -> torch.Tensor:
    """Random flips and 90° turns of uint8 (N, H, W, C) patches, each its own, in one gather on the
    batch's device (on uint8, a quarter of the bytes of the float input).

    flips: random horizontal and vertical flips; rot90: random quarter turns. Both: a uniform draw
    from the 8 dihedral transforms. The draws come from `generator` (CPU), so runs are reproducible
    on any device.
    """
    n, h, w, c = batch.shape
    if not (flips or rot90) or n == 0:
        return batch
    if h != w:
        raise ValueError(f"augment needs square patches, got {h}x{w}")
    if rot90:  # uniform over the 8 transforms, or the 4 turns
        transform = torch.randint(0, 8 if flips else 4, (n,), generator=generator)
    else:  # independent horizontal and vertical flips: id 0, horizontal 4, vertical 6, both 2 (a half turn)
        flip_h, flip_v = torch.randint(0, 2, (2, n), generator=generator)
        transform = 2 * flip_v + 4 * (flip_h ^ flip_v)
    maps = _dihedral_maps(h, str(batch.device))[transform.to(batch.device)]  # (N, H*W)
    flat = batch.reshape(n, h * w, c)
    return torch.gather(flat, 1, maps[..., None].expand(-1, -1, c)).view(n, h, w, c)


def dihedral(batch: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral transforms of a (N, C, H, W) batch (test-time augmentation): k quarter turns,
    then the same with a horizontal flip, in the order of `augment`'s transforms."""
    views = [torch.rot90(batch, k, dims=(2, 3)) for k in range(4)]
    return views + [v.flip(3) for v in views]
