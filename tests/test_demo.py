"""Tests for common/demo.py: the synthetic PCam and DLBCL-Morph writers.

Checks the official on-disk layouts (read back with h5py, gzip, csv and OpenSlide, not with the
writer's code), determinism, the junk patches, and that the classes are learnable from morphology but
not from the mean colour (logistic regressions from scikit-learn, cross-validated).
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.demo import DemoError, write_demo_dlbcl, write_demo_pcam
from common.schema import SPLITS

PCAM_SIZES = {"train": 200, "valid": 20, "test": 20}
SLIDE_MPP = 0.5
PCAM_MPP = 0.972
PATCH_LEVEL0_PX = round(96 * PCAM_MPP / SLIDE_MPP)  # 187: a PCam-scale patch on the slide


def pcam_file(folder: Path, split: str, kind: str) -> Path:
    return folder / f"camelyonpatch_level_2_split_{split}_{kind}"


def read_h5(path: Path, key: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[key][:]


def read_h5_gz(path: Path, key: str, tmp: Path) -> np.ndarray:
    plain = tmp / path.name.removesuffix(".gz")
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    return read_h5(plain, key)


def mean_rgb(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1, 3).mean(axis=1)


def texture_features(x: np.ndarray) -> np.ndarray:
    """Colour-blind morphology features: log band energies of a difference-of-Gaussians pyramid of the
    optical density, each patch normalised by its own mean OD."""
    od = -np.log((x.astype(np.float32) + 1) / 256).sum(axis=-1)
    od /= od.mean(axis=(1, 2), keepdims=True) + 1e-6
    stacked = od.reshape(-1, od.shape[2])
    levels = [stacked] + [cv2.GaussianBlur(stacked, (0, 0), s) for s in (1, 2, 4, 8)]
    return np.column_stack([np.log(((a - b) ** 2).reshape(od.shape).mean(axis=(1, 2)) + 1e-9)
                            for a, b in zip(levels[:-1], levels[1:], strict=True)])


def cv_accuracy(features: np.ndarray, y: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(model, features, y, cv=folds).mean())


@pytest.fixture(scope="module")
def pcam(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pcam")
    write_demo_pcam(folder, PCAM_SIZES, seed=3, junk_fraction=0.1)
    return folder


@pytest.fixture(scope="module")
def dlbcl(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("dlbcl")
    result = write_demo_dlbcl(folder, n_slides=1, cores_per_slide=3, seed=5, slide_mpp=SLIDE_MPP, workers=1)
    return folder, result


# --------------------------------------------------------------------------------------------------
# PCam layout
# --------------------------------------------------------------------------------------------------
def test_pcam_h5_official_keys_shapes_dtypes(pcam):
    for split in SPLITS:
        n = PCAM_SIZES[split]
        x = read_h5(pcam_file(pcam, split, "x.h5"), "x")
        y = read_h5(pcam_file(pcam, split, "y.h5"), "y")
        assert x.dtype == np.uint8 and x.shape == (n, 96, 96, 3)
        assert y.dtype == np.uint8 and y.shape == (n, 1, 1, 1)
        assert set(np.unique(y)) == {0, 1}
        assert y.sum() == n // 2  # ~50/50 as in PCam
        with h5py.File(pcam_file(pcam, split, "x.h5"), "r") as f:
            assert list(f.keys()) == ["x"]
            assert f["x"].compression is None  # like the official files: cheap random reads


def test_pcam_meta_csv(pcam):
    slides_per_split = {}
    for split in SPLITS:
        y = read_h5(pcam_file(pcam, split, "y.h5"), "y").ravel()
        with open(pcam_file(pcam, split, "meta.csv"), newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"]
        body = rows[1:]
        assert [int(r[0]) for r in body] == list(range(len(y)))
        centre = np.array([r[4] for r in body])
        anywhere = np.array([r[3] for r in body])
        assert set(centre) <= {"True", "False"} and set(anywhere) <= {"True", "False"}
        np.testing.assert_array_equal(centre == "True", y == 1)
        assert np.all(anywhere[centre == "True"] == "True")  # a centre tumour is a tumour in the patch
        wsi = np.array([r[5] for r in body])
        assert all(w.startswith("camelyon16_") for w in wsi)
        assert len(set(wsi)) >= 2
        if split != "test":
            assert not any("normal" in w for w in wsi[y == 1])  # positives come from tumour slides
        slides_per_split[split] = set(wsi)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not slides_per_split[SPLITS[a]] & slides_per_split[SPLITS[b]]


def read_junk(pcam: Path) -> dict[str, dict[str, list[int]]]:
    """demo_junk.csv (split,index,kind) as {split: {kind: [index, ...]}}, every split and kind present."""
    junk: dict[str, dict[str, list[int]]] = {split: {"blank": [], "ihc": [], "blur": []} for split in SPLITS}
    with open(pcam / "demo_junk.csv", newline="") as f:
        for row in csv.DictReader(f):
            junk[row["split"]][row["kind"]].append(int(row["index"]))
    return junk


def test_pcam_junk_csv_and_junk_looks_like_junk(pcam):
    junk = read_junk(pcam)
    assert set(junk) == set(SPLITS)
    for split in SPLITS:
        n = PCAM_SIZES[split]
        kinds = junk[split]
        assert set(kinds) == {"blank", "ihc", "blur"}
        all_junk = [i for kind in kinds.values() for i in kind]
        assert len(all_junk) == len(set(all_junk)) == round(0.1 * n)
        assert all(0 <= i < n for i in all_junk)
    x = read_h5(pcam_file(pcam, "train", "x.h5"), "x")
    y = read_h5(pcam_file(pcam, "train", "y.h5"), "y").ravel()
    kinds = junk["train"]
    assert len(set(y[kinds["blank"] + kinds["ihc"] + kinds["blur"]])) == 2  # junk spans both labels
    hsv = cv2.cvtColor(x.reshape(-1, 96, 3), cv2.COLOR_RGB2HSV).reshape(x.shape).astype(float)
    saturation = hsv[..., 1].mean(axis=(1, 2)) / 255
    regular = np.setdiff1d(np.arange(len(x)), kinds["blank"] + kinds["ihc"] + kinds["blur"])
    # Blank glass: bright, nearly grey (real glass has mean saturation <= 0.035), slight noise only.
    blank = x[kinds["blank"]].astype(float)
    assert blank.mean() > 220 and np.all(saturation[kinds["blank"]] < 0.035)
    assert np.all(blank.std(axis=(1, 2, 3)) < 5)
    assert np.all(saturation[regular] > 0.06)
    # IHC: brown (DAB absorbs blue most): red > green > blue on average; H&E tissue has blue > green.
    ihc = mean_rgb(x[kinds["ihc"]])
    assert np.all((ihc[:, 0] > ihc[:, 1]) & (ihc[:, 1] > ihc[:, 2]))
    assert np.all(mean_rgb(x[regular])[:, 2] > mean_rgb(x[regular])[:, 1])
    # Blur: far less fine detail (Laplacian energy) than any regular patch.
    gray = x.astype(np.float32).mean(axis=-1)
    detail = np.array([cv2.Laplacian(g, cv2.CV_32F).var() for g in gray])
    assert detail[kinds["blur"]].max() < 0.2 * detail[regular].min()


def test_pcam_gzip_variant_has_the_same_content(tmp_path):
    sizes = {"train": 6, "valid": 4, "test": 4}
    write_demo_pcam(tmp_path / "plain", sizes, seed=11)
    result = write_demo_pcam(tmp_path / "gz", sizes, seed=11, gzip_files=True)
    for split in SPLITS:
        for kind, key in (("x", "x"), ("y", "y")):
            gz_path = pcam_file(tmp_path / "gz", split, f"{kind}.h5.gz")
            assert gz_path in result["files"]
            assert not pcam_file(tmp_path / "gz", split, f"{kind}.h5").exists()
            np.testing.assert_array_equal(read_h5_gz(gz_path, key, tmp_path),
                                          read_h5(pcam_file(tmp_path / "plain", split, f"{kind}.h5"), key))
        assert pcam_file(tmp_path / "gz", split, "meta.csv").read_bytes() == pcam_file(
            tmp_path / "plain", split, "meta.csv").read_bytes()


def test_pcam_deterministic_from_seed(tmp_path):
    sizes = {"train": 8, "valid": 4, "test": 4}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_demo_pcam(tmp_path / name, sizes, seed=seed)
    x = {name: read_h5(pcam_file(tmp_path / name, "train", "x.h5"), "x") for name in "abc"}
    assert x["a"].tobytes() == x["b"].tobytes()
    assert x["a"].tobytes() != x["c"].tobytes()


def test_pcam_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(DemoError, match="train, valid, test"):
        write_demo_pcam(tmp_path, {"train": 10, "valid": 4}, seed=0)
    with pytest.raises(DemoError, match="pcam_per_split.test"):
        write_demo_pcam(tmp_path, {"train": 10, "valid": 4, "test": 1}, seed=0)
    with pytest.raises(DemoError, match="junk_fraction"):
        write_demo_pcam(tmp_path, {"train": 10, "valid": 4, "test": 4}, seed=0, junk_fraction=0.9)


# --------------------------------------------------------------------------------------------------
# PCam: morphology, not colour
# --------------------------------------------------------------------------------------------------
def test_pcam_colour_is_weak_and_morphology_is_strong(pcam):
    x = read_h5(pcam_file(pcam, "train", "x.h5"), "x")
    y = read_h5(pcam_file(pcam, "train", "y.h5"), "y").ravel()
    junk = read_junk(pcam)["train"]
    keep = np.setdiff1d(np.arange(len(x)), [i for kind in junk.values() for i in kind])
    colour = cv_accuracy(mean_rgb(x[keep]), y[keep])
    texture = cv_accuracy(texture_features(x[keep]), y[keep])
    assert colour <= 0.65
    assert texture >= 0.85 and texture >= colour + 0.2


# --------------------------------------------------------------------------------------------------
# DLBCL-Morph layout
# --------------------------------------------------------------------------------------------------
def read_annotations(folder: Path) -> list[dict]:
    with open(folder / "TMA" / "annotations.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["patient_id", "tma_id", "stain", "xs", "ys", "xe", "ye"]
        return list(reader)


def test_dlbcl_annotations_csv(dlbcl):
    folder, result = dlbcl
    rows = read_annotations(folder)
    stains = {r["stain"] for r in rows}
    assert stains == {"HE", "CD10"}
    he = [r for r in rows if r["stain"] == "HE"]
    assert len(he) == result["n_roi"] >= 1
    for r in rows:
        assert r["patient_id"].isdigit() and len(r["patient_id"]) == 5
        assert r["tma_id"] == "TA101"
        assert int(r["xs"]) < int(r["xe"]) and int(r["ys"]) < int(r["ye"])
    assert not (folder / "TMA" / "CD10").exists()  # rows of another stain, no slides: to be ignored


def test_dlbcl_slide_opens_with_openslide(dlbcl):
    folder, result = dlbcl
    assert result["slides"] == [folder / "TMA" / "HE" / "TA101.svs"]
    with openslide.OpenSlide(result["slides"][0]) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.level_count >= 2
        assert abs(float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) - SLIDE_MPP) <= 1e-3
        assert abs(float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) - SLIDE_MPP) <= 1e-3
        np.testing.assert_allclose(slide.level_downsamples[:3], (1, 4, 16), atol=1e-6)
        # Level 1 is the level-0 area downsampled by 4.
        region0 = np.asarray(slide.read_region((512, 512), 0, (1024, 1024)).convert("RGB"))
        region1 = np.asarray(slide.read_region((512, 512), 1, (256, 256)).convert("RGB"))
        expected = cv2.resize(region0, (256, 256), interpolation=cv2.INTER_AREA)
        assert np.abs(region1.astype(float) - expected).mean() < 2.0
        assert region0.std() > 10  # the area holds tissue, not only glass


def test_dlbcl_roi_boxes_inside_slide_and_tissue(dlbcl):
    folder, result = dlbcl
    with openslide.OpenSlide(result["slides"][0]) as slide:
        width, height = slide.dimensions
        for r in (r for r in read_annotations(folder) if r["stain"] == "HE"):
            xs, ys, xe, ye = (int(r[k]) for k in ("xs", "ys", "xe", "ye"))
            assert 0 <= xs < xe <= width and 0 <= ys < ye <= height
            box = np.asarray(slide.read_region((xs, ys), 0, (xe - xs, ye - ys)).convert("RGB"))
            saturation = cv2.cvtColor(box, cv2.COLOR_RGB2HSV)[..., 1] / 255
            assert (saturation > 0.1).mean() > 0.95  # glass has saturation ~0


def cut_dlbcl_patches(folder: Path, slide_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping PCam-scale patches (187 level-0 px -> 96 px): label 1 inside an H&E ROI box,
    label 0 on tissue (>= 90 % saturated pixels) touching no box."""
    with openslide.OpenSlide(slide_path) as slide:
        width, height = slide.dimensions
        image = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    size = PATCH_LEVEL0_PX
    boxes = [tuple(int(r[k]) for k in ("xs", "ys", "xe", "ye")) for r in read_annotations(folder)
             if r["stain"] == "HE" and r["tma_id"] == slide_path.stem]
    in_roi = np.zeros((height, width), bool)
    starts = []
    for xs, ys, xe, ye in boxes:
        in_roi[ys:ye, xs:xe] = True
        starts += [(y0, x0, 1) for y0 in range(ys, ye - size + 1, size) for x0 in range(xs, xe - size + 1, size)]
    tissue = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1] > 25
    for y0 in range(0, height - size + 1, size):
        for x0 in range(0, width - size + 1, size):
            window = np.s_[y0:y0 + size, x0:x0 + size]
            if not in_roi[window].any() and tissue[window].mean() >= 0.9:
                starts.append((y0, x0, 0))
    patches = np.stack([cv2.resize(image[y0:y0 + size, x0:x0 + size], (96, 96), interpolation=cv2.INTER_AREA)
                        for y0, x0, _ in starts])
    return patches, np.array([label for _, _, label in starts])


def test_dlbcl_colour_is_weak_and_morphology_is_strong(dlbcl):
    folder, result = dlbcl
    x, y = cut_dlbcl_patches(folder, result["slides"][0])
    assert (y == 1).sum() >= 20 and (y == 0).sum() >= 20
    colour = cv_accuracy(mean_rgb(x), y)
    texture = cv_accuracy(texture_features(x), y)
    majority = max((y == 1).mean(), (y == 0).mean())  # what a constant guess scores
    assert colour <= max(0.65, majority + 0.05)
    assert texture >= 0.9 and texture >= colour + 0.2
    # The thesis's DLBCL quality rule keeps tiles with mean S > 0.07 and V < 0.8: all tissue must pass.
    hsv = cv2.cvtColor(x.reshape(-1, 96, 3), cv2.COLOR_RGB2HSV).reshape(x.shape) / 255
    assert hsv[..., 1].mean(axis=(1, 2)).min() > 0.07
    assert hsv[..., 2].mean(axis=(1, 2)).max() < 0.8


def test_dlbcl_deterministic_and_bad_arguments(tmp_path):
    for name in "ab":
        write_demo_dlbcl(tmp_path / name, n_slides=1, cores_per_slide=1, seed=1, slide_mpp=1.0, workers=1)
    pixels = {}
    for name in "ab":
        with openslide.OpenSlide(tmp_path / name / "TMA" / "HE" / "TA101.svs") as slide:
            pixels[name] = np.asarray(slide.read_region((0, 0), 0, slide.level_dimensions[0]))
    assert pixels["a"].tobytes() == pixels["b"].tobytes()
    assert (tmp_path / "a" / "TMA" / "annotations.csv").read_bytes() == (
        tmp_path / "b" / "TMA" / "annotations.csv").read_bytes()
    with pytest.raises(DemoError, match="n_patients"):
        write_demo_dlbcl(tmp_path / "d", n_slides=1, cores_per_slide=2, seed=0, n_patients=3)
    with pytest.raises(DemoError, match="slide_mpp"):
        write_demo_dlbcl(tmp_path / "d", n_slides=1, cores_per_slide=2, seed=0, slide_mpp=0)
