"""Tests for common/metrics.py against hand-computed values and direct scikit-learn calls."""

import itertools

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.cluster import KMeans
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from common.metrics import (
    MetricsError,
    _weighted_auc,
    bootstrap_ci,
    classification_metrics,
    cluster_metrics,
    domain_probe,
    hungarian_accuracy,
    independent_units,
    roc_points,
    within_source_metrics,
)

# Tiny binary example; by hand: pred = [0, 0, 1, 0, 1, 1], confusion [[2, 1], [1, 2]], and of the 9
# (positive, negative) pairs 7 are ranked correctly (0.35 beats only 0.1).
BINARY_LABELS = np.array([0, 0, 0, 1, 1, 1])
BINARY_P1 = np.array([0.1, 0.4, 0.7, 0.35, 0.8, 0.9])

# Tiny 3-class example; by hand: pred = [0, 1, 0, 2], confusion [[1,0,0],[0,1,0],[1,0,1]],
# one-vs-rest AUCs 1, 1 and 3.5 / 4 (class 2: the 0.3 positive ties the 0.3 negative).
MULTI_LABELS = np.array([0, 1, 2, 2])
MULTI_PROBS = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])


def _random_predictions(rng, num_samples, num_classes, skill=1.5):
    labels = rng.integers(0, num_classes, num_samples)
    logits = rng.normal(size=(num_samples, num_classes)) + skill * np.eye(num_classes)[labels]
    probs = np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), 2)
    # Rounding creates ties, which AUC implementations must count as one half; the last column
    # keeps each row summing to 1, as scikit-learn's multi-class AUC requires.
    probs[:, -1] = np.round(1 - probs[:, :-1].sum(axis=1), 2)
    return labels, probs


def test_hungarian_2x2_by_hand():
    # Confusion (cluster x label): cluster 0 -> {0: 1, 1: 4}, cluster 1 -> {0: 2, 1: 1};
    # the best matching is 0 -> 1, 1 -> 0 with 4 + 2 = 6 of 8 right.
    true = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    cluster = np.array([1, 1, 0, 0, 0, 0, 0, 1])
    accuracy, mapping = hungarian_accuracy(true, cluster)
    assert accuracy == pytest.approx(0.75)
    assert mapping == {0: 1, 1: 0}


def test_hungarian_3x3_permuted_labels_by_hand():
    # Labels 5 / 7 / 9 are clustered as 2 / 0 / 1 with 2 mistakes: 8 of 10 right.
    true = np.array([5, 5, 5, 5, 7, 7, 7, 9, 9, 9])
    cluster = np.array([2, 2, 2, 0, 0, 0, 1, 1, 1, 1])
    accuracy, mapping = hungarian_accuracy(true, cluster)
    assert accuracy == pytest.approx(0.8)
    assert mapping == {2: 5, 0: 7, 1: 9}


def test_hungarian_unequal_counts():
    more_clusters = hungarian_accuracy(np.array([0, 0, 1, 1, 1, 1]), np.array([0, 0, 1, 1, 2, 2]))
    assert more_clusters[0] == pytest.approx(4 / 6)
    assert more_clusters[1][0] == 0 and len(more_clusters[1]) == 2
    fewer_clusters = hungarian_accuracy(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 1]))
    assert fewer_clusters == (pytest.approx(4 / 6), {0: 0, 1: 2})


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(3)
    true, cluster = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    best = max(np.mean(np.array(perm)[cluster] == true) for perm in itertools.permutations(range(4)))
    assert hungarian_accuracy(true, cluster)[0] == pytest.approx(best)


def test_hungarian_rejects_mismatched_lengths():
    with pytest.raises(MetricsError, match="must be equal"):
        hungarian_accuracy(np.zeros(3, int), np.zeros(4, int))


def test_cluster_metrics_identical_sources_are_chance():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2000, 8))
    source = rng.integers(0, 2, 2000)
    cluster = KMeans(2, n_init=3, random_state=0).fit_predict(features)
    result = cluster_metrics(features, source, cluster, seed=0, silhouette_sample=500)
    assert 0.5 <= result["accuracy"] < 0.55
    assert abs(result["ari"]) < 0.01 and result["nmi"] < 0.01


def test_cluster_metrics_separated_sources_are_found():
    rng = np.random.default_rng(1)
    source = np.repeat([0, 1], 200)
    features = rng.normal(size=(400, 4)) + 10.0 * source[:, None]
    cluster = 1 - source  # a relabelled but perfect clustering
    result = cluster_metrics(features, source, cluster, seed=0)
    assert result["accuracy"] == 1.0 and result["ari"] == pytest.approx(1.0)
    assert result["nmi"] == pytest.approx(1.0) and result["silhouette"] > 0.7


def test_silhouette_by_hand():
    # Point 0: a = 1, b = (10 + 11) / 2 -> 1 - 1 / 10.5; point 1: a = 1, b = 9.5 -> 1 - 1 / 9.5;
    # points 10 and 11 mirror them.
    features = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels = np.array([0, 0, 1, 1])
    expected = ((1 - 1 / 10.5) + (1 - 1 / 9.5)) / 2
    assert cluster_metrics(features, labels, labels, seed=0)["silhouette"] == pytest.approx(expected)
    single = cluster_metrics(features, labels, np.zeros(4, int), seed=0)
    assert np.isnan(single["silhouette"]) and single["accuracy"] == 0.5


def test_domain_probe_chance_and_shift():
    rng = np.random.default_rng(2)
    source = np.repeat(np.array(["pcam", "dlbcl"]), 300)
    features = rng.normal(size=(600, 16))
    assert 0.4 < domain_probe(features, source, seed=0) < 0.6
    # A 6-sigma shift along one axis: the Bayes-optimal balanced accuracy is Phi(3) = 0.9987.
    shifted = features + 6.0 * (source == "dlbcl")[:, None] * np.eye(16)[0]
    assert domain_probe(shifted, source, seed=0) > 0.98


def test_domain_probe_rejects_too_few_rows():
    with pytest.raises(MetricsError, match="2 groups"):
        domain_probe(np.zeros((4, 2)), np.array([0, 0, 0, 1]), seed=0, folds=5)
    with pytest.raises(MetricsError, match="2 groups"):  # one slide per source: nothing to hold out
        domain_probe(np.zeros((6, 2)), np.array([0, 0, 0, 1, 1, 1]), seed=0, groups=np.array([7, 7, 7, 8, 8, 8]))


def test_grouped_domain_probe_does_not_learn_slides():
    # Two sources that differ in nothing but their slides: each of 10 slides per source has its own
    # offset (stain, tissue). Folds over patches put every slide in training and test, so the probe
    # learns which slide is which source and scores far above chance; grouped folds hold whole slides
    # out and see through it.
    rng = np.random.default_rng(4)
    slide = np.repeat(np.arange(20), 30)
    source = np.where(slide < 10, "pcam", "dlbcl")
    features = rng.normal(scale=3.0, size=(20, 16))[slide] + rng.normal(size=(600, 16))
    by_patch = domain_probe(features, source, seed=0)
    by_slide = domain_probe(features, source, seed=0, groups=slide)
    assert by_patch > 0.9  # measured 0.962
    assert abs(by_slide - 0.5) < 0.1  # measured 0.493
    # A real source shift (20 along one axis, against slides spread 3 per axis) is still found.
    shifted = features + 20.0 * (source == "dlbcl")[:, None] * np.eye(16)[0]
    assert domain_probe(shifted, source, seed=0, groups=slide) > 0.85  # measured 0.922


def test_independent_units():
    source = np.array(["pcam", "pcam", "dlbcl", "dlbcl"])
    units, label = independent_units(source, np.array(["s1", "s1", "p1", "p2"]))
    assert units.tolist() == ["pcam/s1", "pcam/s1", "dlbcl/p1", "dlbcl/p2"] and label == "slides/patients"
    units, label = independent_units(source, np.array(["unknown"] * 4))
    assert len(set(units)) == 4 and label == "patches"  # every patch its own unit, never one group
    units, label = independent_units(source, np.array(["unknown", "unknown", "p1", "p1"]))
    assert units.tolist() == ["patch/0", "patch/1", "dlbcl/p1", "dlbcl/p1"]  # 4 patches: one digit
    assert label == "slides/patients; patches where the slide is unknown"


def test_patch_level_interval_when_every_group_is_unknown():
    # 01 without the meta CSVs writes group "unknown" for every PCam patch. One "group" would give
    # [nan, nan] (or, as before, a nonsense interval); the units make the interval patch-level: the
    # same as resampling patches, with the same seed.
    rng = np.random.default_rng(5)
    labels, probs = _random_predictions(rng, 200, 2)
    units, label = independent_units(np.full(200, "pcam"), np.full(200, "unknown"))
    as_units = bootstrap_ci(labels, probs, ["a", "b"], n_boot=200, seed=3, groups=units)
    as_patches = bootstrap_ci(labels, probs, ["a", "b"], n_boot=200, seed=3)
    assert label == "patches"
    assert as_units["accuracy"] == as_patches["accuracy"]
    lo, hi = as_units["accuracy"]
    assert lo < accuracy_score(labels, probs.argmax(1)) < hi and hi - lo < 0.2
    one_group = bootstrap_ci(labels, probs, ["a", "b"], n_boot=200, seed=3, groups=np.full(200, "unknown"))
    assert np.isnan(one_group["accuracy"]).all()


def test_within_source_metrics_by_hand():
    # mixed: 0 negative, 1 breast (PCam only), 2 lymphoma (DLBCL only).
    names = ["negative", "breast", "lymphoma"]
    labels = np.array([0, 0, 1, 1, 0, 0, 2, 2])
    source = np.array(["pcam"] * 4 + ["dlbcl"] * 4)
    probs = np.array([
        [0.7, 0.2, 0.1],  # pcam negative, right
        [0.2, 0.1, 0.7],  # pcam negative called lymphoma: another source's class; vs breast 0.2 > 0.1
        [0.3, 0.6, 0.1],  # pcam breast, right
        [0.5, 0.4, 0.1],  # pcam breast called negative
        [0.8, 0.1, 0.1],  # dlbcl negative, right
        [0.4, 0.5, 0.1],  # dlbcl negative called breast; vs lymphoma 0.4 > 0.1: negative, right
        [0.1, 0.1, 0.8],  # dlbcl lymphoma, right
        [0.1, 0.2, 0.7],  # dlbcl lymphoma, right
    ])
    out = within_source_metrics(labels, np.log(probs), source, names, np.arange(8).astype(str), n_boot=50)
    pcam, dlbcl = out["pcam"], out["dlbcl"]
    assert pcam["classes"] == ["negative", "breast"] and dlbcl["classes"] == ["negative", "lymphoma"]
    # pcam, renormalised over (negative, breast): preds 0, 0, 1, 0 -> 3 of 4 right, recalls 1 and 1/2
    assert pcam["accuracy"] == pytest.approx(0.75) and pcam["balanced_accuracy"] == pytest.approx(0.75)
    # breast scores p_b / (p_n + p_b): negatives 2/9, 1/3; positives 2/3, 4/9: every pair ranked right,
    # though 4/9 < 1/2 is called negative
    assert pcam["auc"] == pytest.approx(1.0)
    assert pcam["predicted_other_class"] == pytest.approx(0.25)
    assert dlbcl["accuracy"] == 1.0 and dlbcl["auc"] == 1.0 and dlbcl["predicted_other_class"] == 0.25
    assert pcam["ci95"]["accuracy"][0] <= 0.75 <= pcam["ci95"]["accuracy"][1]
    one_class = within_source_metrics(labels[:2], np.log(probs[:2]), source[:2], names, np.array(["a", "b"]))
    assert one_class == {"pcam": {"classes": ["negative"], "n": 2}}


def test_classification_metrics_binary_by_hand():
    probs = np.stack([1 - BINARY_P1, BINARY_P1], axis=1)
    result = classification_metrics(BINARY_LABELS, probs, ["negative", "positive"])
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["balanced_accuracy"] == pytest.approx(2 / 3)
    assert result["auc"] == pytest.approx(7 / 9)
    assert result["confusion_matrix"] == [[2, 1], [1, 2]]
    for name in ("negative", "positive"):
        assert result["per_class"][name] == pytest.approx(
            {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
        )


def test_classification_metrics_multiclass_by_hand():
    result = classification_metrics(MULTI_LABELS, MULTI_PROBS, ["negative", "breast", "lymphoma"])
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert result["auc"] == pytest.approx((1 + 1 + 0.875) / 3)
    assert result["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert result["per_class"]["negative"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    assert result["per_class"]["lymphoma"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )


@pytest.mark.parametrize("num_classes", [2, 3])
def test_classification_metrics_equal_sklearn(num_classes):
    labels, probs = _random_predictions(np.random.default_rng(num_classes), 500, num_classes)
    names = [f"class{c}" for c in range(num_classes)]
    result = classification_metrics(labels, probs, names)
    pred = probs.argmax(axis=1)
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    if num_classes == 2:
        expected_auc = roc_auc_score(labels, probs[:, 1])
    else:
        expected_auc = roc_auc_score(labels, probs, multi_class="ovr")
    assert result["auc"] == pytest.approx(expected_auc, abs=1e-12)
    assert result["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(labels, pred)
    for c, name in enumerate(names):
        assert result["per_class"][name] == pytest.approx(
            {"precision": precision[c], "recall": recall[c], "f1": f1[c], "support": support[c]}
        )


def test_classification_metrics_rejects_bad_shapes():
    with pytest.raises(MetricsError, match="len\\(class_names\\)"):
        classification_metrics(BINARY_LABELS, np.zeros((6, 3)), ["a", "b"])
    with pytest.raises(MetricsError, match="integers in"):
        classification_metrics(np.array([0, 2]), np.zeros((2, 2)), ["a", "b"])


def test_weighted_auc_equals_sklearn_sample_weight():
    rng = np.random.default_rng(4)
    scores = np.round(rng.random(200), 1)  # heavy ties
    positive = rng.random(200) < 0.4
    weights = rng.integers(0, 4, size=(5, 200)).astype(float)
    expected = [roc_auc_score(positive, scores, sample_weight=w) for w in weights]
    np.testing.assert_allclose(_weighted_auc(scores, positive, weights), expected, atol=1e-12)
    assert np.isnan(_weighted_auc(scores, positive, weights * positive)).all()


def test_bootstrap_ci_contains_estimate_and_narrows():
    rng = np.random.default_rng(5)
    names = ["negative", "breast", "lymphoma"]
    widths = []
    for num_samples in (200, 5000):
        labels, probs = _random_predictions(rng, num_samples, 3)
        point = classification_metrics(labels, probs, names)
        ci = bootstrap_ci(labels, probs, names, n_boot=300, seed=0)
        for key in ("accuracy", "balanced_accuracy", "auc"):
            assert ci[key][0] <= point[key] <= ci[key][1], key
        for name in names:
            low, high = ci["per_class"][name]["f1"]
            assert low <= point["per_class"][name]["f1"] <= high
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    # The width scales as 1 / sqrt(N): 25x the samples, about a fifth of the width.
    assert 3.5 < widths[0] / widths[1] < 7


def test_bootstrap_ci_matches_naive_resampling():
    # Independent resamples (other random numbers, index gathering instead of weights, AUC from
    # mid-ranks): the percentile endpoints agree to Monte-Carlo precision (about 0.002 here).
    labels, probs = _random_predictions(np.random.default_rng(6), 300, 2, skill=1.0)
    ci = bootstrap_ci(labels, probs, ["negative", "positive"], n_boot=2000, seed=1)
    idx = np.random.default_rng(123).integers(0, 300, size=(2000, 300))
    accuracy = (probs[idx].argmax(axis=2) == labels[idx]).mean(axis=1)
    positive = labels[idx] == 1
    num_positive = positive.sum(axis=1)
    rank_sum = (rankdata(probs[idx, 1], axis=1) * positive).sum(axis=1)
    auc = (rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * (300 - num_positive))
    np.testing.assert_allclose(ci["accuracy"], np.percentile(accuracy, [2.5, 97.5]), atol=0.01)
    np.testing.assert_allclose(ci["auc"], np.percentile(auc, [2.5, 97.5]), atol=0.01)


def test_bootstrap_ci_seeded_level_and_rare_class():
    labels = np.array([1, 1] + [0] * 18)  # about 12 % of resamples hold no positive
    p1 = np.linspace(0.05, 0.9, 20)
    probs = np.stack([1 - p1, p1], axis=1)
    names = ["negative", "positive"]
    wide = bootstrap_ci(labels, probs, names, n_boot=500, seed=7)
    assert wide == bootstrap_ci(labels, probs, names, n_boot=500, seed=7)
    assert 0.0 <= wide["auc"][0] <= wide["auc"][1] <= 1.0
    narrow = bootstrap_ci(labels, probs, names, n_boot=500, seed=7, level=0.5)
    assert wide["accuracy"][0] <= narrow["accuracy"][0] <= narrow["accuracy"][1] <= wide["accuracy"][1]
    assert narrow["accuracy"][1] - narrow["accuracy"][0] < wide["accuracy"][1] - wide["accuracy"][0]


def test_roc_points_binary_and_multiclass():
    probs = np.stack([1 - BINARY_P1, BINARY_P1], axis=1)
    curves = roc_points(BINARY_LABELS, probs)
    fpr, tpr, _ = roc_curve(BINARY_LABELS, BINARY_P1)
    assert list(curves) == [1]
    np.testing.assert_allclose(curves[1]["fpr"], fpr)
    np.testing.assert_allclose(curves[1]["tpr"], tpr)
    assert curves[1]["auc"] == pytest.approx(7 / 9)
    multi = roc_points(MULTI_LABELS, MULTI_PROBS)
    assert sorted(multi) == [0, 1, 2]
    assert [multi[c]["auc"] for c in range(3)] == pytest.approx([1.0, 1.0, 0.875])
    for curve in multi.values():
        assert curve["fpr"][0] == 0 and curve["tpr"][-1] == 1
    named = roc_points(MULTI_LABELS, MULTI_PROBS, ["negative", "breast", "lymphoma"])
    assert list(named) == ["negative", "breast", "lymphoma"] and named["lymphoma"]["auc"] == pytest.approx(0.875)
    assert list(roc_points(BINARY_LABELS, probs, ["negative", "positive"])) == ["positive"]


def _patients(rng: np.random.Generator, num_groups: int, per_group: int):
    """Predictions whose accuracy differs by patient (0.6-1.0): patches of one patient are correlated."""
    group = np.repeat(np.arange(num_groups), per_group)
    labels = rng.integers(0, 2, group.size)
    right = rng.random(group.size) < rng.uniform(0.6, 1.0, num_groups)[group]
    p1 = np.where(right == (labels == 1), 0.8, 0.2) + rng.uniform(-0.1, 0.1, group.size)
    return labels, np.stack([1 - p1, p1], axis=1), group


def test_group_bootstrap_resamples_patients_like_a_naive_loop():
    labels, probs, group = _patients(np.random.default_rng(8), 21, 60)
    names = ["negative", "positive"]
    ci = bootstrap_ci(labels, probs, names, n_boot=2000, seed=2, groups=np.char.add("patient_", group.astype(str)))
    # Independent reference: draw 21 patients with replacement, pool their patches, score.
    rng = np.random.default_rng(99)
    correct = probs.argmax(axis=1) == labels
    per_group_hits = np.bincount(group, weights=correct)
    per_group_n = np.bincount(group)
    draws = rng.integers(0, 21, size=(2000, 21))
    naive = per_group_hits[draws].sum(axis=1) / per_group_n[draws].sum(axis=1)
    np.testing.assert_allclose(ci["accuracy"], np.percentile(naive, [2.5, 97.5]), atol=0.01)
    by_patch = bootstrap_ci(labels, probs, names, n_boot=2000, seed=2)
    # Patch resampling ignores the patients: its interval is several times too narrow here.
    assert (ci["accuracy"][1] - ci["accuracy"][0]) > 2.5 * (by_patch["accuracy"][1] - by_patch["accuracy"][0])


def test_group_bootstrap_edge_cases():
    labels, probs, group = _patients(np.random.default_rng(9), 5, 20)
    names = ["negative", "positive"]
    # One group per sample is the patch bootstrap, draw for draw.
    assert bootstrap_ci(labels, probs, names, n_boot=200, seed=4, groups=np.arange(100)) == \
        bootstrap_ci(labels, probs, names, n_boot=200, seed=4)
    single = bootstrap_ci(labels, probs, names, n_boot=200, seed=4, groups=np.zeros(100, int))
    assert np.isnan(single["accuracy"]).all() and np.isnan(single["per_class"]["positive"]["f1"]).all()
    with pytest.raises(MetricsError, match="groups"):
        bootstrap_ci(labels, probs, names, groups=np.zeros(7))
