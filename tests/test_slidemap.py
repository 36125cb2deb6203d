"""Whole-slide maps (common/slidemap.py) on the real Aperio fixture and on constructed maps."""

import json

import cv2
import numpy as np
import pytest
import torch

from common import gradcam, models, slide_io, slidemap, stain, tiling
from common.config import load_config
from common.errors import UserError
from common.filters import DLBCL_QUALITY, filter_patches
from tests.conftest import REAL, ROOT

CMU = REAL / "slides" / "cmu-1-small-region.svs"  # Aperio, one level, 2220 x 2967, mpp 0.499
CLASSES = ["negative", "breast", "lymphoma"]


@pytest.fixture(scope="module")
def cmu_map(tmp_path_factory):
    """The CMU slide mapped by an untrained 3-class ResNet-18 after Reinhard, written to a folder; read in
    batches of 16 patches, so that batches end inside cores."""
    torch.manual_seed(0)
    model = models.build_model("resnet18", 3, "none").eval()
    mean, std = (0.7, 0.6, 0.7), (0.15, 0.2, 0.15)
    predict = slidemap.make_predict(model, mean, std, torch.device("cpu"), batch_size=64)
    target = cv2.cvtColor(cv2.imread(str(REAL / "he" / "tiatoolbox" / "target_image.png")), cv2.COLOR_BGR2RGB)
    normalizer = stain.make_normalizer("reinhard").fit(target)
    roi = np.array([[600, 900, 1500, 1800]])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiling, "PATCH_BATCH", 16)
        smap, patches = slidemap.map_slide(CMU, predict, normalizer, rois=roi, roi_patients=["p1"], keep_patches=True,
                                           progress=False)
    folder = tmp_path_factory.mktemp("cmu")
    info = slidemap.write_slide_map(folder, smap, CLASSES)
    return {"smap": smap, "patches": patches, "folder": folder, "info": info, "predict": predict,
            "normalizer": normalizer, "roi": roi}


def read_csv(path):
    rows = np.loadtxt(path, delimiter=",", dtype=str, ndmin=2)
    return {name: rows[1:, i] for i, name in enumerate(rows[0])}


def test_maps_written_with_level0_coordinates_inside_the_slide(cmu_map):
    folder, smap = cmu_map["folder"], cmu_map["smap"]
    assert sorted(cmu_map["info"]["files"]) == ["cores.csv", "heatmap.png", "patches.csv", "patches.geojson"]
    cols = read_csv(folder / "patches.csv")
    assert list(cols) == ["x", "y", "size_px", "core", "p_negative", "p_breast", "p_lymphoma", "roi"]
    x, y, size = cols["x"].astype(int), cols["y"].astype(int), cols["size_px"].astype(float)
    # 0.972 / 0.499 * 96 = 187.0 level-0 px per patch, read at level 0 (the only one)
    assert np.all(size == 187.0)
    assert len(x) == len(smap.coords) > 40
    assert x.min() >= 0 and y.min() >= 0 and (x + size).max() <= 2220 and (y + size).max() <= 2967
    # on the slide-wide grid of step 96 * 0.972 / 0.499 from (0, 0)
    step = 96 * 0.972 / 0.499
    assert np.allclose(x / step, np.rint(x / step), atol=0.01) and np.allclose(y / step, np.rint(y / step), atol=0.01)
    probs = np.stack([cols[f"p_{c}"].astype(float) for c in CLASSES], 1)
    assert np.allclose(probs.sum(1), 1, atol=2e-4)
    # roi: 1 exactly for the patch centres inside the box
    box = cmu_map["roi"][0]
    cx, cy = x + size / 2, y + size / 2
    expected = (cx >= box[0]) & (cx < box[2]) & (cy >= box[1]) & (cy < box[3])
    assert np.array_equal(cols["roi"].astype(int), expected.astype(int)) and expected.sum() >= 4
    image = cv2.imread(str(folder / "heatmap.png"))
    assert image is not None and min(image.shape[:2]) > 200


def test_geojson_polygons_are_the_patch_squares(cmu_map):
    cols = read_csv(cmu_map["folder"] / "patches.csv")
    doc = json.loads((cmu_map["folder"] / "patches.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(cols["x"])
    x, y, s = cols["x"].astype(float), cols["y"].astype(float), cols["size_px"].astype(float)
    rings = np.array([f["geometry"]["coordinates"] for f in doc["features"]])  # (K, 1, 5, 2)
    expected = np.stack([np.stack([x, y], 1), np.stack([x + s, y], 1), np.stack([x + s, y + s], 1),
                         np.stack([x, y + s], 1), np.stack([x, y], 1)], axis=1)
    assert rings.shape == (len(x), 1, 5, 2) and np.array_equal(rings[:, 0], expected)
    assert {f["geometry"]["type"] for f in doc["features"]} == {"Polygon"}
    props = [f["properties"] for f in doc["features"]]
    assert {p["objectType"] for p in props} == {"tile"}
    measured = np.array([[p["measurements"][f"p_{c}"] for c in CLASSES] for p in props])
    csv_probs = np.stack([cols[f"p_{c}"].astype(float) for c in CLASSES], 1)
    assert np.allclose(measured, csv_probs, atol=1e-4)
    names = [p["classification"]["name"] for p in props]
    assert names == [CLASSES[k] for k in cmu_map["smap"].probs.argmax(1)]  # unrounded
    assert all(len(p["classification"]["color"]) == 3 for p in props)


def test_patch_pixels_equal_a_direct_read_region(cmu_map):
    smap, patches = cmu_map["smap"], cmu_map["patches"]
    assert patches.shape == (len(smap.coords), 96, 96, 3)
    picks = np.linspace(0, len(smap.coords) - 1, 12).astype(int)
    with slide_io.open_slide(CMU) as slide:
        direct = []
        for x, y in smap.coords[picks]:
            rgba = np.asarray(slide.read_region((int(x), int(y)), 0, (187, 187)))
            assert rgba[..., 3].min() == 255
            direct.append(cv2.resize(rgba[..., :3], (96, 96), interpolation=cv2.INTER_AREA))
    direct = np.stack(direct)
    # the raw patches passed 02's DLBCL quality rule (mean S > 0.07, V < 0.8) before normalisation
    assert filter_patches(direct, **DLBCL_QUALITY)[0].all()
    direct = cmu_map["normalizer"].transform(direct)
    assert np.array_equal(patches[picks], direct)
    assert np.allclose(cmu_map["predict"](direct), smap.probs[picks], atol=1e-5)


def test_quality_rule_and_cores(cmu_map):
    smap = cmu_map["smap"]
    cores = read_csv(cmu_map["folder"] / "cores.csv")
    assert cores["n_patches"].astype(int).sum() == len(smap.coords)
    assert set(cores["call"]) <= set(CLASSES)
    assert list(cores) == ["core", "x0", "y0", "x1", "y1", "n_patches", "p_negative", "p_breast", "p_lymphoma", "call",
                           "call_fraction", "patient"]
    # the core holding the ROI's patches names the ROI's patient; the box bounds its patches
    holder = np.unique(smap.core[smap.roi == 1])
    assert cores["patient"][np.isin(cores["core"].astype(int), holder)].tolist() == ["p1"] * len(holder)
    for row in range(len(cores["core"])):
        inside = smap.core == int(cores["core"][row])
        assert int(cores["x0"][row]) == smap.coords[inside, 0].min()
        assert int(cores["y1"][row]) == smap.coords[inside, 1].max() + 187


def constructed_map(p_lymphoma, roi, core, rois, patients):
    n = len(p_lymphoma)
    probs = np.stack([1 - np.asarray(p_lymphoma), np.zeros(n), np.asarray(p_lymphoma)], 1).astype(np.float32)
    return slidemap.SlideMap(slide="s.svs", dimensions=(1000, 1000), coords=np.zeros((n, 2), np.int64), size_px=10.0,
                             core=np.asarray(core), probs=probs, roi=np.asarray(roi, np.int8),
                             rois=np.asarray(rois).reshape(-1, 4), roi_patients=np.asarray(patients, str),
                             thumbnail=np.zeros((8, 8, 3), np.uint8), thumbnail_scale=0.01, rejected={})


def test_score_counts_only_test_patients_cores():
    # core 1 (test patient) : ROI patches 0.9, 0.6; outside 0.7, 0.2 -> AUC = 3/4
    # core 2 (training patient) would make it perfect if counted; core 3 has no ROI (unknown patient)
    smap = constructed_map([0.9, 0.6, 0.7, 0.2, 0.99, 0.01, 0.5], [1, 1, 0, 0, 1, 0, 0], [1, 1, 1, 1, 2, 2, 3],
                           [[0, 0, 5, 5], [0, 0, 5, 5]], ["test1", "train1"])
    cores = {"core": np.array([1, 2, 3]), "patient": np.array(["test1", "train1", ""], object),
             "call": np.array(["lymphoma", "lymphoma", "negative"], object)}
    score = slidemap.score_maps([(smap, cores)], CLASSES, "lymphoma", {"test1"})
    assert score["auc"] == pytest.approx(0.75)
    assert (score["n_roi_patches"], score["n_outside_patches"], score["n_cores"]) == (2, 2, 1)
    assert score["core_accuracy"] == 1.0
    cores["call"][0] = "breast"
    assert slidemap.score_maps([(smap, cores)], CLASSES, "lymphoma", {"test1", "train1"})["core_accuracy"] == 0.5
    with pytest.raises(UserError, match="roi_class"):
        slidemap.score_maps([(smap, cores)], CLASSES, "metastasis", {"test1"})


def test_core_table_means_and_calls():
    smap = constructed_map([0.9, 0.7, 0.1, 0.3], [-1] * 4, [4, 4, 7, 7], np.zeros((0, 4)), [])
    smap.coords = np.array([[0, 0], [10, 0], [100, 50], [100, 60]])
    table = slidemap.core_table(smap, CLASSES)
    assert table["core"].tolist() == [4, 7] and table["n_patches"].tolist() == [2, 2]
    assert np.allclose(table["p_lymphoma"], [0.8, 0.2]) and table["call"].tolist() == ["lymphoma", "negative"]
    assert table["call_fraction"].tolist() == [1.0, 1.0]
    # one lymphoma patch in five: called lymphoma from a fifth on (call_fraction 0.2), negative above it
    focus = constructed_map([0.9, 0.1, 0.1, 0.2, 0.3], [-1] * 5, [1] * 5, np.zeros((0, 4)), [])
    assert slidemap.core_table(focus, CLASSES, 0.2)["call"].tolist() == ["lymphoma"]
    assert slidemap.core_table(focus, CLASSES, 0.2)["call_fraction"].tolist() == [0.2]
    assert slidemap.core_table(focus, CLASSES, 0.25)["call"].tolist() == ["negative"]
    assert slidemap.core_table(focus, CLASSES, 0.25)["call_fraction"].tolist() == [0.8]
    assert (table["x0"].tolist(), table["y0"].tolist(), table["x1"].tolist(), table["y1"].tolist()) == (
        [0, 100], [0, 50], [20, 110], [10, 70])
    assert table["patient"].tolist() == ["", ""]


def test_unreadable_slide_is_a_slide_error(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    with pytest.raises(slide_io.SlideError, match="broken.svs"):
        slidemap.map_slide(bad, None, None, progress=False)


def test_config_slides_key():
    base = ROOT / "config.yaml"
    assert load_config(base)["gradcam"]["slides"] is None
    assert load_config(base, ["gradcam.slides=test"])["gradcam"]["slides"] == "test"
    paths = load_config(base, ["gradcam.slides=[a.svs, /data/b.tiff]"])["gradcam"]["slides"]
    assert paths[0].endswith("/a.svs") and paths[0].startswith("/") and paths[1] == "/data/b.tiff"
    for bad in ("gradcam.slides=all", "gradcam.slides=[]"):
        with pytest.raises(UserError, match="gradcam.slides"):
            load_config(base, [bad])


def test_slide_cam_mosaic(cmu_map, tmp_path):
    torch.manual_seed(0)
    model = models.build_model("resnet18", 3, "none").eval()
    mean, std = (0.7, 0.6, 0.7), (0.15, 0.2, 0.15)
    device = torch.device("cpu")
    smap, patches = slidemap.map_slide(CMU, slidemap.make_predict(model, mean, std, device), cmu_map["normalizer"],
                                       cam=slidemap.make_cam(model, mean, std, device), keep_patches=True,
                                       progress=False)
    assert smap.cams.shape == (len(smap.coords), 96, 96)
    # the CAM of each patch's predicted class, as gradcam.grad_cam gives it for those patches
    picks = np.arange(0, len(patches), 9)
    inputs = models.to_input(torch.from_numpy(patches[picks]), torch.tensor(mean), torch.tensor(std), False)
    expected = gradcam.grad_cam(model, inputs, gradcam.default_target_layer(model), target=smap.probs[picks].argmax(1))
    assert np.allclose(smap.cams[picks], expected, atol=1e-5)
    info = slidemap.write_slide_map(tmp_path, smap, CLASSES)
    assert "slide_cam.png" in info["files"]
    image = cv2.imread(str(tmp_path / "slide_cam.png"))
    # 12 x 16 grid cells of 16 px (2220 / 187 and 2967 / 187, rounded up)
    assert image.shape[:2] == (16 * 16, 12 * 16)
