"""06 · Evaluate a trained experiment on its held-out test split and regenerate the thesis's Tables 1-2.

Reads:  runs/<run>/05_train/<experiment>/{split.csv, experiment.json, <evaluate.checkpoint>.pt}
        runs/<run>/03_normalize/<method>/*.h5
Writes (runs/<run>/06_evaluate/<experiment>/):
    metrics.json      accuracy, balanced_accuracy, auc, per_class P/R/F1, confusion_matrix,
                      bootstrap 95 % CIs (ci95: resampling slides/patients, as patches of one
                      patient are correlated — patches where the slide is unknown, e.g. PCam without
                      its meta CSVs, and ci95_unit says which; ci95_patches: resampling patches,
                      narrower, for comparison with papers that do so), colour_baseline_accuracy: a
                      classifier on per-patch mean colour alone (how much of the task colour gives
                      away; the model should beat it by far);
                      for `pcam` official_test: {n, accuracy, balanced_accuracy, auc, ci95} on the whole
                      official test split, unfiltered (the PCam benchmark);
                      for a task with several sources (`mixed`) per_source 3-class accuracy and
                      within_source binary metrics (PCam negative vs breast, DLBCL negative vs lymphoma)
    predictions.csv   file, index, group, source, label, p_<class> per class, logp_<class> per class
                      (the log-probabilities all metrics are computed from: they never saturate), pred
    roc.png, confusion.png
    tables.md         Table 1 (binary) or Table 2 (mixed) layout, the thesis's values beside ours
    summary.json

Usage:
    python 06_evaluate.py --config config.yaml --set train.task=mixed [--set evaluate.tta=true]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common import cli, data, engine, metrics, plots
from common.patchset import read_patch_set
from common.steps import atomic_path, require_step, step_dir, write_experiments_summary, write_json, write_summary

STEP = "06_evaluate"
COLOUR_BASELINE_PATCHES = 20000
# Thesis Tables 1-2: (task, model) -> {class: (P, R, F1)} and accuracy, in %
THESIS = {
    ("pcam", "resnet18"): ({"metastasis": (94.9, 77.2, 85.1), "negative": (80.8, 95.8, 87.7)}, 86.5),
    ("pcam", "resnet50"): ({"metastasis": (91.7, 71.6, 80.4), "negative": (76.7, 93.5, 84.3)}, 82.5),
    ("dlbcl", "resnet18"): ({"lymphoma": (92.5, 99.0, 95.7), "negative": (98.9, 92.0, 95.3)}, 95.5),
    ("dlbcl", "resnet50"): ({"lymphoma": (78.1, 99.4, 87.5), "negative": (99.2, 72.2, 83.6)}, 85.8),
    ("mixed", "resnet18"): ({"breast": (96.5, 89.4, 92.8), "lymphoma": (74.1, 97.4, 84.2),
                             "negative": (92.5, 81.4, 86.6)}, 87.4),
    ("mixed", "resnet50"): ({"breast": (98.0, 86.2, 91.7), "lymphoma": (60.4, 97.4, 74.6),
                             "negative": (89.4, 67.4, 76.9)}, 79.6),
}
# The PCam benchmark (Veeling et al. 2018, P4M-DenseNet), on the whole official test split
PCAM_BENCHMARK = {"model": "P4M-DenseNet (Veeling et al. 2018)", "accuracy": 89.8, "auc": 0.963}
DLBCL_NEGATIVES_NOTE = (
    "DLBCL \"negatives\" are the tissue outside every annotated ROI of the DLBCL-Morph TMA slides: "
    "unannotated tissue of lymphoma patients (duplicate cores, core rims, the rest of a core with a small ROI), "
    "not tissue known to be benign. Their scores measure telling annotated from unannotated lymphoma-patient "
    "tissue, not lymphoma from healthy lymph node.")


def _cells(m: dict, classes: list[str]) -> str:
    """P/R/F1 per class, accuracy and balanced accuracy in %, AUC: one table row's metric cells."""
    prf = " | ".join("/".join(f"{100 * m['per_class'][c][k]:.1f}" for k in ("precision", "recall", "f1"))
                     for c in classes)
    return f"{prf} | {100 * m['accuracy']:.1f} | {100 * m['balanced_accuracy']:.1f} | {m['auc']:.3f}"


def thesis_table(task: str, model: str, m: dict) -> str:
    """Table 1 (binary) or Table 2 (mixed) layout: our rows (and, for `pcam`, the whole official test
    split beside the filtered one), the thesis's and, for `pcam`, the published benchmark."""
    classes = ["breast", "lymphoma", "negative"] if task == "mixed" else [data.CLASS_NAMES[task][1], "negative"]
    heads = ["Positive" if c != "negative" and task != "mixed" else c.capitalize() for c in classes]
    title = "Table 2 (3-class, mixed)" if task == "mixed" else f"Table 1 (binary, {task})"
    dash = " | ".join("–" for _ in classes)
    lines = [f"## {title}", "", "| | Model | Test split | " + " | ".join(f"{h} P/R/F1" for h in heads)
             + " | Accuracy | Balanced accuracy | AUC |", "|---|---|---|" + "---|" * (len(classes) + 3),
             f"| ours | {model} | {'filtered (01), ' if task == 'pcam' else ''}n = {m['n_test']} | "
             f"{_cells(m, classes)} |"]
    if "official_test" in m:
        lines.append(f"| ours | {model} | official, whole (unfiltered), n = {m['official_test']['n']} | "
                     f"{_cells(m['official_test'], classes)} |")
    if (task, model) in THESIS:
        ref, acc = THESIS[(task, model)]
        split = {"pcam": "filtered (thesis)", "dlbcl": "random, balanced (thesis)"}.get(task, "thesis's")
        lines.append(f"| thesis | {model} | {split} | " + " | ".join("/".join(f"{v:.1f}" for v in ref[c])
                                                                       for c in classes) + f" | {acc:.1f} | – | – |")
    if task == "pcam":
        b = PCAM_BENCHMARK
        lines += [f"| published | {b['model']} | official, whole | {dash} | {b['accuracy']:.1f} | – | {b['auc']:.3f} |",
                  "", "Only the **official, whole** row is comparable with published PCam results (the benchmark "
                  "row): the filtered split lacks the patches 01 rejected (mostly easy near-glass negatives), "
                  "so its numbers are on a different test set."]
    return "\n".join(lines) + "\n"


def interval_text(ci: list[float], n_units: int, unit: str) -> str:
    """"95 % CI lo-hi over n <unit>", or why there is none."""
    if n_units < 2:
        return f"no CI: the test split holds a single resampling unit ({unit})"
    text = f"95 % CI {ci[0]:.4f}-{ci[1]:.4f} over {n_units} {unit}"
    if unit == "patches":
        text += " (patch-level: the slides are unknown, e.g. PCam without its meta CSVs; too narrow)"
    elif n_units < 10:
        text += " (few: a rough interval)"
    return text


def intervals(labels: np.ndarray, scores: np.ndarray, class_names: list[str], source: np.ndarray,
              group: np.ndarray, n_boot: int, seed: int) -> dict:
    """ci95 (over slides/patients, patches where the slide is unknown), ci95_unit, ci95_groups (the
    number of units) and ci95_patches."""
    units, unit = metrics.independent_units(source, group)
    return {"ci95": metrics.bootstrap_ci(labels, scores, class_names, n_boot=n_boot, seed=seed, groups=units),
            "ci95_unit": unit, "ci95_groups": int(len(np.unique(units))),
            "ci95_patches": metrics.bootstrap_ci(labels, scores, class_names, n_boot=n_boot, seed=seed)}


def within_source_table(within: dict) -> str:
    lines = ["### Within each source (binary: the probabilities renormalised over the source's two classes)", "",
             "| Source | Classes | n | Accuracy | Balanced accuracy | AUC | Called another source's class |",
             "|---|---|---|---|---|---|---|"]
    for name, w in within.items():
        if "accuracy" in w:
            lines.append(f"| {name} | {' vs '.join(w['classes'])} | {w['n']} | {100 * w['accuracy']:.1f} | "
                         f"{100 * w['balanced_accuracy']:.1f} | {w['auc']:.3f} | "
                         f"{100 * w['predicted_other_class']:.1f} % |")
        else:
            lines.append(f"| {name} | {', '.join(w['classes'])} only | {w['n']} | – | – | – | – |")
    lines += ["", "High within-source scores say the model tells cancer from tissue inside each dataset; a "
              "3-class score much higher than these, or many patches called another source's class, says it "
              "tells one dataset from the other."]
    return "\n".join(lines) + "\n"


def score_official_test(model, meta: dict, source: Path, ec: dict, seed: int, device) -> dict:
    """The whole official PCam test split (03's pcam_test_official: unfiltered, normalised like the rest),
    scored like the test split: n, accuracy, balanced_accuracy, auc, per_class, ci95 (+ its unit)."""
    ps = read_patch_set(source / "pcam_test_official.h5")
    labels = ps.y.astype(np.int64)
    logits = engine.predict_logits(model, ps.x, meta["mean"], meta["std"], device, tta=ec["tta"])
    scores = engine.log_probabilities(logits).numpy()
    m = metrics.classification_metrics(labels, scores, meta["class_names"])
    ci = intervals(labels, scores, meta["class_names"], np.full(len(labels), "pcam"), ps.group,
                   ec["n_bootstrap"], seed)
    return {"n": len(labels), **{k: m[k] for k in ("accuracy", "balanced_accuracy", "auc", "per_class")},
            "ci95": {k: ci["ci95"][k] for k in ("accuracy", "balanced_accuracy", "auc")},
            "ci95_unit": ci["ci95_unit"], "ci95_groups": ci["ci95_groups"]}


def write_predictions(path: Path, test: data.Split, log_probs: np.ndarray, class_names: list[str]) -> None:
    columns = ["file", "index", "group", "source", "label", *[f"p_{c}" for c in class_names],
               *[f"logp_{c}" for c in class_names], "pred"]
    table = np.column_stack([test.file, test.index, test.group, test.source, test.label,
                             *[np.char.mod("%.8f", np.exp(log_probs[:, k])) for k in range(log_probs.shape[1])],
                             *[np.char.mod("%.17g", log_probs[:, k]) for k in range(log_probs.shape[1])],
                             log_probs.argmax(1)])
    with atomic_path(path) as tmp:
        np.savetxt(tmp, table, fmt="%s", delimiter=",", comments="", header=",".join(columns))


def colour_baseline(cols: dict, source: Path, test: data.Split, seed: int) -> float:
    """Test accuracy of a logistic regression on per-patch mean colour alone (mean R, G, B), trained on (at
    most 20,000 of) the training patches: how much of the task colour gives away."""
    train = data.load_split(cols, "train", source, limit=COLOUR_BASELINE_PATCHES, seed=seed)

    def colour(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1, 3).mean(1, dtype=np.float64)

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(colour(train.x), train.label)
    return float((clf.predict(colour(test.x)) == test.label).mean())


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    cfg, device = cli.start(argv, __doc__, STEP)
    ec, seed = cfg["evaluate"], cfg["run"]["seed"]
    model, meta, cols = engine.load_experiment(cfg, ec["checkpoint"])
    model.to(device)
    folder = step_dir(cfg, STEP) / engine.experiment_name(cfg)
    folder.mkdir(exist_ok=True)
    source = require_step(cfg, "03_normalize") / meta["method"]
    test = data.load_split(cols, "test", source)
    class_names = meta["class_names"]
    print(f"   experiment {folder.name}: {len(test)} test patches, checkpoint {ec['checkpoint']}, tta {ec['tta']}")

    logits = engine.predict_logits(model, test.x, meta["mean"], meta["std"], device, tta=ec["tta"])
    scores = engine.log_probabilities(logits).numpy()  # log-probabilities: ranks never tie by saturation
    m = metrics.classification_metrics(test.label, scores, class_names)
    m |= intervals(test.label, scores, class_names, test.source, test.group, ec["n_bootstrap"], seed)
    if len(np.unique(test.source)) > 1:
        m["per_source"] = {src: {"n": int((test.source == src).sum()),
                                 "accuracy": float((scores.argmax(1) == test.label)[test.source == src].mean())}
                           for src in np.unique(test.source)}
        units, _ = metrics.independent_units(test.source, test.group)
        m["within_source"] = metrics.within_source_metrics(test.label, scores, test.source, class_names, units,
                                                           n_boot=ec["n_bootstrap"], seed=seed)
    if meta["task"] == "pcam":
        m["official_test"] = score_official_test(model, meta, source, ec, seed, device)
    m["colour_baseline_accuracy"] = colour_baseline(cols, source, test, seed)
    m |= {"n_test": len(test), "checkpoint": ec["checkpoint"], "tta": ec["tta"], "class_names": class_names}
    write_predictions(folder / "predictions.csv", test, scores, class_names)
    write_json(folder / "metrics.json", m)
    counts = dict(zip(class_names, np.bincount(test.label, minlength=len(class_names)).tolist(), strict=True))
    plots.roc_curves(folder / "roc.png", metrics.roc_points(test.label, scores, class_names), folder.name, counts)
    plots.confusion(folder / "confusion.png", np.array(m["confusion_matrix"]), class_names, folder.name)
    ci_text = interval_text(m["ci95"]["accuracy"], m["ci95_groups"], m["ci95_unit"])
    table = thesis_table(meta["task"], meta["model"], m)
    if "official_test" in m:
        o = m["official_test"]
        table += (f"\nAccuracy, filtered split: {ci_text}.\nAccuracy, official whole split: "
                  f"{interval_text(o['ci95']['accuracy'], o['ci95_groups'], o['ci95_unit'])}.\n")
    else:
        table += f"\nAccuracy {ci_text}.\n"
    if "within_source" in m:
        table += "\n" + within_source_table(m["within_source"])
    if "dlbcl" in test.source:
        table += f"\n{DLBCL_NEGATIVES_NOTE}\n"
    table += (f"\nColour-only baseline (logistic regression on per-patch mean RGB): "
              f"{100 * m['colour_baseline_accuracy']:.1f} % accuracy.\n")
    with atomic_path(folder / "tables.md") as tmp:
        tmp.write_text(table)
    write_summary(folder, STEP, cfg, started, experiment=folder.name, accuracy=m["accuracy"], auc=m["auc"])
    write_experiments_summary(folder.parent, STEP, cfg, started)
    ci_patches = m["ci95_patches"]["accuracy"]
    print(f"   accuracy {m['accuracy']:.4f} ({ci_text}; over patches {ci_patches[0]:.4f}-{ci_patches[1]:.4f})"
          f"  balanced {m['balanced_accuracy']:.4f}  AUC {m['auc']:.4f}  colour-only baseline "
          f"{m['colour_baseline_accuracy']:.4f}")
    if "official_test" in m:
        o = m["official_test"]
        print(f"   official test split (whole, unfiltered; the PCam benchmark): {o['n']} patches, accuracy "
              f"{o['accuracy']:.4f} ({interval_text(o['ci95']['accuracy'], o['ci95_groups'], o['ci95_unit'])})  "
              f"balanced {o['balanced_accuracy']:.4f}  AUC {o['auc']:.4f}")
    print(f"\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
