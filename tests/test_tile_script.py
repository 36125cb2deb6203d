"""02_tile_dlbcl as a whole: stain selection, bad rows and slides skipped with reasons, the patch set."""

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import yaml

from common import cli, filters
from common.demo import write_demo_dlbcl
from common.errors import UserError
from common.patchset import read_patch_set
from common.slide_io import _resize_batch
from tests.conftest import ROOT, load_script


def run_02_demo_config(tile_script, tmp_path: Path, **tile_dlbcl) -> int:
    """02's exit status with the demo config on tmp_path/dlbcl, one worker (and `tile_dlbcl` keys), into
    tmp_path/runs/t."""
    config = {"base": str(ROOT / "configs" / "demo.yaml"),
              "run": {"name": "t", "output_root": str(tmp_path / "runs")},
              "data": {"dlbcl_dir": str(tmp_path / "dlbcl")}, "tile_dlbcl": {"workers": 1, **tile_dlbcl}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return cli.run(tile_script.main, ["--config", str(tmp_path / "c.yaml")])


@pytest.fixture(scope="module")
def tile_script():
    return load_script("02_tile_dlbcl")


def test_bad_rows_and_slides_are_skipped_and_named(tmp_path: Path, tile_script):
    write_demo_dlbcl(tmp_path / "dlbcl", n_slides=1, cores_per_slide=2, seed=5, workers=1)
    tma = tmp_path / "dlbcl" / "TMA"
    shutil.copy(tma / "HE" / "TA101.svs", tma / "HE" / "TA102.svs")
    (tma / "HE" / "TA103.svs").write_bytes(b"not a slide")
    good = [r for r in (tma / "annotations.csv").read_text().splitlines()[1:] if ",HE," in r]
    extra = [
        "1,TA101,HE,10,10,oops,20",          # malformed
        "2,TA101,HE,500,500,400,900",        # xs >= xe
        "3,TA101,HE,900000,900000,900500,900500",  # outside the slide
        "4,TA999,HE,0,0,500,500",            # no such slide file
        "5,TA103,HE,0,0,500,500",            # unreadable slide
        "6,TA102,CD10,0,0,500,500",          # another stain: ignored, not skipped
    ]
    (tma / "annotations.csv").write_text("\n".join(["patient_id,tma_id,stain,xs,ys,xe,ye", *good, *extra]) + "\n")
    assert run_02_demo_config(tile_script, tmp_path) == 0

    out = tmp_path / "runs" / "t" / "02_tile_dlbcl"
    summary = json.loads((out / "summary.json").read_text())
    reasons = sorted((s["item"], s["reason"]) for s in summary["skipped"])
    assert ("annotations.csv row " + str(len(good) + 2), "malformed_row") in reasons
    # the kept patches' brightness, over what is written (after the balance trim)
    with h5py.File(out / "dlbcl.h5") as f:
        kept_value = filters.hsv_means(f["x"][:])[:, 2]
    assert summary["n_positive_dropped_by_balance"] > 0  # the brightness covers what is left after the trim
    assert summary["kept_mean_value"] == filters.brightness_summary(kept_value)
    assert ("slide TA999", "missing_slide") in reasons and ("slide TA103", "slide_error") in reasons
    counts = {}
    for s in summary["skipped"]:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    assert counts == {"malformed_row": 1, "missing_slide": 1, "slide_error": 1, "roi_empty": 1,
                      "roi_outside_slide": 1}
    assert [s["slide"] for s in summary["slides"]] == ["TA101"]  # TA102 has only a CD10 row: never opened
    ps = read_patch_set(out / "dlbcl.h5")
    assert len(ps) == summary["n_patches"] > 0 and ps.x.shape[1:] == (96, 96, 3)
    assert (np.bincount(ps.y) == summary["n_patches"] // 2).all()  # balanced 50/50
    # The slide has 65 lymphoma patches but only 59 usable negatives: 6 lymphoma dropped at random.
    assert summary["slides"][0]["patches_kept"] == 65 + 59 and summary["n_positive_dropped_by_balance"] == 6
    assert ps.attrs["mpp"] == pytest.approx(0.972) and set(ps.group) <= {r.split(",")[0] for r in good}
    assert (out / "overview" / "TA101.png").is_file()
    assert summary["outputs"] == ["dlbcl.h5"]


def test_zero_patches_is_a_failure_with_a_summary(tmp_path: Path, tile_script):
    tma = tmp_path / "dlbcl" / "TMA"
    tma.mkdir(parents=True)
    (tma / "annotations.csv").write_text("patient_id,tma_id,stain,xs,ys,xe,ye\n1,TA1,HE,0,0,500,500\n")
    assert run_02_demo_config(tile_script, tmp_path) == 2
    summary = json.loads((tmp_path / "runs" / "t" / "02_tile_dlbcl" / "summary.json").read_text())
    assert summary["n_patches"] == 0 and summary["skipped"][0]["reason"] == "missing_slide"
    assert summary["outputs"] == []


# ---------------------------------------------------------------- a class with no patch, hidden causes


@pytest.fixture(scope="module")
def demo_dlbcl(tmp_path_factory) -> Path:
    """One demo slide, TA101 (5248 x 2928 px at 0.5 um/px), with two HE ROIs of patient 71177."""
    folder = tmp_path_factory.mktemp("dlbcl") / "dlbcl"
    write_demo_dlbcl(folder, n_slides=1, cores_per_slide=2, seed=5, workers=1)
    return folder


def run_02(tile_script, tmp_path: Path, demo_dlbcl: Path, rows: list[str], **tile_dlbcl) -> tuple[int, Path]:
    """Copy the demo, replace annotations.csv by `rows` and run 02; (exit status, step folder)."""
    shutil.copytree(demo_dlbcl, tmp_path / "dlbcl")
    (tmp_path / "dlbcl" / "TMA" / "annotations.csv").write_text(
        "\n".join(["patient_id,tma_id,stain,xs,ys,xe,ye", *rows]) + "\n")
    config = {"base": str(ROOT / "configs" / "demo.yaml"),
              "run": {"name": "t", "output_root": str(tmp_path / "runs")},
              "data": {"dlbcl_dir": str(tmp_path / "dlbcl")}, "tile_dlbcl": {"workers": 1, **tile_dlbcl}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    status = cli.run(tile_script.main, ["--config", str(tmp_path / "c.yaml")])
    return status, tmp_path / "runs" / "t" / "02_tile_dlbcl"


def last_error_line(capsys) -> str:
    """The final line on stderr (progress bars share it)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_no_lymphoma_patch_fails_naming_the_class_and_reasons(tmp_path, tile_script, demo_dlbcl, capsys):
    outside = ["71177,TA101,HE,900000,900000,900500,900500", "71177,TA101,HE,800000,0,800500,500"]
    status, out = run_02(tile_script, tmp_path, demo_dlbcl, outside, balance=False)
    assert status == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == [] and summary["n_patches"] == 0 and not list(out.glob("*.h5*"))
    assert summary["found"]["lymphoma"] == 0 and summary["found"]["negative"] > 0  # negatives alone: no patch set
    error = last_error_line(capsys)
    assert error.startswith(f"error: no lymphoma patches (0 lymphoma, {summary['found']['negative']} negative "
                            "from 1 of 1 slides); top reasons: roi_outside_slide 2")
    assert summary["error"] in error


def test_no_negative_patch_fails_unless_negatives_are_off(tmp_path, tile_script, demo_dlbcl, capsys):
    whole_slide = ["71177,TA101,HE,0,0,5248,2928"]  # every grid cell touches the ROI: no negative candidate
    status, out = run_02(tile_script, tmp_path / "on", demo_dlbcl, whole_slide)
    summary = json.loads((out / "summary.json").read_text())
    assert status == 2 and summary["outputs"] == [] and summary["found"]["negative"] == 0
    assert summary["found"]["lymphoma"] > 0
    assert last_error_line(capsys).startswith("error: no negative patches (")

    status, out = run_02(tile_script, tmp_path / "off", demo_dlbcl, whole_slide, negatives="none")
    summary = json.loads((out / "summary.json").read_text())
    assert status == 0 and summary["outputs"] == ["dlbcl.h5"]
    ps = read_patch_set(out / "dlbcl.h5")
    assert len(ps) == summary["n_patches"] > 0 and (ps.y == 1).all()


def test_missing_slides_name_the_path_looked_for(tmp_path, tile_script, demo_dlbcl, capsys):
    shutil.copytree(demo_dlbcl, tmp_path / "src")
    (tmp_path / "src" / "TMA" / "HE").rename(tmp_path / "src" / "TMA" / "H_E")  # the CSV still says HE
    status, out = run_02(tile_script, tmp_path, tmp_path / "src", ["71177,TA101,HE,833,676,1772,1947"])
    assert status == 2
    tma = tmp_path / "dlbcl" / "TMA"
    assert last_error_line(capsys).startswith(
        "error: no lymphoma patches (0 lymphoma, 0 negative from 0 of 1 slides); top reasons: "
        f"missing_slide 1; 1 of 1 slides missing, looked for {tma / 'HE' / '<tma_id>.svs'} "
        f"(folders in {tma}: H_E)")


def test_unknown_stain_lists_the_stains_present(tmp_path, tile_script, demo_dlbcl, capsys):
    rows = ["71177,TA101,H&E,833,676,1772,1947", "71177,TA101,H&E,3193,658,4218,1965",
            "71177,TA101,CD10,873,716,1812,1987"]
    assert run_02(tile_script, tmp_path, demo_dlbcl, rows)[0] == 2
    csv_path = tmp_path / "dlbcl" / "TMA" / "annotations.csv"
    assert last_error_line(capsys) == (f"error: {csv_path} has no rows with stain 'HE' (tile_dlbcl.stain); "
                                       "stains present: 'H&E' (2 rows), 'CD10' (1 rows)")


def test_blank_rows_are_ignored_not_malformed(tmp_path, tile_script):
    path = tmp_path / "annotations.csv"
    path.write_text("patient_id,tma_id,stain,xs,ys,xe,ye\n1,TA1,HE,0,0,10,10\n\n,,,,,,\n  , ,\n2,TA1,HE,0,0,x,10\n\n")
    by_slide, skipped, stains = tile_script.read_annotations(path, "HE")
    assert by_slide == {"TA1": [(2, "1", (0, 0, 10, 10))]}
    assert [(s["item"], s["reason"]) for s in skipped] == [("annotations.csv row 6", "malformed_row")]
    assert stains == {"HE": 1}


def test_annotation_columns_are_found_by_name(tmp_path, tile_script):
    """Any column order, case and spaces, pat_id for patient_id, extra columns (a pandas index) ignored."""
    reference = tmp_path / "reference.csv"
    reference.write_text("patient_id,tma_id,stain,xs,ys,xe,ye\n7,TA1,HE,10,20,110,220\n8,TA2,HE,1,2,3,4\n")
    expected = tile_script.read_annotations(reference, "HE")
    assert expected[0] == {"TA1": [(2, "7", (10, 20, 110, 220))], "TA2": [(3, "8", (1, 2, 3, 4))]}
    variants = {
        "reordered": "tma_id,stain,patient_id,ys,xs,ye,xe\nTA1,HE,7,20,10,220,110\nTA2,HE,8,2,1,4,3\n",
        "pandas_index": ",patient_id,tma_id,stain,xs,ys,xe,ye\n0,7,TA1,HE,10,20,110,220\n1,8,TA2,HE,1,2,3,4\n",
        "names": " Pat_ID ,TMA id,Stain,XS,Ys , xe,YE,comment\n7,TA1,HE,10,20,110,220,ok\n8,TA2,HE,1,2,3,4,\n",
    }
    for name, text in variants.items():
        (tmp_path / f"{name}.csv").write_text(text)
        assert tile_script.read_annotations(tmp_path / f"{name}.csv", "HE") == expected, name


def test_a_missing_annotation_column_is_one_line_naming_expected_and_found(tmp_path, tile_script):
    path = tmp_path / "annotations.csv"
    path.write_text("patient,tma_id,stain,xs,ys,xe\n7,TA1,HE,10,20,110\n")
    with pytest.raises(UserError) as error:
        tile_script.read_annotations(path, "HE")
    assert str(error.value) == (
        f"{path}: no 'patient_id' column; no 'ye' column; expected a header row with the columns "
        "patient_id or pat_id, tma_id, stain, xs, ys, xe, ye (any order, case and spaces ignored), "
        "found: 'patient', 'tma_id', 'stain', 'xs', 'ys', 'xe'")
    path.write_text("1,TA1,HE,0,0,500,500\n")  # no header row
    with pytest.raises(UserError, match=r"no 'patient_id' column; no 'tma_id' column.*found: '1', 'TA1', 'HE'"):
        tile_script.read_annotations(path, "HE")


def test_every_slide_without_mpp_is_exit_2_with_advice_that_fits_the_slide(tmp_path, tile_script, capsys):
    """The real TCGA fixture (Aperio, 4443 x 3567 px, no mpp, no objective power) as the only slide."""
    tma = tmp_path / "dlbcl" / "TMA"
    (tma / "HE").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "slides" / "tcga-cr-7395-01a-01-ts1.svs", tma / "HE" / "TA1.svs")
    (tma / "annotations.csv").write_text("patient_id,tma_id,stain,xs,ys,xe,ye\n7,TA1,HE,1500,1000,2600,2000\n")
    assert run_02_demo_config(tile_script, tmp_path) == 2
    error = last_error_line(capsys)
    assert error.startswith("error: no lymphoma patches (0 lymphoma, 0 negative from 0 of 1 slides); "
                            "top reasons: slide_error 1; no slide could be tiled, slide TA1: slide TA1.svs (aperio, "
                            "4443 x 3567 px, no objective power) has no openslide.mpp-x; set tile_dlbcl.mpp_override "
                            "to its level-0 um/px: typical aperio scans are 0.50 um/px at 20x (the slide would be "
                            "2.2 x 1.8 mm) and 0.25 at 40x (1.1 x 0.9 mm)")
    summary = json.loads((tmp_path / "runs" / "t" / "02_tile_dlbcl" / "summary.json").read_text())
    assert summary["outputs"] == [] and summary["skipped"][0]["reason"] == "slide_error"
    assert run_02_demo_config(tile_script, tmp_path, mpp_override=0.25) == 0


def test_a_quarter_micron_slide_is_read_at_its_4x_level_and_only_what_is_kept(tmp_path, tile_script):
    """A 0.25 um/px three-level pyramid (downsamples 1, 4, 16): 0.972 um/px wants 3.888, so with the 5 %
    scale tolerance 02 reads level 1 (1.0 um/px); each patch equals a direct read_region of its 93 px at
    that level, enlarged to 96 px the same way; balance reads few negatives beyond those it keeps."""
    write_demo_dlbcl(tmp_path / "dlbcl", n_slides=1, cores_per_slide=2, seed=3, slide_mpp=0.25, workers=1)
    assert run_02_demo_config(tile_script, tmp_path) == 0
    out = tmp_path / "runs" / "t" / "02_tile_dlbcl"
    summary = json.loads((out / "summary.json").read_text())
    [record] = summary["slides"]
    assert (record["slide"], record["level"], record["level_mpp"]) == ("TA101", 1, 1.0)
    ps = read_patch_set(out / "dlbcl.h5")
    assert record["patches_kept"] == len(ps) == summary["n_patches"] and summary["n_positive"] == summary["n_negative"]
    assert summary["patches_read"] == record["patches_read"] <= 2 * len(ps)
    assert summary["negatives_are"].startswith("unannotated tissue of lymphoma patients")

    slide = openslide.OpenSlide(str(tmp_path / "dlbcl" / "TMA" / "HE" / "TA101.svs"))
    assert slide.level_downsamples == (1.0, 4.0, 16.0)
    crop_px = round(96 * 0.972 / 0.25 / 4)  # 93 level-1 px per patch
    direct = np.stack([np.asarray(slide.read_region((int(x), int(y)), 1, (crop_px, crop_px)))[..., :3]
                       for x, y in ps.coords])
    np.testing.assert_array_equal(ps.x, _resize_batch(direct, 96))

    # The old rule (1 % tolerance) reads level 0 for the same slide.
    status = cli.run(tile_script.main, ["--config", str(tmp_path / "c.yaml"),
                                        "--set", "tile_dlbcl.scale_tolerance=0.01"])
    assert status == 0 and json.loads((out / "summary.json").read_text())["slides"][0]["level"] == 0


def test_too_little_disk_space_stops_before_tiling(tmp_path, tile_script, demo_dlbcl, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    status, out = run_02(tile_script, tmp_path, demo_dlbcl, ["71177,TA101,HE,833,676,1772,1947"])
    assert status == 2 and not list(out.glob("*.h5*")) and not list((out / "overview").iterdir())
    assert re.match(r"error: not enough disk space in .* for dlbcl\.h5: needs about 0\.0 GB, 0\.0 GB free; "
                    r"free space there or point run\.output_root at a larger disk$", last_error_line(capsys))


def test_rejections_per_reason_account_for_every_patch_read_and_not_written(tmp_path: Path, tile_script):
    # A focus floor among the demo patches' Laplacian variances rejects part of them, as out_of_focus only;
    # without balance every patch read is either rejected or written.
    write_demo_dlbcl(tmp_path / "dlbcl", n_slides=1, cores_per_slide=2, seed=5, workers=1)
    assert run_02_demo_config(tile_script, tmp_path, min_laplacian_var=0.02, balance=False) == 0
    summary = json.loads((tmp_path / "runs" / "t" / "02_tile_dlbcl" / "summary.json").read_text())
    rejected = summary["rejected_by_reason"]
    assert set(rejected) == {"out_of_focus"} and rejected["out_of_focus"] > 0
    written_before_trim = summary["n_patches"] + summary["n_positive_dropped_by_balance"]
    assert sum(rejected.values()) == summary["patches_read"] - written_before_trim
    assert summary["n_negative_read_unused"] == 0

    # With balance, negatives are sampled in rounds: those that pass beyond the need are counted apart.
    assert run_02_demo_config(tile_script, tmp_path, min_laplacian_var=0.02, balance=True) == 0
    summary = json.loads((tmp_path / "runs" / "t" / "02_tile_dlbcl" / "summary.json").read_text())
    written_before_trim = summary["n_patches"] + summary["n_positive_dropped_by_balance"]
    assert summary["n_negative_read_unused"] > 0
    assert (sum(summary["rejected_by_reason"].values()) + summary["n_negative_read_unused"]
            == summary["patches_read"] - written_before_trim)
