"""common/steps.py: summaries, upstream checks, strict JSON, the free-space check."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from common.steps import begin_step, check_free_space, json_text, require_step, write_json, write_summary


def test_summary_and_upstream_check(tmp_path: Path):
    cfg = {"run": {"output_root": str(tmp_path), "name": "r"}, "_config_path": "x"}
    with pytest.raises(UserError, match="run `python 01_filter_pcam.py`"):
        require_step(cfg, "01_filter_pcam")
    folder = tmp_path / "r" / "01_filter_pcam"
    folder.mkdir(parents=True)
    write_summary(folder, "01_filter_pcam", cfg, 0.0, kept=np.int64(3))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["kept"] == 3 and summary["skipped"] == [] and "commit" in summary
    assert "_config_path" not in summary["config"]
    assert require_step(cfg, "01_filter_pcam") == folder


def test_upstream_outputs_must_come_from_the_last_run(tmp_path: Path):
    cfg = {"run": {"output_root": str(tmp_path), "name": "r"}}
    folder = tmp_path / "r" / "02_tile_dlbcl"
    folder.mkdir(parents=True)
    write_summary(folder, "02_tile_dlbcl", cfg, 0.0)  # an older version: no outputs list, not checked
    assert require_step(cfg, "02_tile_dlbcl", outputs=["dlbcl.h5"]) == folder
    write_summary(folder, "02_tile_dlbcl", cfg, 0.0, outputs=["dlbcl.h5"])
    assert require_step(cfg, "02_tile_dlbcl", outputs=["dlbcl.h5"]) == folder
    with pytest.raises(UserError, match=r"other\.h5 was not written by the last run of 02_tile_dlbcl"):
        require_step(cfg, "02_tile_dlbcl", outputs=["dlbcl.h5", "other.h5"])
    write_summary(folder, "02_tile_dlbcl", cfg, 0.0, outputs=[])  # the last run failed: an old dlbcl.h5 is stale
    with pytest.raises(UserError, match="that run failed or skipped it"):
        require_step(cfg, "02_tile_dlbcl", outputs=["dlbcl.h5"])


def test_a_started_step_is_not_finished_until_its_new_summary(tmp_path: Path):
    cfg = {"run": {"output_root": str(tmp_path), "name": "r"}}
    folder = begin_step(cfg, "03_normalize")
    write_summary(folder, "03_normalize", cfg, 0.0, outputs=["macenko/dlbcl.h5"])
    (folder / "macenko").mkdir()
    (folder / "macenko" / "dlbcl.h5").write_bytes(b"old")
    assert begin_step(cfg, "03_normalize") == folder  # a rerun starts: the old summary goes, the files stay
    assert (folder / "macenko" / "dlbcl.h5").read_bytes() == b"old"
    with pytest.raises(UserError, match="run `python 03_normalize.py`"):
        require_step(cfg, "03_normalize", outputs=["macenko/dlbcl.h5"])


def test_json_is_strict_non_finite_floats_become_null(tmp_path: Path):
    obj = {"auc": float("nan"), "ci": [np.float32("nan"), 0.5, float("inf")], "arr": np.array([1.0, np.nan]),
           "n": np.int64(3), "path": Path("a/b")}
    write_json(tmp_path / "m.json", obj)
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"auc": None, "ci": [None, 0.5, None], "arr": [1.0, None], "n": 3, "path": "a/b"}
    assert json_text({"loss": float("nan")}) == '{"loss": null}'


def test_free_space_check_names_both_numbers(tmp_path: Path, monkeypatch):
    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "not" / "yet", free / 2, "the test")  # nearest existing parent is used
    with pytest.raises(UserError, match=r"not enough disk space in .* for 4 patch sets: needs about "
                                        r"[\d.]+ GB, [\d.]+ GB free; drop methods"):
        check_free_space(tmp_path, free * 2, "4 patch sets", "drop methods")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(100, 0, 100))
    with pytest.raises(UserError, match="needs about 0.0 GB, 0.0 GB free"):
        check_free_space(tmp_path, 99, "x")  # the 5 % margin: 99 B needs 104 B
    check_free_space(tmp_path, 90, "x")
