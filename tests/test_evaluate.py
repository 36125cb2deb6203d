"""06_evaluate's tables and intervals on constructed metrics whose rows are known."""

import numpy as np
import pytest

from common.config import load_config
from tests.conftest import ROOT, load_script

TASKS = load_config(ROOT / "config.yaml")["tasks"]


@pytest.fixture(scope="module")
def evaluate():
    return load_script("06_evaluate")


def _metrics(accuracy, balanced, auc, classes):
    per_class = {c: {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 10} for c in classes}
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "auc": auc, "per_class": per_class}


def test_pcam_table_has_the_official_row_and_says_which_is_the_benchmark(evaluate):
    m = _metrics(0.912, 0.875, 0.951, ["negative", "metastasis"]) | {"n_test": 30000}
    m["official_test"] = _metrics(0.871, 0.870, 0.940, ["negative", "metastasis"]) | {"n": 32768}
    lines = evaluate.results_table("pcam", TASKS["pcam"], "resnet18", m).splitlines()
    assert "| Accuracy | Balanced accuracy | AUC |" in lines[2]
    assert lines[4] == ("| ours | resnet18 | filtered (01), n = 30000 | 90.0/80.0/85.0 | 90.0/80.0/85.0 | 91.2 | 87.5 "
                        "| 0.951 |")
    assert lines[5].startswith("| ours | resnet18 | official, whole (unfiltered), n = 32768 |")
    assert lines[5].endswith("| 87.1 | 87.0 | 0.940 |")
    assert lines[6] == "| published | resnet18 | the thesis's | 94.9/77.2/85.1 | 80.8/95.8/87.7 | 86.5 | – | – |"
    assert "P4M-DenseNet" in lines[7] and lines[7].endswith("| 89.8 | – | 0.963 |")
    assert "Only the **official, whole** rows are comparable with published results" in lines[9]
    assert lines[11].startswith("Published: D. N. Mantu")


def test_mixed_table_has_balanced_accuracy_and_no_official_row(evaluate):
    m = _metrics(0.8, 0.7, 0.9, ["negative", "breast", "lymphoma"]) | {"n_test": 600}
    table = evaluate.results_table("mixed", TASKS["mixed"], "resnet18", m)
    assert "| ours | resnet18 | n = 600 | " in table and "| 80.0 | 70.0 | 0.900 |" in table
    assert "official" not in table and "P4M" not in table


def test_unknown_pcam_groups_give_patch_level_intervals_labelled_so(evaluate):
    # 01 without the meta CSVs writes group "unknown" for every patch: the interval is over patches,
    # and says so, instead of "0.0000-0.5000 over 2 slides/patients".
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    p1 = np.clip(0.5 + 0.3 * (2 * labels - 1) + rng.normal(0, 0.3, 300), 0.01, 0.99)
    scores = np.log(np.column_stack([1 - p1, p1]))
    ci = evaluate.intervals(labels, scores, ["negative", "metastasis"], np.full(300, "pcam"),
                            np.full(300, "unknown"), n_boot=200, seed=1)
    assert ci["ci95_unit"] == "patches" and ci["ci95_groups"] == 300
    assert ci["ci95"]["accuracy"] == ci["ci95_patches"]["accuracy"]
    lo, hi = ci["ci95"]["accuracy"]
    assert 0 < hi - lo < 0.15
    text = evaluate.interval_text(ci["ci95"]["accuracy"], ci["ci95_groups"], ci["ci95_unit"])
    assert text.startswith(f"95 % CI {lo:.4f}-{hi:.4f} over 300 patches (patch-level: the slides are unknown")
    # Known slides: the interval is over slides, and six of them are flagged as few.
    slides = np.repeat(np.array([f"s{i}" for i in range(6)]), 50)
    by_slide = evaluate.intervals(labels, scores, ["negative", "metastasis"], np.full(300, "pcam"), slides,
                                  n_boot=200, seed=1)
    assert by_slide["ci95_unit"] == "slides/patients" and by_slide["ci95_groups"] == 6
    assert evaluate.interval_text(by_slide["ci95"]["accuracy"], 6, "slides/patients").endswith(
        "over 6 slides/patients (few: a rough interval)")


def test_within_source_table_rows(evaluate):
    within = {"dlbcl": {"classes": ["negative", "lymphoma"], "n": 40, "accuracy": 0.9, "balanced_accuracy": 0.85,
                        "auc": 0.95, "predicted_other_class": 0.05},
              "pcam": {"classes": ["breast"], "n": 3}}
    lines = evaluate.within_source_table(within).splitlines()
    assert lines[4] == "| dlbcl | negative vs lymphoma | 40 | 90.0 | 85.0 | 0.950 | 5.0 % |"
    assert lines[5] == "| pcam | breast only | 3 | – | – | – | – |"
