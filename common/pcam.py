"""Finding the PatchCamelyon files in the layouts people download; `.gz` decompressed once into a cache.

`data.pcam_dir` may be any of:
- the official release (Zenodo record 2546921, or its Google Drive folder): the six
  `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5.gz` (or already decompressed `.h5`) and the
  three `camelyonpatch_level_2_split_{split}_meta.csv` in one folder;
- torchvision's root (`torchvision.datasets.PCAM(root, download=True)`): the six decompressed `.h5`
  (and their `.gz`) in `<root>/pcam/`, and no meta CSVs (torchvision never fetches them).

A `.h5` found there is read in place. A `.h5.gz` without its `.h5` is decompressed into the cache
folder (`data.cache_dir`, default `<run.output_root>/cache/pcam`), never beside the input, which may be
a read-only dataset mount; the next run reuses the copy while the `.gz` keeps its size and
modification time (recorded in `<file>.h5.source.json` beside the copy).

Usage:
    h5 = locate(pcam_dir, "train", "x", cache_dir)     # Path of a readable .h5
    csv = meta_csv(pcam_dir, "train")                  # Path, or None without the meta CSV
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import zlib
from pathlib import Path

from tqdm import tqdm

from common.errors import UserError
from common.steps import check_free_space, write_json

PREFIX = "camelyonpatch_level_2_split_"
ZENODO = "https://zenodo.org/records/2546921"


class PCamError(UserError):
    """A PCam file is missing, corrupt or cannot be decompressed."""


def folders(pcam_dir: Path) -> list[Path]:
    """Where the files may be: `pcam_dir` itself (official layout) and its `pcam/` (torchvision's)."""
    return [pcam_dir, pcam_dir / "pcam"]


def meta_csv(pcam_dir: Path, split: str) -> Path | None:
    """The split's meta CSV (`wsi` = slide of each patch, level-0 coordinates), or None if absent."""
    return next((path for folder in folders(pcam_dir) if (path := folder / f"{PREFIX}{split}_meta.csv").is_file()),
                None)


def default_cache_dir(cfg: dict) -> Path:
    """`data.cache_dir`, or `<run.output_root>/cache/pcam` when it is null."""
    return Path(cfg["data"]["cache_dir"] or Path(cfg["run"]["output_root"]) / "cache" / "pcam")


def locate(pcam_dir: Path, split: str, kind: str, cache_dir: Path) -> Path:
    """The `.h5` of one split and kind (`x` or `y`): in place, or a cached copy of its `.h5.gz`.

    Raises:
        PCamError: neither file exists (naming the layouts searched), or the `.gz` cannot be decompressed.
    """
    name = f"{PREFIX}{split}_{kind}.h5"
    for folder in folders(pcam_dir):
        if (folder / name).is_file():
            return folder / name
    for folder in folders(pcam_dir):
        if (folder / f"{name}.gz").is_file():
            return cached_copy(folder / f"{name}.gz", cache_dir)
    raise PCamError(f"PCam file not found: {name} (or {name}.gz) in {pcam_dir} (official layout) or "
                    f"{pcam_dir / 'pcam'} (torchvision's); download it from {ZENODO} (see the README)")


def decompressed_size(gz: Path) -> int:
    """Bytes the `.gz` will decompress to, from its trailer, read without decompressing.

    gzip records the size modulo 2**32 (ISIZE); PCam's 7.25 GB train_x wraps. PCam's pixels compress
    less than 2x, so the estimate is the smallest ISIZE + k * 2**32 not below the compressed size:
    exact for every PCam file. Deflate cannot compress more than 1032:1, which bounds the estimate of
    a truncated download (whose last bytes are no trailer).
    """
    size = gz.stat().st_size
    with open(gz, "rb") as f:
        f.seek(max(0, size - 4))
        isize = int.from_bytes(f.read(4), "little")
    return min(isize + max(0, -(-(size - isize) // 2**32)) * 2**32, 1032 * size)


def _stamp(gz: Path) -> dict:
    stat = gz.stat()
    return {"source": str(gz.resolve()), "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cached_copy(gz: Path, cache_dir: Path) -> Path:
    """`cache_dir/<name>.h5`, decompressed from `gz` unless a copy of this very `.gz` is already there.

    Checks the free space first; any failure is one PCamError line, and a partial copy is removed
    (a failure to remove it never hides the reason).
    """
    h5 = cache_dir / gz.name.removesuffix(".gz")
    stamp = h5.with_name(h5.name + ".source.json")
    with contextlib.suppress(OSError, ValueError):
        if h5.is_file() and json.loads(stamp.read_text()) == _stamp(gz):
            print(f"   {gz.name}: using the decompressed copy {h5}")
            return h5
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in (stamp, h5):  # a copy of another or an older .gz, or one without its record
            stale.unlink(missing_ok=True)
    except OSError as exc:
        raise PCamError(f"cannot use {cache_dir} as the cache for decompressed PCam files ({exc.strerror or exc}); "
                        "set data.cache_dir to a writable folder") from exc
    check_free_space(cache_dir, decompressed_size(gz), f"the decompressed {gz.name}",
                     "free space there, set data.cache_dir to a folder with room, or decompress it yourself "
                     "(gunzip -k) and point data.pcam_dir at the .h5")
    print(f"   decompressing {gz} -> {h5} (once; later runs reuse it) ...")
    part = h5.with_name(f".{h5.name}.part")
    try:
        with gzip.open(gz, "rb") as src, open(part, "wb") as dst, tqdm(
            total=gz.stat().st_size, unit="B", unit_scale=True, desc=gz.name, leave=False
        ) as bar:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
                bar.n = src.fileobj.tell()
                bar.refresh()
        os.replace(part, h5)
        write_json(stamp, _stamp(gz))
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise PCamError(f"cannot decompress {gz}: {exc} (truncated or corrupt download); delete it and "
                        "download it again") from exc
    except OSError as exc:  # the cache's disk filled up, the .gz is unreadable, ...
        where = f"reading {gz}" if exc.filename == str(gz) else f"writing to {cache_dir}"
        raise PCamError(f"cannot decompress {gz.name}: {exc.strerror or exc} {where}; set data.cache_dir to "
                        "a writable folder with room, or decompress it yourself (gunzip -k)") from exc
    finally:
        with contextlib.suppress(OSError):  # a failed run must not leave up to 7.3 GB behind
            part.unlink(missing_ok=True)
    return h5
