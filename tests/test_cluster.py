"""04_cluster's analysis: the domain probe sees a stain shift and Macenko removes it; identical
sources do not separate."""

import cv2
import numpy as np
import pytest

from common import stain
from common.patchset import PatchSet, write_patch_set
from tests.conftest import REAL, load_script

HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # Ruifrok & Johnston's H&E optical densities
SETTINGS = {"pca_components": 2, "n_init": 4}


@pytest.fixture(scope="module")
def cluster_script():
    return load_script("04_cluster")


def tissue_patches() -> np.ndarray:
    """96x96 crops of real H&E with at least 60 % tissue."""
    crops = []
    for name in ("tiatoolbox/target_image.png", "torchstain/source.png", "torchstain/target.png"):
        image = cv2.cvtColor(cv2.imread(str(REAL / "he" / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        # overlapping crops, 48 px apart: more samples for the cross-validated probe
        tiles = np.lib.stride_tricks.sliding_window_view(image, (96, 96, 3))[::48, ::48].reshape(-1, 96, 96, 3)
        crops.append(tiles[(tiles.mean(3) < 200).mean((1, 2)) > 0.6])
    return np.concatenate(crops)


def restain(x: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Unmix uint8 RGB with the standard H&E matrix and remix the same concentrations with `stains`."""
    od = -np.log((x.astype(np.float64) + 1) / 256)
    conc = od.reshape(-1, 3) @ np.linalg.pinv(HE)
    out = 256 * np.exp(-(np.clip(conc, 0, None) @ stains)) - 1
    return np.clip(out, 0, 255).round().astype(np.uint8).reshape(x.shape)


def pixel_features(x: np.ndarray) -> np.ndarray:
    """Linearised 8x8 block means (192-d): few samples here, so fewer dimensions than raw pixels."""
    return x.reshape(len(x), 12, 8, 12, 8, 3).mean((2, 4)).reshape(len(x), -1).astype(np.float32) / 255


def test_stain_shift_is_seen_then_removed_by_macenko(cluster_script):
    x = tissue_patches()
    rng = np.random.default_rng(0)
    half = rng.permutation(len(x))
    a, b = x[half[: len(x) // 2]], x[half[len(x) // 2:]]
    # source B: the same kind of tissue stained differently (bluer hematoxylin, pinker eosin, stronger)
    shifted = np.array([[0.55, 0.75, 0.37], [0.15, 0.95, 0.27]])
    b = restain(b, 1.3 * shifted / np.linalg.norm(shifted, axis=1, keepdims=True))
    source = np.array(["pcam"] * len(a) + ["dlbcl"] * len(b))

    before, _, _ = cluster_script.analyse(pixel_features(np.concatenate([a, b])), source, SETTINGS, seed=0)
    norm = stain.make_normalizer("macenko").fit(a[:32])
    after_x = norm.transform(np.concatenate([a, b]))
    after, _, _ = cluster_script.analyse(pixel_features(after_x), source, SETTINGS, seed=0)
    # measured 0.79 -> 0.59: the three source images' own stain differences remain within each source
    assert before["domain_probe"] > 0.75
    assert after["domain_probe"] < 0.65


def test_identical_sources_do_not_separate(cluster_script):
    feats = np.random.default_rng(1).normal(size=(600, 16)).astype(np.float32)
    source = np.array(["pcam", "dlbcl"] * 300)
    row, points, cluster = cluster_script.analyse(feats, source, SETTINGS, seed=0)
    assert abs(row["accuracy"] - 0.5) < 0.06 and abs(row["ari"]) < 0.01
    assert abs(row["domain_probe"] - 0.5) < 0.1
    assert points.shape == (600, 2) and set(np.unique(cluster)) == {0, 1}


def _write_set(path, y, groups):
    x = np.zeros((len(y), 96, 96, 3), np.uint8)
    write_patch_set(path, PatchSet(x, np.asarray(y, np.uint8), np.asarray(groups), np.full((len(y), 2), -1), {}))


def test_the_same_number_of_negatives_from_each_source(cluster_script, tmp_path):
    # 30 PCam negatives (and 10 positives), 12 DLBCL negatives: 12 from each, whatever n_per_source above.
    _write_set(tmp_path / "pcam_train.h5", [0] * 30 + [1] * 10, ["unknown"] * 40)
    _write_set(tmp_path / "dlbcl.h5", [1] * 5 + [0] * 12, [f"p{i % 3}" for i in range(17)])
    index, groups = cluster_script.sample_negatives(tmp_path, 1000, seed=0)
    assert {k: len(v) for k, v in index.items()} == {"pcam_train": 12, "dlbcl": 12}
    assert index["pcam_train"].max() < 30 and index["dlbcl"].min() >= 5  # negatives only
    assert (groups[:12] == "unknown").all() and set(groups[12:]) == {"p0", "p1", "p2"}
    small, _ = cluster_script.sample_negatives(tmp_path, 4, seed=0)
    assert {k: len(v) for k, v in small.items()} == {"pcam_train": 4, "dlbcl": 4}


def test_random_weight_rows_are_not_set_beside_the_thesis(cluster_script):
    row = {"accuracy": 0.6, "silhouette": 0.2, "ari": 0.05, "nmi": 0.04, "domain_probe": 0.7}
    rows = [{"features": "pixels", "weights": None, "method": "none", **row},
            {"features": "resnet18", "weights": "imagenet", "method": "none", **row},
            {"features": "resnet18", "weights": "none", "method": "macenko", **row}]
    lines = cluster_script.thesis_table(rows, 0.5).splitlines()
    assert lines[2] == "| pixels | none | 0.600 | 0.200 | 0.050 | 0.040 | 0.700 | 0.512 / 0.009 |"
    assert lines[3].startswith("| resnet18 | none |") and lines[3].endswith("| 0.723 / 0.198 |")
    assert lines[4].startswith("| resnet18 (random weights) | macenko |")
    assert lines[4].endswith("| not comparable (random weights) |") and "0.534" not in lines[4]
    assert lines[6].startswith("Chance level: clustering accuracy 0.500")
