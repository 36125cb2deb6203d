"""Patch sets: the one on-disk format every step reads and writes.

A *patch set* is one HDF5 file:
    x       uint8 (N, 96, 96, 3) RGB, chunked one-patch-row blocks for fast sequential and random reads
    y       uint8 (N,) label within its source (0 negative, 1 positive)
    group   str (N,) slide or patient of each patch (splits are grouped by it)
    coords  int64 (N, 2) level-0 (x, y) of the top-left corner, -1 where unknown
    attrs   source, split, mpp, patch_size, provenance (JSON: step, resolved config, git commit)

Step folders, summaries and atomic writes are in `common/steps.py`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from common.errors import UserError
from common.steps import atomic_path, json_default

STR_DTYPE = h5py.string_dtype("utf-8")


@dataclass
class PatchSet:
    """A patch set in memory (see the module docstring for the fields)."""

    x: np.ndarray
    y: np.ndarray
    group: np.ndarray
    coords: np.ndarray
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)



class PatchSetWriter:
    """Append patches chunk by chunk to a new patch set; the file appears atomically on `close()`.

    Usage:
        with PatchSetWriter(path, source="pcam", split="train", mpp=0.972, provenance=prov) as w:
            w.append(x_chunk, y_chunk, group_chunk, coords_chunk)
    """

    def __init__(self, path: str | Path, *, source: str, split: str, mpp: float, provenance: dict,
                 patch_size_px: int = 96):
        self.path = Path(path)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._file = h5py.File(self._tmp, "w")
        p = patch_size_px
        self._x = self._file.create_dataset("x", (0, p, p, 3), np.uint8, maxshape=(None, p, p, 3),
                                            chunks=(64, p, p, 3))
        self._y = self._file.create_dataset("y", (0,), np.uint8, maxshape=(None,), chunks=(4096,))
        self._g = self._file.create_dataset("group", (0,), STR_DTYPE, maxshape=(None,), chunks=(4096,))
        self._c = self._file.create_dataset("coords", (0, 2), np.int64, maxshape=(None, 2), chunks=(4096, 2))
        self._file.attrs.update(source=source, split=split, mpp=float(mpp), patch_size=p,
                                provenance=json.dumps(provenance, default=json_default))
        self.n = 0

    def append(self, x: np.ndarray, y: np.ndarray, group, coords: np.ndarray | None = None) -> None:
        """Append uint8 (K, P, P, 3) patches with labels (K,), groups (K,) and coords (K, 2) or None."""
        k = len(x)
        if k == 0:
            return
        if coords is None:
            coords = np.full((k, 2), -1, np.int64)
        if not (len(y) == len(group) == len(coords) == k):
            raise ValueError("x, y, group and coords must have the same length")
        for ds in (self._x, self._y, self._g, self._c):
            ds.resize(self.n + k, axis=0)
        self._x[self.n:] = x
        self._y[self.n:] = y
        self._g[self.n:] = np.asarray(group, dtype=object)
        self._c[self.n:] = coords
        self.n += k

    def close(self) -> None:
        self._file.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> PatchSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_patch_set(path: str | Path, ps: PatchSet) -> None:
    """Write a whole in-memory patch set atomically (attrs: source, split, mpp, provenance)."""
    a = ps.attrs
    with PatchSetWriter(path, source=a.get("source", ""), split=a.get("split", ""), mpp=a.get("mpp", -1.0),
                        provenance=a.get("provenance", {}), patch_size_px=ps.x.shape[1]) as w:
        w.append(ps.x, ps.y, ps.group, ps.coords)


def read_patch_set(path: str | Path) -> PatchSet:
    """Load a whole patch set into memory.

    Raises:
        UserError: the file is missing or lacks the patch-set keys.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"patch set not found: {path}")
    with h5py.File(path, "r") as f:
        missing = [k for k in ("x", "y", "group", "coords") if k not in f]
        if missing:
            raise UserError(f"{path} is not a patch set: missing dataset(s) {', '.join(missing)}")
        attrs = dict(f.attrs)
        attrs["provenance"] = json.loads(attrs.get("provenance", "{}"))
        return PatchSet(f["x"][:], f["y"][:], f["group"].asstr()[:].astype(str), f["coords"][:], attrs)


