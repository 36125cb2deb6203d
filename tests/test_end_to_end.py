"""All seven scripts, in order, on tiny synthetic data in the real formats (CPU, one epoch)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from common import demo
from tests.conftest import ROOT, load_script

SCRIPTS = ["01_filter_pcam", "02_tile_dlbcl", "03_normalize", "04_cluster", "05_train", "06_evaluate",
           "07_gradcam"]




@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    demo.write_demo(tmp / "data", seed=1, pcam_per_split={"train": 96, "valid": 48, "test": 48},
                    dlbcl_slides=2, dlbcl_cores_per_slide=4)
    config = {
        "base": str(ROOT / "configs" / "demo.yaml"),
        "run": {"name": "tiny", "output_root": str(tmp / "runs")},
        "data": {"pcam_dir": str(tmp / "data" / "pcam"), "dlbcl_dir": str(tmp / "data" / "dlbcl")},
        "filter_pcam": {"grid_search": True, "grid_search_samples": 40,
                        "junk_csv": str(tmp / "data" / "pcam" / "demo_junk.csv")},
        "tile_dlbcl": {"workers": 1},
        "cluster": {"n_per_source": 24, "n_init": 2},
        "train": {"epochs": 1, "mixed_size": 60, "batch_size": 16},
        "evaluate": {"n_bootstrap": 20},
        "gradcam": {"n_per_cell": 2},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_all_seven_steps(tiny_config: Path):
    run = tiny_config.parent / "runs" / "tiny"
    for stem in SCRIPTS[:4]:
        assert load_script(stem).main(["--config", str(tiny_config)]) == 0, stem
    for task in ("pcam", "dlbcl", "mixed"):
        for stem in SCRIPTS[4:]:
            assert load_script(stem).main(["--config", str(tiny_config), "--set", f"train.task={task}"]) == 0
    for stem in SCRIPTS:
        assert (run / stem / "summary.json").is_file(), stem

    # 01 rejected the demo's junk and kept most tissue
    s01 = json.loads((run / "01_filter_pcam" / "summary.json").read_text())
    assert 0 < s01["splits"]["train"]["kept"] < 96
    # 04 wrote a row per (features, method); accuracy and ARI recompute exactly from assignments.csv
    rows = json.loads((run / "04_cluster" / "metrics.json").read_text())["rows"]
    assert {(r["features"], r["method"]) for r in rows} == {
        (f, m) for f in ("pixels", "resnet18") for m in ("none", "macenko", "vahadane", "reinhard")}
    table = np.loadtxt(run / "04_cluster" / "assignments.csv", delimiter=",", dtype=str, skiprows=1)
    for r in rows:
        sel = (table[:, 0] == r["features"]) & (table[:, 1] == r["method"])
        truth, cluster = (table[sel, 3] == "dlbcl").astype(int), table[sel, 4].astype(int)
        agree = float((truth == cluster).mean())
        assert r["accuracy"] == pytest.approx(max(agree, 1 - agree), abs=1e-12)  # two clusters: either matching
        assert r["ari"] == pytest.approx(adjusted_rand_score(truth, cluster), abs=1e-12)
    # 06: metrics for each task, consistent with predictions.csv
    for task, n_classes in (("pcam", 2), ("dlbcl", 2), ("mixed", 3)):
        folder = run / "06_evaluate" / f"{task}_resnet18"
        m = json.loads((folder / "metrics.json").read_text())
        table = np.loadtxt(folder / "predictions.csv", delimiter=",", dtype=str)
        header, body = list(table[0]), table[1:]
        probs = body[:, [header.index(c) for c in header if c.startswith("p_")]].astype(float)
        log_probs = body[:, [header.index(c) for c in header if c.startswith("logp_")]].astype(float)
        assert probs.shape[1] == log_probs.shape[1] == n_classes
        np.testing.assert_allclose(probs, np.exp(log_probs), atol=1e-8)
        labels = body[:, header.index("label")].astype(int)
        pred = log_probs.argmax(1)
        assert (pred == body[:, header.index("pred")].astype(int)).all()
        assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-6)
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-6)
        auc = (roc_auc_score(labels, log_probs[:, 1]) if n_classes == 2  # macro one-vs-rest for 3 classes
               else np.mean([roc_auc_score(labels == k, log_probs[:, k]) for k in range(n_classes)]))
        assert m["auc"] == pytest.approx(auc, abs=1e-9)
        groups = np.char.add(np.char.add(body[:, header.index("source")], "/"), body[:, header.index("group")])
        assert m["ci95_groups"] == len(np.unique(groups))
        assert m["ci95_patches"]["accuracy"][0] <= m["accuracy"] <= m["ci95_patches"]["accuracy"][1]
        p, r, f1, _ = precision_recall_fscore_support(labels, pred, labels=range(n_classes), zero_division=0)
        for k, name in enumerate(m["class_names"]):
            assert m["per_class"][name]["precision"] == pytest.approx(p[k], abs=1e-6)
            assert m["per_class"][name]["recall"] == pytest.approx(r[k], abs=1e-6)
            assert m["per_class"][name]["f1"] == pytest.approx(f1[k], abs=1e-6)
        assert 0 <= m["colour_baseline_accuracy"] <= 1
        assert m["confusion_matrix"] == confusion_matrix(labels, pred, labels=range(n_classes)).tolist()
        assert (run / "07_gradcam" / f"{task}_resnet18" / "cam_stats.json").is_file()
        assert list((run / "07_gradcam" / f"{task}_resnet18").glob("grid_*.png"))
