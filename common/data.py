"""Tasks, leak-free splits, in-memory batches and on-device augmentation for 05, 06 and 07.

Tasks (`train.task`):
    pcam   binary, PCam's official train/valid/test splits (no slide is in two of them);
    dlbcl  binary, patients split train/valid/test by `train.split_fractions`;
    mixed  3 classes — 0 negative (both sources), 1 breast metastasis (PCam positive),
           2 lymphoma (DLBCL positive) — `train.mixed_size` patches, class-balanced, negatives half
           from each source; PCam keeps its official splits, DLBCL is split by patient.
`train.split: random` instead splits patches at random (the thesis; one patient can then sit in
train and test).

The split is written to the experiment folder as `split.csv` (split, file, index, group, source,
label) and read back by 06 and 07, so they see exactly the patches 05 used.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch

from common.config import UserError
from common.steps import atomic_path

CLASS_NAMES = {
    "pcam": ["negative", "metastasis"],
    "dlbcl": ["negative", "lymphoma"],
    "mixed": ["negative", "breast", "lymphoma"],
}
SPLITS = ("train", "valid", "test")
# the patch sets 03 writes per method
SET_STEMS = ("pcam_train", "pcam_valid", "pcam_test", "pcam_test_official", "dlbcl")
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


def _grouped_assignment(groups: np.ndarray, fractions: list[float], rng: np.random.Generator) -> np.ndarray:
    """Assign whole groups to train/valid/test so that patch counts approach `fractions`.

    Returns: str (N,) of split names.
    """
    names, counts = np.unique(groups, return_counts=True)
    order = rng.permutation(len(names))
    cum = np.cumsum(counts[order]) / counts.sum()
    bounds = np.cumsum(fractions) / np.sum(fractions)
    # the group whose patches straddle a boundary goes to the split holding its midpoint
    mid = cum - counts[order] / counts.sum() / 2
    which = np.searchsorted(bounds, mid, side="right").clip(0, 2)
    # every split needs at least one group where there are enough groups
    if len(names) >= 3:
        for s in range(3):
            if not np.any(which == s):
                donor = np.argmax(np.bincount(which, minlength=3))
                which[np.flatnonzero(which == donor)[-1 if s > donor else 0]] = s
    split_of_group = dict(zip(names[order], np.array(SPLITS)[which], strict=True))
    return np.array([split_of_group[g] for g in groups])


def _random_assignment(n: int, fractions: list[float], rng: np.random.Generator) -> np.ndarray:
    bounds = np.cumsum(fractions) / np.sum(fractions)
    return np.array(SPLITS)[np.searchsorted(bounds, rng.random(n), side="right").clip(0, 2)]


def make_split(task: str, folder: Path, split_mode: str, fractions: list[float], mixed_size: int,
               seed: int) -> dict[str, np.ndarray]:
    """Choose the patches of each split for `task` from the 03 patch sets in `folder`.

    Returns: columns split, file, index, group, source, label (label in the task's classes), one
    entry per chosen patch.
    """
    if task not in CLASS_NAMES:
        raise UserError(f"unknown task {task!r}; expected one of {', '.join(CLASS_NAMES)}")
    if len(fractions) != 3 or min(fractions) <= 0:
        raise UserError(f"config key train.split_fractions = {fractions} must be three positive numbers")
    rng = np.random.default_rng(seed)
    parts = []  # (split, file, index, group, label-within-source) per source file
    if task in ("pcam", "mixed"):
        for s in SPLITS:
            y, g = _read_meta(folder / f"pcam_{s}.h5")
            official = np.full(len(y), s)
            sp = official if (task == "pcam" or split_mode == "grouped") else _random_assignment(len(y), fractions, rng)
            parts.append((sp, np.full(len(y), f"pcam_{s}"), np.arange(len(y)), g, y))
    if task in ("dlbcl", "mixed"):
        y, g = _read_meta(folder / "dlbcl.h5")
        sp = (_grouped_assignment(g, fractions, rng) if split_mode == "grouped"
              else _random_assignment(len(y), fractions, rng))
        parts.append((sp, np.full(len(y), "dlbcl"), np.arange(len(y)), g, y))
    split, file, index, group, y = (np.concatenate(c) for c in zip(*parts, strict=True))
    source = np.where(np.char.startswith(file.astype(str), "pcam"), "pcam", "dlbcl")
    cols = {"split": split, "file": file, "index": index, "group": group, "source": source, "label": y}
    if task != "mixed":
        return cols

    # mixed: 0 negative (both sources), 1 PCam positive, 2 DLBCL positive; balanced within each split
    label = np.where(y == 0, 0, np.where(source == "pcam", 1, 2))
    per_class = {s: int(round(mixed_size * f / sum(fractions) / 3)) for s, f in zip(SPLITS, fractions, strict=True)}
    take = []
    for s in SPLITS:
        n = per_class[s]
        for cls in (1, 2):
            pool = np.flatnonzero((split == s) & (label == cls))
            take.append(rng.permutation(pool)[:n])
        neg = {src: rng.permutation(np.flatnonzero((split == s) & (label == 0) & (source == src)))
               for src in ("pcam", "dlbcl")}
        want_pcam = max(n // 2, n - len(neg["dlbcl"]))  # one source short: the other fills in
        take += [neg["pcam"][:want_pcam], neg["dlbcl"][: n - min(want_pcam, len(neg["pcam"]))]]
    take = np.sort(np.concatenate(take))
    return {**{k: v[take] for k, v in cols.items()}, "label": label[take]}


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
    row whatever the spacing (measured: 4,000 scattered rows 25 s, vs 0.3 s this way), and reading a
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
