"""Tasks live in the config: a fourth task defined in a test config alone runs 05 -> 06 -> 07, and 05 stops
with one line (exit 2) when a split cannot hold every class."""

import json
from pathlib import Path

import h5py
import numpy as np
import yaml

from common import data
from common.cli import run
from tests.conftest import ROOT, load_script
from tests.test_data import write_dlbcl

# DLBCL lymphoma vs PCam metastasis: the positives of both sources, negatives left out (labels null)
DLBCL_VS_BREAST = {
    "classes": ["lymphoma", "metastasis"],
    "sets": {**{f"pcam_{s}": {"source": "pcam", "split": s, "labels": [None, "metastasis"]} for s in data.SPLITS},
             "dlbcl": {"source": "dlbcl", "labels": [None, "lymphoma"]}},
    "split": "grouped",
    "split_fractions": [0.8, 0.1, 0.1],
    "balanced_size": None,
}


def test_a_fourth_task_from_the_config_alone_runs_05_to_07(tiny_config: Path):
    path = tiny_config.parent / "fourth.yaml"
    path.write_text(yaml.safe_dump({"base": str(tiny_config), "train": {"task": "dlbcl_vs_breast"},
                                    "tasks": {"dlbcl_vs_breast": DLBCL_VS_BREAST}}))
    for stem in ("05_train", "06_evaluate", "07_gradcam"):
        assert load_script(stem).main(["--config", str(path)]) == 0, stem
    runs = tiny_config.parent / "runs" / "tiny"
    sets = runs / "03_normalize" / "reinhard"  # configs/demo.yaml trains on Reinhard
    cols = data.read_split(runs / "05_train" / "dlbcl_vs_breast_resnet18" / "split.csv")
    # exactly the positive patches of each file, labelled by source, PCam in its official splits
    for stem in DLBCL_VS_BREAST["sets"]:
        with h5py.File(sets / f"{stem}.h5") as f:
            positives = np.flatnonzero(f["y"][:] == 1)
        mine = cols["file"] == stem
        np.testing.assert_array_equal(np.sort(cols["index"][mine]), positives)
        assert set(cols["label"][mine]) == {0 if stem == "dlbcl" else 1}
        if stem != "dlbcl":
            assert set(cols["split"][mine]) == {stem.removeprefix("pcam_")}
    dlbcl = cols["file"] == "dlbcl"
    by_split = [set(cols["group"][dlbcl & (cols["split"] == s)]) for s in data.SPLITS]
    assert all(by_split) and not (by_split[0] & by_split[1]) and not (by_split[0] & by_split[2])
    for s in data.SPLITS:  # both classes in every split
        assert set(cols["label"][cols["split"] == s]) == {0, 1}
    meta = json.loads((runs / "05_train" / "dlbcl_vs_breast_resnet18" / "experiment.json").read_text())
    assert meta["class_names"] == ["lymphoma", "metastasis"] and meta["split"] == "grouped"

    evaluated = runs / "06_evaluate" / "dlbcl_vs_breast_resnet18"
    m = json.loads((evaluated / "metrics.json").read_text())
    test = cols["split"] == "test"
    assert m["n_test"] == int(test.sum()) and m["class_names"] == ["lymphoma", "metastasis"]
    assert set(m["per_source"]) == {"pcam", "dlbcl"}  # two sources: a per-source breakdown
    assert m["per_source"]["dlbcl"]["n"] == int((test & dlbcl).sum())
    header = (evaluated / "predictions.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c.startswith("p_")] == ["p_lymphoma", "p_metastasis"]
    table = (evaluated / "tables.md").read_text()
    assert table.startswith("## Results (dlbcl_vs_breast)") and "published" not in table  # no reference given

    explained = runs / "07_gradcam" / "dlbcl_vs_breast_resnet18"
    stats = json.loads((explained / "cam_stats.json").read_text())["per_source_class"]
    assert set(stats) == {"pcam/metastasis", "dlbcl/lymphoma"}
    assert {p.name for p in explained.glob("grid_*.png")} == {"grid_pcam.png", "grid_dlbcl.png"}


def test_05_stops_in_one_line_when_a_split_cannot_hold_every_class(tmp_path: Path, capsys):
    folder = tmp_path / "runs" / "t" / "03_normalize"
    (folder / "macenko").mkdir(parents=True)
    write_dlbcl(folder / "macenko", negative_patients=[4, 9])  # negatives on two patients: three splits can't
    (folder / "summary.json").write_text("{}")
    config = {"base": str(ROOT / "configs" / "demo.yaml"),
              "run": {"name": "t", "output_root": str(tmp_path / "runs")},
              "train": {"task": "dlbcl", "method": "macenko", "epochs": 1}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert run(load_script("05_train").main, ["--config", str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split holds no 'negative' patch: 20 patches of it in 2 group(s)" in err[0]
    assert not (tmp_path / "runs" / "t" / "05_train" / "dlbcl_resnet18" / "split.csv").exists()
