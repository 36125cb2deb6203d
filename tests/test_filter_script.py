"""01_filter_pcam as a whole: it always writes all three splits, lists them in summary.json with counts per
rejection reason and the kept patches' brightness, draws its figures, a split that keeps no patch fails,
broken input files are one line and exit 2, and the grid search works with and without a known-junk CSV."""

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import yaml

from common import cli, filters, plots
from common.demo import write_demo_pcam
from common.patchset import read_patch_set
from common.schema import SPLITS
from tests.conftest import ROOT, load_script

PREFIX = "camelyonpatch_level_2_split_"


@pytest.fixture(scope="module")
def filter_script():
    return load_script("01_filter_pcam")


def write_pcam(folder: Path, gzip_files: bool = False, junk_fraction: float = 0.06) -> Path:
    write_demo_pcam(folder, {"train": 24, "valid": 8, "test": 8}, seed=3, gzip_files=gzip_files,
                    junk_fraction=junk_fraction)
    return folder


def config_args(tmp_path: Path, pcam_dir: Path, **filter_pcam) -> list[str]:
    config = {"base": str(ROOT / "configs" / "demo.yaml"),
              "run": {"name": "t", "output_root": str(tmp_path / "runs")},
              "data": {"pcam_dir": str(pcam_dir)}, "filter_pcam": filter_pcam}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return ["--config", str(tmp_path / "c.yaml")]


def read_summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "t" / "01_filter_pcam" / "summary.json").read_text())


def test_outputs_counts_per_reason_brightness_and_figures(tmp_path, filter_script, capsys):
    pcam = write_pcam(tmp_path / "pcam", junk_fraction=0.5)
    assert filter_script.main(config_args(tmp_path, pcam)) == 0
    summary = read_summary(tmp_path)
    assert summary["outputs"] == ["train.h5", "valid.h5", "test.h5", "test_official.h5"]
    # the whole official test split, unfiltered, in the input's order: what 06 scores as the PCam benchmark
    with h5py.File(tmp_path / "pcam" / "camelyonpatch_level_2_split_test_x.h5", "r") as f:
        official_x = f["x"][:]
    official = read_patch_set(tmp_path / "runs" / "t" / "01_filter_pcam" / "test_official.h5")
    np.testing.assert_array_equal(official.x, official_x)
    assert len(official) == summary["splits"]["test"]["n_in"] == 8
    out = tmp_path / "runs" / "t" / "01_filter_pcam"
    with h5py.File(pcam / f"{PREFIX}train_x.h5") as f:
        x = f["x"][:]
    _, reason = filters.filter_patches(x, **filters.DEFAULT_THRESHOLDS)
    train = summary["splits"]["train"]
    # The demo's junk is 1/3 glass, 1/3 IHC, 1/3 blurred: 4 of each among 24 patches.
    assert train["rejected_by_reason"] == {"low_saturation": 4, "ihc_like": 4, "out_of_focus": 4}
    assert train["rejected_by_reason"] == {r: int((reason == r).sum()) for r in set(reason) - {""}}
    with h5py.File(out / "train.h5") as f:
        kept_value = filters.hsv_means(f["x"][:])[:, 2]
    assert train["kept_mean_value"] == filters.brightness_summary(kept_value)
    assert train["kept_mean_value"]["n"] == train["kept"] == 12
    assert "train: kept 12 / 24; rejected by reason: low_saturation 4, ihc_like 4, out_of_focus 4" in (
        capsys.readouterr().out)
    for split in SPLITS:
        assert (out / f"rejected_{split}.png").stat().st_size > 0 and (out / f"kept_{split}.png").stat().st_size > 0


def read_png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_example_rows_draws_one_row_per_group(tmp_path):
    rng = np.random.default_rng(0)
    rows = [("low_saturation: 3 of 10 patches (30.0%)", rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)),
            ("ihc_like: 1 of 10 patches (10.0%)", np.full((1, 96, 96, 3), (150, 100, 50), np.uint8))]
    one = read_png(plots.example_rows(tmp_path / "one.png", "title", rows[:1]))
    two = read_png(plots.example_rows(tmp_path / "two.png", "title", rows))
    assert two.shape[0] > one.shape[0] + 80  # a second row of 96 px patches
    assert (np.abs(two.astype(int) - (150, 100, 50)).sum(axis=2) < 6).sum() > 50 * 50  # the brown patch is drawn
    empty = plots.example_rows(tmp_path / "empty.png", "nothing", [("no patch rejected", np.zeros((0, 96, 96, 3)))])
    assert empty.stat().st_size > 0


def test_threshold_sheet_marks_the_threshold_between_rejected_and_kept(tmp_path):
    rejected = np.full((2, 32, 32, 3), (0, 0, 255), np.uint8)
    kept = np.full((3, 32, 32, 3), (0, 255, 0), np.uint8)
    image = read_png(plots.threshold_sheet(tmp_path / "s.png", "sweep", [("a = 1", rejected, kept),
                                                                         ("a = 2", rejected[:0], kept[:1])]))
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
    columns = np.flatnonzero(red.sum(axis=0) > 20)  # the vertical line
    blue = np.flatnonzero(((image[..., 2] > 200) & (image[..., 1] < 60)).any(axis=0))
    green = np.flatnonzero(((image[..., 1] > 200) & (image[..., 0] < 60)).any(axis=0))
    assert len(columns) and blue.max() < columns.min() and green.min() > columns.max()


def grid_json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "t" / "01_filter_pcam" / "grid_search.json").read_text())


def test_grid_search_scores_against_a_junk_csv(tmp_path, filter_script):
    pcam = write_pcam(tmp_path / "pcam", junk_fraction=0.25)
    args = config_args(tmp_path, pcam, grid_search=True, grid_search_samples=24,
                       junk_csv=str(pcam / "demo_junk.csv"))
    assert filter_script.main(args) == 0
    grid = grid_json(tmp_path)
    assert grid["split"] == "train" and grid["n_samples"] == 24  # on train only, as config.yaml says
    assert grid["n_known_junk"] == 6
    configured = grid["results"][0]
    assert configured["knob"] == "configured" and configured["f1"] == 1.0  # the demo's junk, all of it
    f1 = np.array([r["f1"] if r["f1"] is not None else np.nan for r in grid["results"]])
    assert grid["best"]["f1"] == np.nanmax(f1) and read_summary(tmp_path)["grid_search"]["best"] == grid["best"]
    # Each configured threshold swept alone, five values around it, one contact sheet each.
    knobs = ["saturation_lo", "value_lo", "hue_lo", "hue_hi", "max_brown_fraction", "min_laplacian_var"]
    assert [r["knob"] for r in grid["results"][2:]] == [k for k in knobs for _ in range(5)]
    for knob in knobs:
        assert (tmp_path / "runs" / "t" / "01_filter_pcam" / f"grid_{knob}.png").is_file()
    # The demo's blurred patches lie far below the focus threshold: a 4x lower one still catches them all.
    lap = {r["value"]: r for r in grid["results"] if r["knob"] == "min_laplacian_var"}
    assert lap[0.0014]["recall"] == 1.0 and lap[0.00035]["recall"] == 1.0


def test_grid_search_without_junk_csv_has_kept_fractions_sheets_and_no_best(tmp_path, filter_script, capsys):
    pcam = write_pcam(tmp_path / "pcam")  # as real PCam: nothing says which patches are junk
    assert filter_script.main(config_args(tmp_path, pcam, grid_search=True, grid_search_samples=24,
                                          junk_csv=None)) == 0
    grid = grid_json(tmp_path)
    assert grid["best"] is None and grid["n_known_junk"] is None
    assert all("f1" not in r and set(r["kept_fraction_by_label"]) == {"0", "1"} for r in grid["results"])
    assert read_summary(tmp_path)["grid_search"] == {"n_candidates": 32, "best": None}
    assert "no best candidate: F1 needs known junk (no filter_pcam.junk_csv given)" in capsys.readouterr().out
    assert (tmp_path / "runs" / "t" / "01_filter_pcam" / "grid_min_laplacian_var.png").is_file()


def test_bad_junk_csv_is_one_line_and_exit_2(tmp_path, filter_script, capsys):
    pcam = write_pcam(tmp_path / "pcam")
    (tmp_path / "junk.csv").write_text("split,index,kind\ntrain,24,blur\n")
    args = config_args(tmp_path, pcam, grid_search=True, grid_search_samples=24, junk_csv=str(tmp_path / "junk.csv"))
    assert cli.run(filter_script.main, args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'junk.csv'} line 2: index '24' is not a patch index of the train split (0..23)")


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
