"""01_filter_pcam as a whole: it always writes all three splits, lists them in summary.json, a split that keeps
no patch fails, broken input files are one line and exit 2, and no grid-search "best" without junk labels."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from common import cli
from common.demo import write_demo_pcam
from common.patchset import read_patch_set
from tests.conftest import ROOT, load_script

SPLITS = ("train", "valid", "test")
PREFIX = "camelyonpatch_level_2_split_"


@pytest.fixture(scope="module")
def filter_script():
    return load_script("01_filter_pcam")


def write_pcam(folder: Path, gzip_files: bool = False) -> Path:
    write_demo_pcam(folder, {"train": 24, "valid": 8, "test": 8}, seed=3, gzip_files=gzip_files)
    return folder


def config_args(tmp_path: Path, pcam_dir: Path, **filter_pcam) -> list[str]:
    config = {"base": str(ROOT / "configs" / "demo.yaml"),
              "run": {"name": "t", "output_root": str(tmp_path / "runs")},
              "data": {"pcam_dir": str(pcam_dir)}, "filter_pcam": filter_pcam}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return ["--config", str(tmp_path / "c.yaml")]


def read_summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "t" / "01_filter_pcam" / "summary.json").read_text())


def test_outputs_and_grid_search_best_with_junk_labels(tmp_path, filter_script):
    args = config_args(tmp_path, write_pcam(tmp_path / "pcam"), grid_search=True, grid_search_samples=24)
    assert filter_script.main(args) == 0
    summary = read_summary(tmp_path)
    assert summary["outputs"] == ["train.h5", "valid.h5", "test.h5", "test_official.h5"]
    # the whole official test split, unfiltered, in the input's order: what 06 scores as the PCam benchmark
    with h5py.File(tmp_path / "pcam" / "camelyonpatch_level_2_split_test_x.h5", "r") as f:
        official_x = f["x"][:]
    official = read_patch_set(tmp_path / "runs" / "t" / "01_filter_pcam" / "test_official.h5")
    np.testing.assert_array_equal(official.x, official_x)
    assert len(official) == summary["splits"]["test"]["n_in"] == 8
    grid = json.loads((tmp_path / "runs" / "t" / "01_filter_pcam" / "grid_search.json").read_text())
    assert grid["split"] == "train" and grid["n_samples"] == 24  # on train only, as config.yaml says
    f1 = np.array([r["f1"] for r in grid["results"]])
    assert np.isfinite(f1).any()  # the demo's junk labels make F1 defined
    assert grid["best"]["f1"] == np.nanmax(f1) and summary["grid_search"]["best"] == grid["best"]


def test_grid_search_without_junk_labels_has_no_best(tmp_path, filter_script, capsys):
    pcam = write_pcam(tmp_path / "pcam")
    (pcam / "demo_junk.json").unlink()  # real PCam: nothing says which patches are junk
    assert filter_script.main(config_args(tmp_path, pcam, grid_search=True, grid_search_samples=24)) == 0
    grid = json.loads((tmp_path / "runs" / "t" / "01_filter_pcam" / "grid_search.json").read_text())
    assert all(r["f1"] is None for r in grid["results"]) and len(grid["results"]) == 14
    assert grid["best"] is None and read_summary(tmp_path)["grid_search"] == {"n_candidates": 14, "best": None}
    assert f"no best candidate: F1 needs known junk ({pcam / 'demo_junk.json'} not found)" in capsys.readouterr().out


def test_a_split_that_keeps_no_patch_fails_naming_it(tmp_path, filter_script, capsys):
    pcam = write_pcam(tmp_path / "pcam")
    with h5py.File(pcam / f"{PREFIX}valid_x.h5", "w") as f:  # blank glass only: everything is rejected
        f.create_dataset("x", data=np.full((8, 96, 96, 3), 240, np.uint8))
    assert filter_script.main(config_args(tmp_path, pcam)) == 2  # nothing usable left: a data problem
    summary = read_summary(tmp_path)
    assert summary["outputs"] == []
    assert summary["splits"]["valid"]["kept"] == 0 and summary["splits"]["train"]["kept"] > 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: no patch of split valid passed the filter")


def run_01(filter_script, tmp_path: Path, pcam: Path, capsys) -> tuple[int, str]:
    """Run 01 as the command line does; (exit status, last stderr line)."""
    status = cli.run(filter_script.main, config_args(tmp_path, pcam))
    return status, capsys.readouterr().err.strip().splitlines()[-1]


def test_a_subset_of_splits_is_refused(tmp_path, filter_script, capsys):
    # 03 needs all three splits from 01's last run, so 01 has no `splits` key to leave one out
    args = config_args(tmp_path, tmp_path / "pcam") + ["--set", "filter_pcam.splits=[train]"]
    assert cli.run(filter_script.main, args) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: unknown config key filter_pcam.splits"]
    assert not (tmp_path / "runs").exists()


def test_corrupt_h5_is_one_line_and_exit_2(tmp_path, filter_script, capsys):
    pcam = write_pcam(tmp_path / "pcam")
    (pcam / f"{PREFIX}train_y.h5").write_bytes(b"<html>rate limited</html>" * 40)
    status, line = run_01(filter_script, tmp_path, pcam, capsys)
    assert status == 2
    assert line.startswith(f"error: cannot open {pcam / f'{PREFIX}train_y.h5'} as HDF5 (")
    assert "file signature not found" in line


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_broken_h5_gz_is_one_line_exit_2_and_leaves_no_part(tmp_path, filter_script, capsys, damage):
    pcam = write_pcam(tmp_path / "pcam", gzip_files=True)
    gz = pcam / f"{PREFIX}train_x.h5.gz"
    data = bytearray(gz.read_bytes())
    if damage == "truncated":  # an interrupted download
        data = data[:len(data) // 2]
    else:  # bit rot in the deflate stream (zlib.error) or a CRC mismatch (BadGzipFile)
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    gz.write_bytes(bytes(data))
    status, line = run_01(filter_script, tmp_path, pcam, capsys)
    assert status == 2 and line.startswith(f"error: cannot decompress {gz}: ")
    assert line.endswith("delete it and download it again")
    cache = tmp_path / "runs" / "cache" / "pcam"  # the default data.cache_dir
    assert sorted(p.name for p in cache.iterdir()) == []  # no partial copy left behind
    assert not (pcam / f"{PREFIX}train_x.h5").exists()
