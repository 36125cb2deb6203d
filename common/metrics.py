"""Metrics for clustering, dataset-source probing and classification, with bootstrap intervals.

Purpose: the numbers reported by 04_cluster (Hungarian-matched clustering accuracy, ARI, NMI,
silhouette, a linear probe for dataset source) and by 06_evaluate (accuracy, balanced accuracy,
AUC, per-class precision / recall / F1, confusion matrix, ROC curves, percentile-bootstrap CIs).

Inputs:  integer label vectors ``(N,)``, cluster assignments ``(N,)``, feature matrices ``(N, D)``,
         class-score matrices ``(N, C)`` (probabilities or log-probabilities; binary tasks use 2 columns),
         optionally the slide / patient of each sample for a bootstrap over groups.
Outputs: plain dicts of Python floats / lists, ready for ``json.dump``.

Usage::

    accuracy, mapping = hungarian_accuracy(true, cluster)
    report = classification_metrics(labels, probs, ["negative", "positive"])
    intervals = bootstrap_ci(labels, probs, ["negative", "positive"], n_boot=1000, seed=0)
"""

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    balanced_accuracy_score,
    confusion_matrix,
    normalized_mutual_info_score,
    precision_recall_fscore_support,
    roc_curve,
    silhouette_score,
)
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.errors import UserError

# Bootstrap resamples are processed in chunks of about this many (resample, sample) cells, which
# bounds memory (a few float64 arrays of this size) whatever N is.
_BOOTSTRAP_CHUNK_CELLS = 1 << 21
# lbfgs on standardised features converges well within this on ~100k x 2048 problems.
_PROBE_MAX_ITER = 5000


class MetricsError(UserError):
    """Inputs to a metric have inconsistent shapes or impossible values."""


def hungarian_accuracy(true: np.ndarray, cluster: np.ndarray) -> tuple[float, dict[int, int]]:
    """Clustering accuracy under the best one-to-one matching of clusters to labels.

    Args:
        true: int ``(N,)`` ground-truth labels (any values).
        cluster: int ``(N,)`` cluster assignments (any values; the count may differ from the labels').

    Returns:
        ``(accuracy, mapping)``: the fraction of samples whose matched label is right, in [0, 1], and
        ``{cluster: label}`` for the matched clusters. Unmatched clusters (more clusters than labels)
        count as wrong.
    """
    true, cluster = np.asarray(true), np.asarray(cluster)
    if true.shape != cluster.shape or true.ndim != 1 or true.size == 0:
        raise MetricsError(f"true {true.shape} and cluster {cluster.shape} must be equal, non-empty (N,)")
    label_values, label_index = np.unique(true, return_inverse=True)
    cluster_values, cluster_index = np.unique(cluster, return_inverse=True)
    counts = np.zeros((len(cluster_values), len(label_values)), dtype=np.int64)
    np.add.at(counts, (cluster_index, label_index), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = {cluster_values[r].item(): label_values[c].item() for r, c in zip(rows, cols, strict=True)}
    return float(counts[rows, cols].sum() / true.size), mapping


def cluster_metrics(
    features: np.ndarray, true: np.ndarray, cluster: np.ndarray, seed: int, silhouette_sample: int = 5000
) -> dict[str, float]:
    """Agreement between a clustering and the true grouping, plus cluster separation.

    Args:
        features: float ``(N, D)`` the features that were clustered (for the silhouette).
        true: int ``(N,)`` true labels (e.g. source dataset).
        cluster: int ``(N,)`` cluster assignments.
        seed: seed of the silhouette subsample.
        silhouette_sample: the silhouette uses a seeded subsample of this many rows when N is larger
            (it costs O(N^2)).

    Returns:
        ``{"accuracy", "ari", "nmi", "silhouette"}`` floats; the silhouette is NaN when fewer than two
        clusters (or a cluster per sample) are present.
    """
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(true):
        raise MetricsError(f"features {features.shape} must be (N, D) with N = len(true) = {len(true)}")
    accuracy, _ = hungarian_accuracy(true, cluster)
    sample_size = silhouette_sample if len(features) > silhouette_sample else None
    try:
        silhouette = float(silhouette_score(features, cluster, sample_size=sample_size, random_state=seed))
    except ValueError:  # silhouette is undefined for 1 or N distinct clusters
        silhouette = float("nan")
    return {
        "accuracy": accuracy,
        "ari": float(adjusted_rand_score(true, cluster)),
        "nmi": float(normalized_mutual_info_score(true, cluster)),
        "silhouette": silhouette,
    }


def independent_units(source: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, str]:
    """The units that may be treated as independent: a slide or patient, or the patch itself where its
    slide is unknown.

    PCam without its meta CSVs gives every patch the group ``"unknown"`` (01's contract); one group
    "unknown" is not a slide, and resampling it as one would give a meaningless interval. Such patches
    become their own unit, so intervals over them are patch-level, and the label says so.

    Args:
        source: str ``(N,)`` source of each patch (``"pcam"``, ``"dlbcl"``, ...).
        group: str ``(N,)`` slide or patient of each patch; ``"unknown"`` where it is not known.

    Returns:
        ``(units, label)``: str ``(N,)`` unit per patch (``"<source>/<group>"``, or ``"patch/<i>"`` zero-padded), and
        ``"slides/patients"``, ``"patches"`` (no group known) or ``"slides/patients; patches where the
        slide is unknown"``.
    """
    source, group = np.asarray(source).astype(str), np.asarray(group).astype(str)
    if source.shape != group.shape or source.ndim != 1:
        raise MetricsError(f"source {source.shape} and group {group.shape} must be equal (N,)")
    unknown = group == "unknown"
    # zero-padded, so that sorted units are in patch order (all unknown: the same draws as a patch bootstrap)
    own = np.char.add("patch/", np.char.zfill(np.arange(len(group)).astype(str), len(str(len(group)))))
    units = np.where(unknown, own, np.char.add(np.char.add(source, "/"), group))
    label = ("patches" if unknown.all() else "slides/patients; patches where the slide is unknown" if unknown.any()
             else "slides/patients")
    return units, label


def domain_probe(features: np.ndarray, source: np.ndarray, seed: int, folds: int = 5,
                 groups: np.ndarray | None = None) -> float:
    """How well a linear classifier tells the source dataset from the features (0.5 = not at all).

    Patches of one slide share its stain and tissue, so a probe cross-validated over patches can learn
    slides rather than sources; with ``groups`` no slide or patient is in a training and a test fold
    (stratified group k-fold).

    Args:
        features: float ``(N, D)``.
        source: ``(N,)`` source of each row (ints or strings, e.g. ``"pcam"`` / ``"dlbcl"``).
        seed: seed of the fold shuffling.
        folds: number of cross-validation folds; with ``groups``, at most the number of groups of the
            source with the fewest.
        groups: optional ``(N,)`` slide / patient of each row (e.g. from `independent_units`).

    Returns:
        Balanced accuracy of the out-of-fold predictions of standardised logistic regression, in [0, 1]
        (pooled over folds, so a fold holding one source does not make the score undefined).
    """
    features, source = np.asarray(features), np.asarray(source)
    if features.ndim != 2 or source.shape != (len(features),):
        raise MetricsError(f"features {features.shape} must be (N, D) and source {source.shape} (N,)")
    groups = np.arange(len(source)) if groups is None else np.asarray(groups)
    if groups.shape != source.shape:
        raise MetricsError(f"groups {groups.shape} must be (N,) with N = {len(source)}")
    names, source_index = np.unique(source, return_inverse=True)
    groups_per_source = [len(np.unique(groups[source_index == k])) for k in range(len(names))]
    folds = min(folds, *groups_per_source)
    if len(names) < 2 or folds < 2:
        raise MetricsError(f"domain probe needs >= 2 sources with >= 2 groups (slides/patients) each, got "
                           f"{dict(zip(names.tolist(), groups_per_source, strict=True))}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=_PROBE_MAX_ITER))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(probe, features, source_index, cv=splitter, groups=groups)
    return float(balanced_accuracy_score(source_index, predicted))


def _check_predictions(labels, probs, class_names) -> tuple[np.ndarray, np.ndarray]:
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != num_classes or num_classes < 2:
        raise MetricsError(f"probs {probs.shape} must be (N, C) with C = len(class_names) = {num_classes} >= 2")
    if labels.shape != (len(probs),) or labels.size == 0:
        raise MetricsError(f"labels {labels.shape} must be non-empty (N,) with N = {len(probs)}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise MetricsError(f"labels must be integers in [0, {num_classes - 1}], got {np.unique(labels)[:10]}")
    return labels, probs


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for many sample weightings at once (Mann-Whitney statistic, ties count one half).

    Args:
        scores: float ``(N,)`` score of the positive class.
        positive: bool ``(N,)``.
        weights: float ``(B, N)`` non-negative sample weights (bootstrap multiplicities).

    Returns:
        float64 ``(B,)``; NaN where a weighting leaves no positive or no negative sample.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores, is_positive = scores[order], positive[order]
    weights = weights[:, order]
    # Per group of tied scores: the weight of its positives and negatives, and of negatives below it.
    group_last = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    negatives_through = np.cumsum(weights * ~is_positive, axis=1)[:, group_last]
    positives_through = np.cumsum(weights * is_positive, axis=1)[:, group_last]
    negatives_below = np.pad(negatives_through[:, :-1], ((0, 0), (1, 0)))
    positives_in_group = np.diff(positives_through, axis=1, prepend=0.0)
    negatives_in_group = negatives_through - negatives_below
    pairs = positives_through[:, -1] * negatives_through[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (positives_in_group * (negatives_below + 0.5 * negatives_in_group)).sum(axis=1) / pairs
    return np.where(pairs > 0, auc, np.nan)


def _auc_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Classes whose one-vs-rest AUC is defined: present, with at least one other class present."""
    present = np.flatnonzero(np.bincount(labels, minlength=num_classes) > 0)
    return present if len(present) > 1 else present[:0]


def _auc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray, auc_classes: np.ndarray) -> np.ndarray:
    """Binary AUC of ``probs[:, 1]``, or one-vs-rest macro AUC over ``auc_classes``; ``(B,)``.

    A weighting in which any of ``auc_classes`` has no positive or no negative sample gives NaN.
    """
    if probs.shape[1] == 2:
        return _weighted_auc(probs[:, 1], labels == 1, weights)
    if len(auc_classes) == 0:
        return np.full(len(weights), np.nan)
    per_class = [_weighted_auc(probs[:, c], labels == c, weights) for c in auc_classes]
    return np.mean(per_class, axis=0)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Standard classification report of argmax predictions.

    Args:
        labels: int ``(N,)`` true class indices in ``[0, C)``.
        probs: float ``(N, C)`` class scores: probabilities, binary tasks as ``(1 - p, p)``, or
            log-probabilities (06 passes these: they do not saturate; only each column's order and
            each row's argmax matter).
        class_names: ``C`` names, index-aligned with the columns of ``probs``.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``auc`` (binary: ROC AUC of ``probs[:, 1]``; multi-class:
        one-vs-rest macro over the classes present with positives and negatives, as scikit-learn's
        ``multi_class="ovr"`` when all are present; NaN if undefined), ``per_class``
        ``{name: {precision, recall, f1, support}}`` and ``confusion_matrix`` (list of C rows, row =
        true class, column = predicted).
    """
    labels, probs = _check_predictions(labels, probs, class_names)
    num_classes = len(class_names)
    pred = probs.argmax(axis=1)
    auc = _auc(labels, probs, np.ones((1, len(labels))), _auc_classes(labels, num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=np.arange(num_classes), zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "auc": float(auc[0]),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(labels, pred, labels=np.arange(num_classes)).tolist(),
    }


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict:
    """Percentile-bootstrap confidence intervals of the main classification metrics.

    Resamples are drawn as multiplicity weights (``(B, N)`` counts), so every metric of a chunk of
    resamples is a matrix product or a cumulative sum rather than a Python loop over resamples.

    Patches of one slide or patient are not independent: resampling patches then gives intervals far
    too narrow when a test split holds few patients (measured: 21 patients x 200 patches, 0.784-0.808
    by patches vs 0.735-0.853 by patients). With ``groups`` the resampling unit is the group (a cluster
    bootstrap): each resample draws as many groups as there are, with replacement, and weighs every
    patch by how often its group was drawn.

    Args:
        labels: int ``(N,)`` true class indices in ``[0, C)``.
        probs: float ``(N, C)`` class scores: probabilities or log-probabilities (only each column's
            order and each row's argmax matter).
        class_names: ``C`` class names.
        n_boot: number of resamples (with replacement).
        seed: seed of the resampling.
        level: two-sided coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.
        groups: optional ``(N,)`` slide / patient of each sample: resample groups instead of samples.
            With a single group there is nothing to resample and every interval is ``[nan, nan]``.

    Returns:
        ``{"accuracy": [lo, hi], "balanced_accuracy": [lo, hi], "auc": [lo, hi],
        "per_class": {name: {"precision": [lo, hi], "recall": [lo, hi], "f1": [lo, hi]}}}``.
        Resamples in which a metric is undefined (AUC with a class missing; precision of a class
        never predicted) are left out of that metric's percentiles; ``[nan, nan]`` if none remain.
    """
    labels, probs = _check_predictions(labels, probs, class_names)
    if n_boot < 1 or not 0 < level < 1:
        raise MetricsError(f"need n_boot >= 1 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    num_samples, num_classes = probs.shape
    if groups is None:
        unit = np.arange(num_samples)
    else:
        groups = np.asarray(groups)
        if groups.shape != (num_samples,):
            raise MetricsError(f"groups {groups.shape} must be (N,) with N = {num_samples}")
        unit = np.unique(groups, return_inverse=True)[1]
    num_units = int(unit.max()) + 1
    eye = np.eye(num_classes)
    true_onehot, pred_onehot = eye[labels], eye[probs.argmax(axis=1)]
    auc_classes = _auc_classes(labels, num_classes)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // num_samples)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("accuracy", "balanced", "auc", "p", "r", "f1")}
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        draws = rng.integers(0, num_units, size=(size, num_units))
        # Row b counts how often each unit (sample or group) occurs in resample b; a sample's weight
        # is its unit's count.
        offsets = (draws + num_units * np.arange(size)[:, None]).ravel()
        counts = np.bincount(offsets, minlength=size * num_units).reshape(size, num_units).astype(float)
        weights = counts[:, unit]
        support = weights @ true_onehot
        predicted = weights @ pred_onehot
        hits = weights @ (true_onehot * pred_onehot)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(support > 0, hits / support, np.nan)
            parts["p"].append(np.where(predicted > 0, hits / predicted, np.nan))
            parts["f1"].append(np.where(support + predicted > 0, 2 * hits / (support + predicted), np.nan))
        parts["r"].append(recall)
        parts["accuracy"].append(hits.sum(axis=1) / weights.sum(axis=1))
        # As scikit-learn: average recall over the classes present in this resample.
        parts["balanced"].append(np.nanmean(recall, axis=1))
        parts["auc"].append(_auc(labels, probs, weights, auc_classes))
    values = {key: np.concatenate(chunks) for key, chunks in parts.items()}
    tail_pct = 50.0 * (1.0 - level)

    def interval(samples: np.ndarray) -> list[float]:
        samples = samples[~np.isnan(samples)]
        if samples.size == 0 or num_units < 2:  # one unit: every resample is the data itself
            return [float("nan"), float("nan")]
        return [float(v) for v in np.percentile(samples, [tail_pct, 100.0 - tail_pct])]

    return {
        "accuracy": interval(values["accuracy"]),
        "balanced_accuracy": interval(values["balanced"]),
        "auc": interval(values["auc"]),
        "per_class": {
            name: {
                "precision": interval(values["p"][:, c]),
                "recall": interval(values["r"][:, c]),
                "f1": interval(values["f1"][:, c]),
            }
            for c, name in enumerate(class_names)
        },
    }


def within_source_metrics(labels: np.ndarray, log_probs: np.ndarray, source: np.ndarray, class_names: list[str],
                          units: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Binary metrics inside each source of a multi-source task (mixed: PCam negative vs breast, DLBCL
    negative vs lymphoma): does the model tell cancer from tissue, or only one dataset from the other?

    Within a source, the two classes it holds are scored by the model's probabilities renormalised over
    those two classes (a PCam patch is negative or breast, whatever the lymphoma probability). Beside
    them, ``predicted_other_class`` is the fraction of the source's patches whose 3-class prediction is
    a class this source never holds (a PCam patch called lymphoma): dataset confusion, not cancer
    detection.

    Args:
        labels: int ``(N,)`` class indices in ``[0, C)``.
        log_probs: float ``(N, C)`` log-probabilities.
        source: str ``(N,)`` source of each patch.
        class_names: ``C`` names.
        units: ``(N,)`` resampling unit of each patch (`independent_units`), for the intervals.
        n_boot, seed: bootstrap resamples and seed.

    Returns:
        ``{source: {"classes": [a, b], "n", "accuracy", "balanced_accuracy", "auc", "ci95":
        {accuracy, balanced_accuracy, auc: [lo, hi]}, "predicted_other_class"}}`` for each source with
        exactly two classes present; a source with another count gets ``{"classes", "n"}`` only.
    """
    labels, log_probs = _check_predictions(labels, log_probs, class_names)
    source, units = np.asarray(source).astype(str), np.asarray(units)
    if source.shape != labels.shape or units.shape != labels.shape:
        raise MetricsError(f"source {source.shape} and units {units.shape} must be (N,) with N = {len(labels)}")
    out = {}
    for name in np.unique(source):
        sel = source == name
        present = np.unique(labels[sel])
        entry = {"classes": [class_names[c] for c in present], "n": int(sel.sum())}
        if len(present) == 2:
            pair = log_probs[np.ix_(sel, present)]
            pair = pair - np.logaddexp(pair[:, :1], pair[:, 1:])  # renormalised over the two classes
            binary = (labels[sel] == present[1]).astype(np.int64)
            names = entry["classes"]
            m = classification_metrics(binary, pair, names)
            ci = bootstrap_ci(binary, pair, names, n_boot=n_boot, seed=seed, groups=units[sel])
            other = ~np.isin(log_probs[sel].argmax(axis=1), present)
            entry |= {key: m[key] for key in ("accuracy", "balanced_accuracy", "auc")}
            entry |= {"ci95": {key: ci[key] for key in ("accuracy", "balanced_accuracy", "auc")},
                      "predicted_other_class": float(other.mean())}
        out[str(name)] = entry
    return out


def roc_points(labels: np.ndarray, probs: np.ndarray, class_names: list[str] | None = None) -> dict:
    """ROC curves for plotting.

    Args:
        labels: int ``(N,)`` true class indices in ``[0, C)``.
        probs: float ``(N, C)`` class scores (probabilities or log-probabilities).
        class_names: optional ``C`` names used as the keys (default: the class indices).

    Returns:
        ``{class: {"fpr": [...], "tpr": [...], "auc": float}}``: binary tasks give one curve (class 1,
        scored by ``probs[:, 1]``); multi-class tasks one one-vs-rest curve per class that has both
        positive and negative samples.
    """
    num_classes = np.shape(probs)[-1]
    names = list(range(num_classes)) if class_names is None else list(class_names)
    labels, probs = _check_predictions(labels, probs, names)
    curve_classes = [1] if num_classes == 2 else range(num_classes)
    curves = {}
    for c in curve_classes:
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        curves[names[c]] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(np.trapezoid(tpr, fpr))}
    return curves
