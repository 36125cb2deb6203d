"""Step plumbing: step folders, `summary.json`, provenance, atomic writes, upstream checks, disk space.

Each step writes into `runs/<run.name>/<script stem>/`, every file atomically (temporary name, then
rename), and `summary.json` last: a later step that finds no `summary.json` upstream sees the step as
not run, never as finished over a mix of old and new files. JSON is strict (`null`, never `NaN`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from common.config import public
from common.errors import UserError

GB = 1e9


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
    """Write `obj` as indented, strict JSON, atomically: NaN and infinities become `null` (bare `NaN`
    is not JSON, and strict readers such as `jq` or JavaScript reject the whole file)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json_text(obj, indent=2) + "\n")


def json_text(obj, indent: int | None = None) -> str:
    """`obj` as strict JSON text (NaN and infinities as `null`; numpy values and paths converted)."""
    return json.dumps(_finite(obj), indent=indent, default=json_default, allow_nan=False)


def _finite(obj):
    """`obj` with every non-finite float (also in numpy scalars and arrays) replaced by None."""
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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


def check_free_space(folder: str | Path, needed_bytes: float, what: str, advice: str = "") -> None:
    """Stop before writing when `folder` (or the nearest existing parent) has less free space than
    `needed_bytes` plus a 5 % margin.

    Raises:
        UserError: naming what would be written, the space needed and available in GB, and `advice`.
    """
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed_bytes * 1.05 > free:
        raise UserError(f"not enough disk space in {folder} for {what}: needs about {needed_bytes / GB:.1f} GB, "
                        f"{free / GB:.1f} GB free" + (f"; {advice}" if advice else ""))
