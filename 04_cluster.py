"""04 · Do the two datasets mix? K-means on the negatives of both sources (thesis §4.4, §5.3, §6.1).

For each feature set (linearised pixels; ResNet-18 penultimate features) and each stain method:
PCA (cluster.pca_components, thesis: 2) -> K-means (k = 2, k-means++) -> Hungarian matching of
clusters to sources -> accuracy, silhouette, ARI, NMI. Accuracy near 0.5 and ARI near 0 mean the
sources mix. A far more sensitive check is added: the domain probe, a cross-validated logistic
regression predicting the source from the full features (balanced accuracy; 0.5 = indistinguishable),
cross-validated by slide/patient so that it cannot score by recognising slides. Both sources give the
same number of negatives (the smaller source sets it), so the chance level of the clustering accuracy
is 0.5 and is printed. ResNet-18 rows from random weights (`cluster.weights: none`) say so and are not
set beside the thesis's ImageNet numbers.

Reads:  runs/<run>/03_normalize/<method>/{pcam_train,dlbcl}.h5 (negatives only)
Writes (runs/<run>/04_cluster/):
    metrics.json      {"rows": [{features, weights, method, accuracy, silhouette, ari, nmi, domain_probe}, ...],
                       "chance_accuracy", "n_per_source", "probe_groups"}
    assignments.csv   features,method,index,source,cluster — every metric recomputes from it
    table.md          the thesis's layout, its numbers beside ours
    scatter_<features>_<method>.png   PCA scatter by source and by cluster, density per source
    features/resnet18_<method>.npy    the ResNet-18 features, saved for your own analyses (04 does
                                      not read them back; pixel features are not saved)
    summary.json

Usage:
    python 04_cluster.py --config config.yaml [--set cluster.n_per_source=1000]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import h5py
import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from common import cli, data, metrics, models, plots
from common.errors import UserError
from common.steps import atomic_path, begin_step, require_step, write_json, write_summary

STEP = "04_cluster"
# Thesis §6.1 (ResNet-18 ImageNet features; "after" = stain-normalised, Macenko best)
THESIS = {("pixels", "none"): (0.512, None, 0.009), ("resnet18", "none"): (0.723, None, 0.198),
          ("resnet18", "macenko"): (0.534, None, 0.004)}
PROBE_MAX_DIM = 2048  # linearised pixels (27,648-d) are PCA-reduced to 128-d for the probe
MIN_NEGATIVES = 5  # per source: the domain probe's 5 stratified cross-validation folds need one each


def sample_negatives(folder: Path, n_per_source: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Seeded indices of negatives per source file, the same number from each (at most n_per_source; the
    source with the fewest sets it), and the group (slide/patient) of each, str (N,) in the same order.
    The same for every method (03 keeps order).

    Raises:
        UserError: a source has fewer than MIN_NEGATIVES negatives (nothing to compare: exit 2).
    """
    rng = np.random.default_rng(seed)
    negatives, groups = {}, {}
    for stem in ("pcam_train", "dlbcl"):
        with h5py.File(folder / f"{stem}.h5", "r") as f:
            negatives[stem] = np.flatnonzero(f["y"][:] == 0)
            groups[stem] = f["group"].asstr()[:].astype(str)
        if len(negatives[stem]) < MIN_NEGATIVES:
            why = ("02 writes them only with tile_dlbcl.negatives: true" if stem == "dlbcl"
                   else "check the filter_pcam thresholds of 01")
            raise UserError(f"{folder / f'{stem}.h5'} holds {len(negatives[stem])} negatives (label 0); 04 "
                            f"compares the negatives of both sources and needs at least {MIN_NEGATIVES} of each "
                            f"({why})")
    n = min(n_per_source, *(len(neg) for neg in negatives.values()))
    index = {stem: np.sort(rng.choice(neg, n, replace=False)) for stem, neg in negatives.items()}
    return index, np.concatenate([groups[stem][idx] for stem, idx in index.items()])


def load_negatives(folder: Path, index: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The sampled negatives of both sources, uint8 (N, 96, 96, 3), and each one's source name."""
    file = np.concatenate([np.full(len(idx), stem) for stem, idx in index.items()])
    x = data.read_patches(folder, file, np.concatenate(list(index.values())))
    return x, np.char.partition(file, "_")[:, 0]


def features_for(kind: str, x: np.ndarray, extractor, batch_size: int, device) -> np.ndarray:
    if kind == "pixels":
        return x.reshape(len(x), -1).astype(np.float32) / 255
    return models.extract_features(extractor, x, models.IMAGENET_MEAN, models.IMAGENET_STD,
                                   batch_size=batch_size, device=str(device))


def analyse(feats: np.ndarray, source: np.ndarray, cc: dict, seed: int,
            units: np.ndarray | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """PCA -> K-means -> metrics on the PCA points; domain probe on the full features, its folds grouped
    by `units` (N,) (slide/patient, `metrics.independent_units`; None: every row its own)."""
    points = PCA(n_components=min(cc["pca_components"], *feats.shape), random_state=seed).fit_transform(feats)
    cluster = KMeans(n_clusters=2, init="k-means++", n_init=cc["n_init"], random_state=seed).fit_predict(points)
    truth = (source == "dlbcl").astype(int)
    row = metrics.cluster_metrics(points, truth, cluster, seed=seed)
    if feats.shape[1] <= PROBE_MAX_DIM:
        probe_feats = feats
    else:
        probe_feats = PCA(min(128, len(feats) - 1), random_state=seed).fit_transform(feats)
    row["domain_probe"] = metrics.domain_probe(probe_feats, truth, seed=seed, groups=units)
    return row, points, cluster


def thesis_table(rows: list[dict], chance: float) -> str:
    """Our rows beside the thesis's (ImageNet ResNet-18 features); rows from other weights are marked
    and get no thesis value, since they are not comparable with it."""
    lines = ["| Features | Method | Accuracy | Silhouette | ARI | NMI | Domain probe | Thesis acc / ARI |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = THESIS.get((r["features"], r["method"]))
        ref_text = f"{ref[0]:.3f} / {ref[2]:.3f}" if ref else "–"
        features = r["features"]
        if r["weights"] == "none":
            features, ref_text = f"{features} (random weights)", "not comparable (random weights)"
        elif r["weights"] not in (None, "imagenet", "imagenet_v1"):
            features, ref_text = f"{features} (weights {Path(r['weights']).name})", "not comparable (other weights)"
        lines.append(f"| {features} | {r['method']} | {r['accuracy']:.3f} | {r['silhouette']:.3f} | "
                     f"{r['ari']:.3f} | {r['nmi']:.3f} | {r['domain_probe']:.3f} | {ref_text} |")
    lines += ["", f"Chance level: clustering accuracy {chance:.3f} (equal negatives per source), ARI 0, "
              "domain probe 0.5 (balanced accuracy, cross-validated by slide/patient)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    cfg, device = cli.start(argv, __doc__, STEP)
    cc, seed = cfg["cluster"], cfg["run"]["seed"]
    methods = cfg["normalize"]["methods"]
    norm = require_step(cfg, "03_normalize", outputs=[f"{m}/{s}.h5" for m in methods for s in ("pcam_train", "dlbcl")])
    out = begin_step(cfg, STEP)
    (out / "features").mkdir(exist_ok=True)
    index, groups = sample_negatives(norm / methods[0], cc["n_per_source"], seed)
    n_sampled = {stem: len(idx) for stem, idx in index.items()}
    chance = max(n_sampled.values()) / sum(n_sampled.values())
    print(f"   negatives: {n_sampled['pcam_train']} PCam, {n_sampled['dlbcl']} DLBCL (the same from each source); "
          f"chance level of the clustering accuracy {chance:.3f}; methods {methods}")
    extractor = None
    if "resnet18" in cc["features"]:
        extractor = models.penultimate(models.build_model("resnet18", 1000, cc["weights"]))

    rows, assignments = [], []
    for method in methods:
        x, source = load_negatives(norm / method, index)
        units, probe_groups = metrics.independent_units(source, groups)
        for kind in cc["features"]:
            cache = out / "features" / f"{kind}_{method}.npy"
            feats = features_for(kind, x, extractor, cc["batch_size"], device)
            if kind != "pixels":
                with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                    np.save(f, feats)
            row, points, cluster = analyse(feats, source, cc, seed, units)
            rows.append({"features": kind, "weights": None if kind == "pixels" else cc["weights"],
                         "method": method, **row})
            n = len(source)
            assignments.append(np.column_stack([np.full(n, kind), np.full(n, method), np.arange(n), source, cluster]))
            label = f"{kind} (random weights)" if kind != "pixels" and cc["weights"] == "none" else kind
            plots.cluster_scatter(out / f"scatter_{kind}_{method}.png", points, source, cluster,
                                  f"{label} · {method}", row, chance)
            print(f"   {kind:8s} {method:9s} acc {row['accuracy']:.3f}  ARI {row['ari']:.3f}  "
                  f"silhouette {row['silhouette']:.3f}  probe {row['domain_probe']:.3f}")

    with atomic_path(out / "assignments.csv") as tmp:
        np.savetxt(tmp, np.concatenate(assignments), fmt="%s", delimiter=",", comments="",
                   header="features,method,index,source,cluster")
    write_json(out / "metrics.json", {"rows": rows, "chance_accuracy": chance, "n_per_source": n_sampled,
                                      "probe_groups": probe_groups})
    table = thesis_table(rows, chance)
    with atomic_path(out / "table.md") as tmp:
        Path(tmp).write_text("# Clustering of negatives (K-means, k = 2, Hungarian matching)\n\n" + table)
    write_summary(out, STEP, cfg, started, rows=rows, n_per_source=n_sampled, chance_accuracy=chance)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
