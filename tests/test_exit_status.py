"""The exit-status rule every script follows (README, "Exit status"): 0 done, 2 a user or data problem
(bad input, nothing usable left), 1 a bug. Here: 03 and 04 when nothing usable is left (01: see
tests/test_filter_script.py and tests/test_pcam.py)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from common import cli
from common.config import load_config
from common.patchset import PatchSet, write_patch_set
from common.steps import step_dir, write_summary
from tests.conftest import REAL, ROOT, load_script


def config_args(tmp_path: Path, **sections) -> list[str]:
    config = {"base": str(ROOT / "configs" / "demo.yaml"), "run": {"name": "t", "output_root": str(tmp_path / "runs")},
              **sections}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return ["--config", str(tmp_path / "c.yaml")]


def tissue(n: int) -> np.ndarray:
    """n real H&E 96x96 crops (uint8 (n, 96, 96, 3))."""
    image = cv2.cvtColor(cv2.imread(str(REAL / "he" / "tiatoolbox" / "target_image.png")), cv2.COLOR_BGR2RGB)
    tiles = np.lib.stride_tricks.sliding_window_view(image, (96, 96, 3))[::48, ::48].reshape(-1, 96, 96, 3)
    return np.ascontiguousarray(tiles[:n])


def patch_set(x: np.ndarray, y: np.ndarray, source: str) -> PatchSet:
    n = len(x)
    return PatchSet(x, y.astype(np.uint8), np.array([f"{source}_{i % 3}" for i in range(n)]),
                    np.full((n, 2), -1, np.int64), {"source": source, "split": "train", "mpp": 0.972})


def fake_step(cfg: dict, step: str, files: dict[str, PatchSet]) -> None:
    """A finished upstream step whose summary lists `files`."""
    folder = step_dir(cfg, step)
    for name, ps in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_patch_set(folder / name, ps)
    write_summary(folder, step, cfg, 0.0, outputs=list(files))


def run(script: str, args: list[str], capsys) -> tuple[int, list[str]]:
    status = cli.run(load_script(script).main, args)
    return status, capsys.readouterr().err.strip().splitlines()


def test_03_with_an_empty_pcam_train_exits_2(tmp_path, capsys):
    args = config_args(tmp_path, normalize={"methods": ["none", "reinhard"]})
    cfg = load_config(args[1])
    x = tissue(12)
    empty = patch_set(x[:0], np.zeros(0), "pcam")
    fake_step(cfg, "01_filter_pcam", {"train.h5": empty, "valid.h5": patch_set(x, np.zeros(12), "pcam"),
                                      "test.h5": patch_set(x, np.zeros(12), "pcam"),
                                      "test_official.h5": patch_set(x, np.zeros(12), "pcam")})
    fake_step(cfg, "02_tile_dlbcl", {"dlbcl.h5": patch_set(x, np.zeros(12), "dlbcl")})
    status, err = run("03_normalize", args, capsys)
    assert status == 2
    assert err == [f"error: {tmp_path / 'runs' / 't' / '01_filter_pcam' / 'train.h5'} holds no patches"]


def test_03_with_a_reference_without_tissue_exits_2(tmp_path, capsys):
    args = config_args(tmp_path, normalize={"methods": ["macenko"]})
    cfg = load_config(args[1])
    glass = np.full((12, 96, 96, 3), 242, np.uint8)  # the auto reference is drawn from PCam train
    fake_step(cfg, "01_filter_pcam",
              {f"{s}.h5": patch_set(glass, np.zeros(12), "pcam") for s in ("train", "valid", "test", "test_official")})
    fake_step(cfg, "02_tile_dlbcl", {"dlbcl.h5": patch_set(tissue(12), np.zeros(12), "dlbcl")})
    status, err = run("03_normalize", args, capsys)
    assert status == 2 and len(err) == 1
    assert err[0].startswith("error: the stain reference (shape (12, 96, 96, 3)) has too little tissue")


@pytest.mark.parametrize("source", ["pcam_train", "dlbcl"])
def test_04_without_negatives_of_a_source_exits_2(tmp_path, capsys, source):
    args = config_args(tmp_path, normalize={"methods": ["none"]}, cluster={"features": ["pixels"]})
    cfg = load_config(args[1])
    x = tissue(12)
    labels = {"pcam_train": np.r_[np.zeros(8), np.ones(4)], "dlbcl": np.r_[np.zeros(8), np.ones(4)]}
    labels[source] = np.r_[np.zeros(4), np.ones(8)]  # 4 negatives: fewer than the probe's 5 folds
    files = {f"none/{stem}.h5": patch_set(x, y, stem.split("_")[0]) for stem, y in labels.items()}
    fake_step(cfg, "03_normalize", files)
    status, err = run("04_cluster", args, capsys)
    why = ("02 writes them only with tile_dlbcl.negatives: true" if source == "dlbcl"
           else "check the filter_pcam thresholds of 01")
    assert status == 2
    assert err == [f"error: {tmp_path / 'runs' / 't' / '03_normalize' / 'none' / f'{source}.h5'} holds 4 negatives "
                   f"(label 0); 04 compares the negatives of both sources and needs at least 5 of each ({why})"]


def test_04_with_enough_negatives_runs(tmp_path, capsys):
    args = config_args(tmp_path, normalize={"methods": ["none"]}, cluster={"features": ["pixels"]})
    cfg = load_config(args[1])
    x = tissue(12)
    fake_step(cfg, "03_normalize", {f"none/{stem}.h5": patch_set(x, np.r_[np.zeros(6), np.ones(6)],
                                                                       stem.split("_")[0])
                                    for stem in ("pcam_train", "dlbcl")})
    status, err = run("04_cluster", args, capsys)
    assert status == 0, err
