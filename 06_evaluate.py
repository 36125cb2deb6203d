"""06 · Evaluate a trained experiment on its held-out test split and regenerate the thesis's Tables 1-2.

Reads:  runs/<run>/05_train/<experiment>/{split.csv, experiment.json, <evaluate.checkpoint>.pt}
        runs/<run>/03_normalize/<method>/*.h5
Writes (runs/<run>/06_evaluate/<experiment>/):
    metrics.json      accuracy, balanced_accuracy, auc, per_class P/R/F1, confusion_matrix,
                      bootstrap 95 % CIs (ci95: resampling slides/patients, as patches of one
                      patient are correlated; ci95_patches: resampling patches, narrower, for
                      comparison with papers that do so), for a task of several sources (`mixed`) a
                      per-source breakdown, and
                      colour_baseline_accuracy: a classifier on per-patch mean colour alone (how much
                      of the task colour gives away; the model should beat it by far)
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
from common.steps import atomic_path, require_step, step_dir, write_experiments_summary, write_json, write_summary

STEP = "06_evaluate"
COLOUR_BASELINE_PATCHES = 20000


def results_table(name: str, task: dict, model: str, m: dict) -> str:
    """Our row and, where the task's `reference` has this model (the thesis's Tables 1-2 in config.yaml),
    the published one, in the reference's layout (its class order)."""
    ref = task.get("reference")
    classes = list(ref["models"][model]["per_class"]) if ref and model in ref["models"] else task["classes"]
    title = ref["table"] if ref else f"Results ({name})"
    lines = [f"## {title}", "", "| | Model | " + " | ".join(f"{c.capitalize()} P/R/F1" for c in classes)
             + " | Accuracy |", "|---|---|" + "---|" * (len(classes) + 1)]
    ours = " | ".join("/".join(f"{100 * m['per_class'][c][k]:.1f}" for k in ("precision", "recall", "f1"))
                      for c in classes)
    lines.append(f"| ours | {model} | {ours} | {100 * m['accuracy']:.1f} |")
    if ref and model in ref["models"]:
        row = ref["models"][model]
        lines.append(f"| published | {model} | " + " | ".join("/".join(f"{v:.1f}" for v in row["per_class"][c])
                                                            for c in classes) + f" | {row['accuracy']:.1f} |")
        lines += ["", f"Published: {ref['citation']}."]
    return "\n".join(lines) + "\n"


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
    patient = np.char.add(np.char.add(test.source.astype(str), "/"), test.group.astype(str))
    m["ci95"] = metrics.bootstrap_ci(test.label, scores, class_names, n_boot=ec["n_bootstrap"], seed=seed,
                                     groups=patient)
    m["ci95_groups"] = int(len(np.unique(patient)))
    m["ci95_patches"] = metrics.bootstrap_ci(test.label, scores, class_names, n_boot=ec["n_bootstrap"], seed=seed)
    if len(np.unique(test.source)) > 1:
        m["per_source"] = {src: {"n": int((test.source == src).sum()),
                                 "accuracy": float((scores.argmax(1) == test.label)[test.source == src].mean())}
                           for src in np.unique(test.source)}
    m["colour_baseline_accuracy"] = colour_baseline(cols, source, test, seed)
    m |= {"n_test": len(test), "checkpoint": ec["checkpoint"], "tta": ec["tta"], "class_names": class_names}
    m["checkpoint_id"] = meta["checkpoint_id"]  # 07 refuses these predictions once 05 has trained again
    write_predictions(folder / "predictions.csv", test, scores, class_names)
    write_json(folder / "metrics.json", m)
    plots.roc_curves(folder / "roc.png", metrics.roc_points(test.label, scores, class_names), folder.name)
    plots.confusion(folder / "confusion.png", np.array(m["confusion_matrix"]), class_names, folder.name)
    table = results_table(meta["task"], cfg["tasks"][meta["task"]], meta["model"], m) + (
        f"\nColour-only baseline (logistic regression on per-patch mean RGB): "
        f"{100 * m['colour_baseline_accuracy']:.1f} % accuracy.\n")
    with atomic_path(folder / "tables.md") as tmp:
        tmp.write_text(table)
    write_summary(folder, STEP, cfg, started, experiment=folder.name, accuracy=m["accuracy"], auc=m["auc"])
    write_experiments_summary(folder.parent, STEP, cfg, started)
    ci, ci_patches = m["ci95"]["accuracy"], m["ci95_patches"]["accuracy"]
    ci_text = (f"95 % CI {ci[0]:.4f}-{ci[1]:.4f} over {m['ci95_groups']} slides/patients"
               if m["ci95_groups"] > 1 else "no CI over slides/patients: the test split holds one")
    if 1 < m["ci95_groups"] < 10:
        ci_text += " (few: a rough interval)"
    print(f"   accuracy {m['accuracy']:.4f} ({ci_text}; over patches {ci_patches[0]:.4f}-{ci_patches[1]:.4f})"
          f"  balanced {m['balanced_accuracy']:.4f}  AUC {m['auc']:.4f}  colour-only baseline "
          f"{m['colour_baseline_accuracy']:.4f}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
