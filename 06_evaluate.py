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
    tables.md         ours beside the task's published reference (config.yaml: the thesis's Table 1
                      for pcam and dlbcl, Table 2 for mixed)
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


def _cells(m: dict, classes: list[str]) -> str:
    """P/R/F1 per class, accuracy and balanced accuracy in %, AUC: one table row's metric cells."""
    prf = " | ".join("/".join(f"{100 * m['per_class'][c][k]:.1f}" for k in ("precision", "recall", "f1"))
                     for c in classes)
    return f"{prf} | {100 * m['accuracy']:.1f} | {100 * m['balanced_accuracy']:.1f} | {m['auc']:.3f}"


def results_table(name: str, task: dict, model: str, m: dict) -> str:
    """Our rows (and, for a task with a `benchmark`, its whole benchmark split beside the test split), the
    published row where the task's `reference` has this model (the thesis's Tables 1-2 in config.yaml), in
    the reference's layout (its class order), and the benchmark's published row."""
    ref, bench = task.get("reference"), task.get("benchmark")
    classes = list(ref["models"][model]["per_class"]) if ref and model in ref["models"] else task["classes"]
    title = ref["table"] if ref else f"Results ({name})"
    dash = " | ".join("–" for _ in classes)
    lines = [f"## {title}", "", "| | Model | Test split | " + " | ".join(f"{c.capitalize()} P/R/F1" for c in classes)
             + " | Accuracy | Balanced accuracy | AUC |", "|---|---|---|" + "---|" * (len(classes) + 3),
             f"| ours | {model} | {'filtered (01), ' if bench else ''}n = {m['n_test']} | {_cells(m, classes)} |"]
    if "official_test" in m:
        lines.append(f"| ours | {model} | official, whole (unfiltered), n = {m['official_test']['n']} | "
                     f"{_cells(m['official_test'], classes)} |")
    if ref and model in ref["models"]:
        row = ref["models"][model]
        lines.append(f"| published | {model} | the thesis's | " + " | ".join(
            "/".join(f"{v:.1f}" for v in row["per_class"][c]) for c in classes) + f" | {row['accuracy']:.1f} | – | – |")
    if bench:
        lines += [f"| published | {bench['model']} | official, whole | {dash} | {bench['accuracy']:.1f} | – | "
                  f"{bench['auc']:.3f} |", "", "Only the **official, whole** rows are comparable with published "
                  "results on this benchmark: the filtered split lacks the patches 01 rejected (mostly easy "
                  "near-glass negatives), so its numbers are on a different test set."]
    if ref:
        lines += ["", f"Published: {ref['citation']}."]
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


def score_official_test(model, meta: dict, path: Path, ec: dict, seed: int, device) -> dict:
    """A task's whole benchmark split (for PCam 03's pcam_test_official: the official test split unfiltered,
    normalised like the rest), scored like the test split: n, accuracy, balanced_accuracy, auc, per_class,
    ci95 (+ its unit)."""
    ps = read_patch_set(path)
    labels = ps.y.astype(np.int64)
    logits = engine.predict_logits(model, ps.x, meta["mean"], meta["std"], device, tta=ec["tta"])
    scores = engine.log_probabilities(logits).numpy()
    m = metrics.classification_metrics(labels, scores, meta["class_names"])
    ci = intervals(labels, scores, meta["class_names"], np.full(len(labels), str(ps.attrs.get("source", ""))), ps.group,
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
    class_names, task = meta["class_names"], cfg["tasks"][meta["task"]]
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
    if "benchmark" in task:
        m["official_test"] = score_official_test(model, meta, source / f"{task['benchmark']['set']}.h5", ec, seed,
                                                 device)
    m["colour_baseline_accuracy"] = colour_baseline(cols, source, test, seed)
    m |= {"n_test": len(test), "checkpoint": ec["checkpoint"], "tta": ec["tta"], "class_names": class_names}
    m["checkpoint_id"] = meta["checkpoint_id"]  # 07 refuses these predictions once 05 has trained again
    write_predictions(folder / "predictions.csv", test, scores, class_names)
    write_json(folder / "metrics.json", m)
    counts = dict(zip(class_names, np.bincount(test.label, minlength=len(class_names)).tolist(), strict=True))
    plots.roc_curves(folder / "roc.png", metrics.roc_points(test.label, scores, class_names), folder.name, counts)
    plots.confusion(folder / "confusion.png", np.array(m["confusion_matrix"]), class_names, folder.name)
    ci_text = interval_text(m["ci95"]["accuracy"], m["ci95_groups"], m["ci95_unit"])
    table = results_table(meta["task"], task, meta["model"], m)
    if "official_test" in m:
        o = m["official_test"]
        table += (f"\nAccuracy, filtered split: {ci_text}.\nAccuracy, official whole split: "
                  f"{interval_text(o['ci95']['accuracy'], o['ci95_groups'], o['ci95_unit'])}.\n")
    else:
        table += f"\nAccuracy {ci_text}.\n"
    if "within_source" in m:
        table += "\n" + within_source_table(m["within_source"])
    if task.get("note"):
        table += f"\n{task['note']}\n"
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
