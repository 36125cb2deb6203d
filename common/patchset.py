"""Patch sets and step folders: the on-disk contracts shared by every step.

A *patch set* is one HDF5 file:
    x       uint8 (N, 96, 96, 3) RGB, chunked one-patch-row blocks for fast sequential and random reads
    y       uint8 (N,) label within its source (0 negative, 1 positive)
    group   str (N,) slide or patient of each patch (splits are grouped by it)
    coords  int64 (N, 2) level-0 (x, y) of the top-left corner, -1 where unknown
    attrs   source, split, mpp, patch_size, provenance (JSON: step, resolved config, git commit)

Each step writes into `runs/<run.name>/<script stem>/`, every file atomically (temporary name, then
rename), and `summary.json` last.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from common.config import UserError, public

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

    def subset(self, index: np.ndarray) -> PatchSet:
        """The patches at `index` (int or bool array), same attributes."""
        return PatchSet(self.x[index], self.y[index], self.group[index], self.coords[index], dict(self.attrs))


def _file_mode() -> int:
    """The mode a plain `open()` would give a new file under the process umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets the umask's usual mode (e.g. 0644), not mkstemp's owner-only 0600, so results on a
    shared server are readable as any other file written there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
                                provenance=json.dumps(provenance, default=_json_default))
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


# ---------------------------------------------------------------- step folders and provenance


def git_commit() -> str:
    """The current git commit of the code (with '+dirty' when files changed), or 'unknown'."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_dir(cfg: dict) -> Path:
    return Path(cfg["run"]["output_root"]) / cfg["run"]["name"]


def step_dir(cfg: dict, stem: str) -> Path:
    """`runs/<run.name>/<stem>/`, created."""
    path = run_dir(cfg) / stem
    path.mkdir(parents=True, exist_ok=True)
    return path


def begin_step(cfg: dict, stem: str) -> Path:
    """`step_dir` with the step's old `summary.json` removed: until this run writes a new one (last),
    later steps see the step as not run, never as finished over a mix of old and new files."""
    path = step_dir(cfg, stem)
    (path / "summary.json").unlink(missing_ok=True)
    return path


def require_step(cfg: dict, stem: str, outputs: tuple[str, ...] | list[str] = ()) -> Path:
    """The folder of an upstream step, which must have finished (its `summary.json` exists).

    Args:
        cfg: the resolved config.
        stem: the upstream script's stem, e.g. "02_tile_dlbcl".
        outputs: files (relative to that folder) the caller will read; each must be listed in the
            summary's `outputs`, i.e. written by the step's last run (not left over from an older one).
            Summaries without an `outputs` list (older versions) are not checked.

    Raises:
        UserError: naming the script to run first.
    """
    path = run_dir(cfg) / stem
    if not (path / "summary.json").is_file():
        raise UserError(f"{path / 'summary.json'} is missing: run `python {stem}.py` with this config first")
    if outputs:
        written = json.loads((path / "summary.json").read_text()).get("outputs")
        stale = [name for name in outputs if written is not None and name not in written]
        if stale:
            raise UserError(f"{path / stale[0]} was not written by the last run of {stem} (its summary.json "
                            f"does not list it{'; that run failed or skipped it' if written == [] else ''}): "
                            f"rerun `python {stem}.py` with this config")
    return path


def provenance(cfg: dict, step: str) -> dict:
    return {"step": step, "commit": git_commit(), "config": public(cfg)}


def write_summary(folder: Path, step: str, cfg: dict, started: float, **fields) -> dict:
    """Write `summary.json` (last file of a step): counts and results given as fields, plus the
    wall time, the resolved config, the git commit and a `skipped` list (default empty)."""
    summary = {"step": step, "commit": git_commit(), "seconds": round(time.time() - started, 2),
               "skipped": [], **fields, "config": public(cfg)}
    write_json(Path(folder) / "summary.json", summary)
    return summary


def write_experiments_summary(step_folder: Path, step: str, cfg: dict, started: float) -> dict:
    """The step folder's own `summary.json` for steps run once per experiment (05, 06, 07): the
    experiments that have finished there, i.e. whose subfolder holds a `summary.json`."""
    done = sorted(p.parent.name for p in Path(step_folder).glob("*/summary.json"))
    return write_summary(step_folder, step, cfg, started, experiments=done)
