"""02_tile_dlbcl as a whole: stain selection, bad rows and slides skipped with reasons, the patch set."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.demo import write_demo_dlbcl
from common.patchset import read_patch_set
from tests.conftest import ROOT, load_script


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
    config = {"base": str(ROOT / "configs" / "demo.yaml"),
              "run": {"name": "t", "output_root": str(tmp_path / "runs")},
              "data": {"dlbcl_dir": str(tmp_path / "dlbcl")}, "tile_dlbcl": {"workers": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert tile_script.main(["--config", str(tmp_path / "c.yaml")]) == 0

    out = tmp_path / "runs" / "t" / "02_tile_dlbcl"
    summary = json.loads((out / "summary.json").read_text())
    reasons = sorted((s["item"], s["reason"]) for s in summary["skipped"])
    assert ("annotations.csv row " + str(len(good) + 2), "malformed_row") in reasons
    assert ("slide TA999", "missing_slide") in reasons and ("slide TA103", "slide_error") in reasons
    counts = {}
    for s in summary["skipped"]:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    assert counts == {"malformed_row": 1, "missing_slide": 1, "slide_error": 1, "roi_empty": 1,
                      "roi_outside_slide": 1}
    assert set(summary["slides"]) == {"TA101"}  # TA102 has only a CD10 row: never opened
    ps = read_patch_set(out / "dlbcl.h5")
    assert len(ps) == summary["n_patches"] > 0 and ps.x.shape[1:] == (96, 96, 3)
    assert (np.bincount(ps.y) == summary["n_patches"] // 2).all()  # balanced 50/50
    assert ps.attrs["mpp"] == pytest.approx(0.972) and set(ps.group) <= {r.split(",")[0] for r in good}
    assert (out / "overview" / "TA101.png").is_file()


def test_zero_patches_is_a_failure_with_a_summary(tmp_path: Path, tile_script):
    tma = tmp_path / "dlbcl" / "TMA"
    tma.mkdir(parents=True)
    (tma / "annotations.csv").write_text("patient_id,tma_id,stain,xs,ys,xe,ye\n1,TA1,HE,0,0,500,500\n")
    config = {"base": str(ROOT / "configs" / "demo.yaml"),
              "run": {"name": "t", "output_root": str(tmp_path / "runs")},
              "data": {"dlbcl_dir": str(tmp_path / "dlbcl")}, "tile_dlbcl": {"workers": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert tile_script.main(["--config", str(tmp_path / "c.yaml")]) == 1
    summary = json.loads((tmp_path / "runs" / "t" / "02_tile_dlbcl" / "summary.json").read_text())
    assert summary["n_patches"] == 0 and summary["skipped"][0]["reason"] == "missing_slide"
