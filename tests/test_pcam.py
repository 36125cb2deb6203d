"""common/pcam.py and 01 on the PCam layouts people download: the official files (plain or `.h5.gz`, also
in a read-only folder), torchvision's root without meta CSVs; the decompression cache and its failures."""

import builtins
import errno
import gzip
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from common import cli, pcam, steps
from common.demo import write_demo_pcam
from tests.conftest import load_script
from tests.test_filter_script import PREFIX, SPLITS, config_args, read_summary

NAMES = [f"{PREFIX}{split}_{kind}.h5" for split in SPLITS for kind in ("x", "y")]


def write_pcam(folder: Path, gzip_files: bool = False, meta: bool = True) -> Path:
    write_demo_pcam(folder, {"train": 24, "valid": 8, "test": 8}, seed=3, gzip_files=gzip_files)
    if not meta:
        for split in SPLITS:
            (folder / f"{PREFIX}{split}_meta.csv").unlink()
    return folder


@pytest.fixture(scope="module")
def filter_script():
    return load_script("01_filter_pcam")


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only for this process, root included (chmod does not stop root): writing,
    creating or renaming anything inside them fails with EROFS, as on a read-only dataset mount."""
    folders: list[Path] = []
    real_open, real_replace, real_mkstemp = builtins.open, os.replace, steps.tempfile.mkstemp

    def inside(path) -> bool:
        return any(Path(os.path.abspath(path)).is_relative_to(folder) for folder in folders)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and set(mode) & set("wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_replace(src, dst, *args, **kwargs):
        if inside(dst):
            refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    def guarded_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and inside(dir):
            refuse(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "replace", guarded_replace)
    monkeypatch.setattr(steps.tempfile, "mkstemp", guarded_mkstemp)

    def add(folder: Path) -> Path:
        folders.append(folder.resolve())
        folder.chmod(0o555)  # what a non-root user would meet as well
        return folder

    yield add
    for folder in folders:
        folder.chmod(0o755)


def run_01(script, tmp_path: Path, pcam_dir: Path, capsys, *extra: str) -> tuple[int, str, str]:
    """Run 01 as the command line does: (exit status, stdout, stderr)."""
    status = cli.run(script.main, config_args(tmp_path, pcam_dir) + list(extra))
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------- the official .h5.gz, read-only


def test_read_only_gz_folder_decompresses_once_into_the_cache(tmp_path, filter_script, capsys, read_only):
    pcam_dir = write_pcam(tmp_path / "pcam", gzip_files=True)
    before = listing(pcam_dir)
    read_only(pcam_dir)
    status, out, _ = run_01(filter_script, tmp_path, pcam_dir, capsys)
    assert status == 0
    assert listing(pcam_dir) == before  # nothing written beside the input
    cache = tmp_path / "runs" / "cache" / "pcam"  # default: under run.output_root
    assert sorted(p.name for p in cache.iterdir()) == sorted([*NAMES, *(f"{n}.source.json" for n in NAMES)])
    for name in NAMES:  # byte-identical copies of what the .gz holds
        with gzip.open(pcam_dir / f"{name}.gz", "rb") as f:
            assert (cache / name).read_bytes() == f.read()
    assert out.count("decompressing ") == 6
    summary = read_summary(tmp_path)
    assert summary["splits"]["train"]["files"] == [str(cache / NAMES[0]), str(cache / NAMES[1])]
    assert summary["splits"]["train"]["groups"] == "slide"

    # the next run reuses the copies: no decompression, files untouched
    cached = listing(cache)
    status, out, _ = run_01(filter_script, tmp_path, pcam_dir, capsys)
    assert status == 0 and "decompressing " not in out and out.count("using the decompressed copy") == 6
    assert listing(cache) == cached


def test_a_changed_gz_is_decompressed_again(tmp_path, filter_script, capsys):
    pcam_dir = write_pcam(tmp_path / "pcam", gzip_files=True)
    assert run_01(filter_script, tmp_path, pcam_dir, capsys)[0] == 0
    gz = pcam_dir / f"{PREFIX}valid_y.h5.gz"
    with h5py.File(tmp_path / "y.h5", "w") as f:  # a new download with other labels
        f.create_dataset("y", data=np.ones((8, 1, 1, 1), np.uint8))
    with open(tmp_path / "y.h5", "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    status, out, _ = run_01(filter_script, tmp_path, pcam_dir, capsys)
    assert status == 0 and out.count("decompressing ") == 1 and f"decompressing {gz} -> " in out
    with h5py.File(tmp_path / "runs" / "t" / "01_filter_pcam" / "valid.h5") as f:
        assert (f["y"][:] == 1).all() and len(f["y"]) > 0


def test_cache_dir_from_the_config(tmp_path, filter_script, capsys):
    pcam_dir = write_pcam(tmp_path / "pcam", gzip_files=True)
    status, _, _ = run_01(filter_script, tmp_path, pcam_dir, capsys, "--set", f"data.cache_dir={tmp_path / 'c'}")
    assert status == 0 and sorted(p.name for p in (tmp_path / "c").glob("*.h5")) == sorted(NAMES)
    assert not (tmp_path / "runs" / "cache").exists()


def test_unusable_cache_dir_is_one_line_exit_2(tmp_path, filter_script, capsys):
    pcam_dir = write_pcam(tmp_path / "pcam", gzip_files=True)
    (tmp_path / "file").write_text("not a folder")
    status, _, err = run_01(filter_script, tmp_path, pcam_dir, capsys, "--set",
                            f"data.cache_dir={tmp_path / 'file' / 'cache'}")
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        f"error: cannot use {tmp_path / 'file' / 'cache'} as the cache for decompressed PCam files (Not a "
        "directory); set data.cache_dir to a writable folder")


def test_read_only_cache_is_one_line_exit_2(tmp_path, filter_script, capsys, read_only):
    pcam_dir = write_pcam(tmp_path / "pcam", gzip_files=True)
    cache = tmp_path / "ro"
    cache.mkdir()
    read_only(cache)
    status, _, err = run_01(filter_script, tmp_path, pcam_dir, capsys, "--set", f"data.cache_dir={cache}")
    assert status == 2
    assert err.strip().splitlines() == [
        f"error: cannot decompress {PREFIX}train_x.h5.gz: Read-only file system writing to {cache}; set "
        "data.cache_dir to a writable folder with room, or decompress it yourself (gunzip -k)"]


def test_too_little_space_stops_before_decompressing(tmp_path, filter_script, capsys, monkeypatch):
    pcam_dir = write_pcam(tmp_path / "pcam", gzip_files=True)
    need = pcam.decompressed_size(pcam_dir / f"{NAMES[0]}.gz")
    assert need == (tmp_path / "x.h5").write_bytes(gzip.decompress((pcam_dir / f"{NAMES[0]}.gz").read_bytes()))
    monkeypatch.setattr(steps.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, need))
    status, out, err = run_01(filter_script, tmp_path, pcam_dir, capsys)
    assert status == 2 and "decompressing " not in out
    cache = tmp_path / "runs" / "cache" / "pcam"
    assert err.strip().splitlines() == [
        f"error: not enough disk space in {cache} for the decompressed {NAMES[0]}.gz: needs about "
        f"{need / 1e9:.1f} GB, {need / 1e9:.1f} GB free; free space there, set data.cache_dir to a folder with "
        "room, or decompress it yourself (gunzip -k) and point data.pcam_dir at the .h5"]
    assert list(cache.iterdir()) == []


def test_a_failing_cleanup_does_not_hide_the_reason(tmp_path, monkeypatch):
    gz = write_pcam(tmp_path / "pcam", gzip_files=True) / f"{NAMES[0]}.gz"

    class FullDisk:  # the decompressed stream cannot be written: ENOSPC
        def __init__(self, *args, **kwargs):
            self.fileobj = open(gz, "rb")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fileobj.close()

        def read(self, size):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache" / "x.part"))

    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):  # removing the partial copy fails too
        if self.name.endswith(".part"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pcam.gzip, "open", FullDisk)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(pcam.PCamError) as error:
        pcam.cached_copy(gz, tmp_path / "cache")
    assert str(error.value) == (f"cannot decompress {gz.name}: No space left on device writing to "
                                f"{tmp_path / 'cache'}; set data.cache_dir to a writable folder with room, or "
                                "decompress it yourself (gunzip -k)")


def test_decompressed_size_unwraps_the_32_bit_trailer(tmp_path):
    # PCam's train_x: 262,144 patches of 96 x 96 x 3 bytes, 7.25 GB, more than gzip's 32-bit ISIZE holds.
    # A sparse stand-in of a plausible compressed size whose last 4 bytes are that trailer.
    true_size = 7_247_757_312 + 2_144
    fake = tmp_path / "train_x.h5.gz"
    with open(fake, "wb") as f:
        f.truncate(5_500_000_000 - 4)
        f.seek(0, os.SEEK_END)
        f.write((true_size % 2**32).to_bytes(4, "little"))
    assert pcam.decompressed_size(fake) == true_size
    small = tmp_path / "y.gz"
    small.write_bytes(gzip.compress(bytes(1000)))
    assert pcam.decompressed_size(small) == 1000
    truncated = tmp_path / "t.gz"
    truncated.write_bytes(gzip.compress(np.random.default_rng(0).bytes(5000))[:100] + b"\xff\xff\xff\xff")
    assert pcam.decompressed_size(truncated) == 1032 * 104  # garbage trailer: deflate's ratio bounds it


# ---------------------------------------------------------------- torchvision's layout, no meta CSVs


def test_torchvision_root_without_meta_csvs(tmp_path, filter_script, capsys):
    root = tmp_path / "tv"
    write_pcam(root / "pcam", meta=False)  # as torchvision.datasets.PCAM(root, download=True) leaves it
    (root / "pcam" / "demo_junk.csv").unlink()
    status, out, _ = run_01(filter_script, tmp_path, root, capsys)
    assert status == 0
    notes = [line for line in out.splitlines() if "no meta CSV" in line]
    assert notes == [  # said once, for all splits: what is lost and where to get the CSVs
        f"   note: no meta CSV (camelyonpatch_level_2_split_<split>_meta.csv) for split train, valid, test in "
        f"{root}: its patches get group 'unknown' and coords -1. Lost: the slide grouping, so 06 reports "
        "patch-level confidence intervals instead of slide-level ones (patches of one slide are correlated: "
        "patch-level intervals are too narrow); the official splits themselves stay slide-disjoint. The CSVs "
        "are on Zenodo only (https://zenodo.org/records/2546921; torchvision's PCAM never downloads them): put "
        f"them in {root} and rerun 01."]
    assert "decompressing" not in out and not (tmp_path / "runs" / "cache").exists()
    summary = read_summary(tmp_path)
    for split in SPLITS:
        assert summary["splits"][split]["groups"] == "unknown" and summary["splits"][split]["meta_csv"] is None
        assert summary["splits"][split]["files"][0] == str(root / "pcam" / f"{PREFIX}{split}_x.h5")
        with h5py.File(tmp_path / "runs" / "t" / "01_filter_pcam" / f"{split}.h5") as f:
            assert len(f["group"]) == summary["splits"][split]["kept"] > 0
            assert set(f["group"].asstr()[:]) == {"unknown"} and (f["coords"][:] == -1).all()


def test_meta_csvs_beside_a_torchvision_root_give_slide_groups(tmp_path, filter_script, capsys):
    root = tmp_path / "tv"
    write_pcam(root / "pcam")
    for split in SPLITS:  # the CSVs fetched from Zenodo and put in the root
        (root / "pcam" / f"{PREFIX}{split}_meta.csv").rename(root / f"{PREFIX}{split}_meta.csv")
    status, out, _ = run_01(filter_script, tmp_path, root, capsys)
    assert status == 0 and "no meta CSV" not in out
    with h5py.File(tmp_path / "runs" / "t" / "01_filter_pcam" / "test.h5") as f:
        assert all(g.startswith("camelyon16_test_") for g in f["group"].asstr()[:])
    assert json.loads((tmp_path / "runs" / "t" / "01_filter_pcam" / "summary.json").read_text()
                      )["splits"]["test"]["meta_csv"] == str(root / f"{PREFIX}test_meta.csv")


def test_missing_file_names_both_layouts(tmp_path, filter_script, capsys):
    pcam_dir = write_pcam(tmp_path / "pcam")
    (pcam_dir / f"{PREFIX}valid_x.h5").unlink()
    status, _, err = run_01(filter_script, tmp_path, pcam_dir, capsys)
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        f"error: PCam file not found: {PREFIX}valid_x.h5 (or {PREFIX}valid_x.h5.gz) in {pcam_dir} (official "
        f"layout) or {pcam_dir / 'pcam'} (torchvision's); download it from https://zenodo.org/records/2546921 "
        "(see the README)")


def test_too_little_space_for_the_kept_patches_stops_before_writing(tmp_path, filter_script, capsys, monkeypatch):
    pcam_dir = write_pcam(tmp_path / "pcam")
    need = 24 * 96 * 96 * 3  # the 24 train patches, if all are kept
    monkeypatch.setattr(steps.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, need))
    status, _, err = run_01(filter_script, tmp_path, pcam_dir, capsys)
    out = tmp_path / "runs" / "t" / "01_filter_pcam"
    assert status == 2
    assert err.strip().splitlines() == [
        f"error: not enough disk space in {out} for the kept patches of the train split: needs about 0.0 GB, "
        "0.0 GB free; free space there or move run.output_root to a disk with room"]
    assert not (out / "train.h5").exists()
