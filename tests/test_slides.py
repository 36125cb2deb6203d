"""Tests for common/slide_io.py, common/tiling.py and common/slides.py on the real slides in tests/data/slides
and on pyramidal TIFFs written here with tifffile: scale and level choice, exact reads, bounded reads, bad inputs,
overview."""

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from common.filters import hsv_means
from common.overview import OVERVIEW_COLOURS, OVERVIEW_TITLE_PX, save_overview
from common.slide_io import SlideError, open_slide, pick_level, read_patches, read_rgb, read_thumbnail, slide_mpp
from common.slides import tile_slide
from common.tiling import roi_grid, tile_tissue

SLIDES = Path(__file__).resolve().parent / "data" / "slides"
CMU = SLIDES / "cmu-1-small-region.svs"  # Aperio, one level, 2220 x 2967, mpp 0.499
TCGA = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"  # Aperio, downsamples (1, 2.0005), no mpp
BOXES = SLIDES / "synthetic" / "boxes.tiff"  # generic TIFF, downsamples (1, 2, 4.0161, 8.0863)
TISSUE_IMAGE = SLIDES.parent / "he" / "tiatoolbox" / "target_image.png"  # real H&E, 1000 x 1000
CMU_ROI = (1000, 1500, 1600, 2500)  # epithelium and stroma on the CMU region


class FakeSlide:
    def __init__(self, properties):
        self.properties = properties
        self.dimensions = (40000, 30000)


def direct_read(slide, x, y, level, size):
    rgba = np.asarray(slide.read_region((int(x), int(y)), level, (size, size)))
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3]


def write_pyramid(path: Path, level0: np.ndarray, mpp: float, factors=(4,)) -> list[np.ndarray]:
    """Tiled pyramidal TIFF that OpenSlide opens as generic-tiff (REFERENCE.md recipe)."""
    levels = [level0] + [cv2.resize(level0, (level0.shape[1] // f, level0.shape[0] // f),
                                    interpolation=cv2.INTER_AREA) for f in factors]
    resolution = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path) as tif:
        for index, image in enumerate(levels):
            tif.write(image, tile=(256, 256) if min(image.shape[:2]) >= 256 else (16, 16), compression="zlib",
                      photometric="rgb", resolution=resolution, resolutionunit="CENTIMETER",
                      subfiletype=1 if index else 0)
    return levels


def test_open_slide_errors_name_the_path(tmp_path):
    with pytest.raises(SlideError, match=r"not found: .*missing\.svs"):
        open_slide(tmp_path / "missing.svs")
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"not a slide" * 100)
    with pytest.raises(SlideError, match=r"cannot open slide .*garbage\.svs"):
        open_slide(garbage)


def test_slide_mpp_sources_and_missing_mpp_error():
    assert slide_mpp(open_slide(CMU), "cmu") == pytest.approx(0.499)
    tcga = open_slide(TCGA)
    with pytest.raises(SlideError) as missing:
        slide_mpp(tcga, "tcga.svs")
    # The message names the real config keys (tile_dlbcl.*), so the user can paste them into --set.
    assert str(missing.value) == ("slide tcga.svs (aperio, 4443 x 3567 px, no objective power) has no openslide.mpp-x; "
                                  "set tile_dlbcl.mpp_override to its level-0 um/px: typical aperio scans are "
                                  "0.50 um/px at 20x (the slide would be 2.2 x 1.8 mm) and 0.25 at 40x (1.1 x 0.9 mm)")
    assert slide_mpp(tcga, "tcga.svs", mpp_override=0.25) == 0.25
    with pytest.raises(SlideError, match="mpp_override must be a positive number"):
        slide_mpp(tcga, "tcga.svs", mpp_override=-1.0)
    # The metadata wins over the override; the objective-power fallback is off unless asked for.
    assert slide_mpp(open_slide(CMU), "cmu", mpp_override=0.25) == pytest.approx(0.499)
    forty_x = FakeSlide({"openslide.objective-power": "40", "openslide.vendor": "hamamatsu"})
    assert slide_mpp(forty_x, "f", allow_objective_power=True) == pytest.approx(0.25)
    with pytest.raises(SlideError) as missing:
        slide_mpp(forty_x, "f")
    assert str(missing.value) == ("slide f (hamamatsu, 40000 x 30000 px, objective power 40x) has no openslide.mpp-x; "
                                  "set tile_dlbcl.mpp_override to its level-0 um/px (hamamatsu scans at 40x are "
                                  "usually about 0.23 um/px), or enable tile_dlbcl.allow_objective_power to use "
                                  "10 / 40 = 0.25 um/px")
    with pytest.raises(SlideError, match=r"^slide f \(unknown vendor, 40000 x 30000 px, no objective power\) has no "
                                         r"openslide.mpp-x; .* 0.50 um/px at 20x \(the slide would be 20.0 x 15.0 mm"):
        slide_mpp(FakeSlide({}), "f", allow_objective_power=True)


def test_pick_level_tolerates_non_integer_downsamples():
    downsamples = open_slide(BOXES).level_downsamples
    np.testing.assert_allclose(downsamples, [1, 2, 4.0161, 8.0863], atol=1e-4)
    cases = {1.0: 0, 1.5: 0, 1.99: 1, 2.0: 1, 3.9: 1, 3.99: 2, 4.0: 2, 8.0: 2, 8.0863: 3, 8.1: 3, 100.0: 3}
    for wanted, level in cases.items():
        assert pick_level(downsamples, wanted) == level, wanted
    # openslide's own rule (largest downsample <= wanted, no tolerance) returns level 1 for 4.0.
    assert open_slide(BOXES).get_best_level_for_downsample(4.0) == 1
    with pytest.raises(SlideError, match="upsample"):
        pick_level(downsamples, 0.5)


def test_read_rgb_composites_transparent_pixels_on_white():
    slide = open_slide(BOXES)
    rgb = read_rgb(slide, -8, -6, 0, 20, 20)
    rgba = np.asarray(slide.read_region((0, 0), 0, (12, 14)))
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 20, 3)
    assert (rgb[:6] == 255).all() and (rgb[:, :8] == 255).all()
    np.testing.assert_array_equal(rgb[6:, 8:], rgba[..., :3])


def test_roi_grid_by_hand():
    np.testing.assert_array_equal(roi_grid((10, 20, 410, 220), 100),
                                  [[10, 20], [110, 20], [210, 20], [310, 20],
                                   [10, 120], [110, 120], [210, 120], [310, 120]])
    # 187.5 px patches: floor(0), floor(187.5) = 187; 375 + 187.5 > 400, so no third column.
    np.testing.assert_array_equal(roi_grid((0, 0, 400, 200), 187.5), [[0, 0], [187, 0]])
    assert roi_grid((0, 0, 99, 500), 100).shape == (0, 2)


def test_read_patches_at_a_lower_level_equal_direct_reads(tmp_path):
    slide = open_slide(BOXES)
    coords = roi_grid((3, 5, 290, 240), 32.0)  # 16 px patches at level 1 (downsample 2)
    patches = read_patches(slide, coords, 32.0, level=1, patch_size_px=16, max_read_px=60)
    expected = np.stack([direct_read(slide, x, y, 1, 16) for x, y in coords])
    np.testing.assert_array_equal(patches, expected)

    # Real H&E pyramid (levels 1 and 1/4, mpp 0.25): tiling at 1.0 um/px reads level 1 and returns
    # exactly the pixels written there and those of a direct read_region.
    tissue = cv2.cvtColor(cv2.imread(str(TISSUE_IMAGE)), cv2.COLOR_BGR2RGB)
    levels = write_pyramid(tmp_path / "tissue.tiff", tissue, mpp=0.25)
    rois = np.array([[0, 0, 1000, 1000]])
    result = tile_slide(tmp_path / "tissue.tiff", rois, ["r"], ["p"], target_mpp=1.0, patch_size_px=32,
                        quality={"hue_range": None, "saturation_range": None, "value_range": None},
                        negatives="none", max_read_px=100)
    assert result.grid.level == 1 and result.grid.patch_level0_px == 128.0
    assert len(result.x) == 49  # floor(1000 / 128) ** 2
    written = np.stack([levels[1][y // 4:y // 4 + 32, x // 4:x // 4 + 32] for x, y in result.coords])
    np.testing.assert_array_equal(result.x, written)
    slide = open_slide(tmp_path / "tissue.tiff")
    direct = np.stack([direct_read(slide, x, y, 1, 32) for x, y in result.coords])
    np.testing.assert_array_equal(result.x, direct)


def composited_read(slide, x, y, level, size):
    """One patch the plain way: read_region, alpha over white in float, rounded."""
    rgba = np.asarray(slide.read_region((int(x), int(y)), level, (size, size))).astype(np.float64)
    alpha = rgba[..., 3:4]
    return np.rint((rgba[..., :3] * alpha + 255 * (255 - alpha)) / 255).astype(np.uint8)


def recording_reads(monkeypatch) -> list[tuple]:
    """Record (location, level, size) of every OpenSlide.read_region call."""
    calls = []
    original = openslide.OpenSlide.read_region

    def recording(self, location, level, size):
        calls.append((tuple(location), level, tuple(size)))
        return original(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", recording)
    return calls


def test_read_patches_strips_equal_per_patch_reads(monkeypatch):
    """Grid rows are read as one strip each; every patch equals its own read + composite + resize."""
    slide = open_slide(CMU)  # 2220 x 2967
    grid = roi_grid((1000, 1500, 1000 + 6 * 187.2, 1500 + 3 * 187.2), 187.2)  # x: 0, 187, ..., 748, 936
    loose = np.array([
        [1600, 2300], [1700, 2300],  # overlapping
        [200, 2600],                 # alone on its row
        [-50, -40],                  # partly before the slide: transparent, composited on white
        [2100, 2900],                # partly beyond the slide's far corner
    ])
    coords = np.concatenate([grid, loose])[np.random.default_rng(0).permutation(len(grid) + len(loose))]
    expected = np.stack([cv2.resize(composited_read(slide, x, y, 0, 187), (96, 96), interpolation=cv2.INTER_AREA)
                         for x, y in coords])
    calls = recording_reads(monkeypatch)
    for threads in (1, 3):
        np.testing.assert_array_equal(read_patches(slide, coords, 187.2, 0, 96, read_threads=threads), expected)
    assert expected[coords[:, 0] < 0][0, :20].min() == 255  # the 40 px above the slide are white
    # 3 grid rows, the overlapping pair, and three lone patches: 7 reads, each one patch high.
    assert len(calls) == 2 * 7 and {size[1] for _, _, size in calls} == {187}
    assert sorted(size[0] for _, _, size in calls[:7]) == [187, 187, 187, 287, 1123, 1123, 1123]


def test_read_patches_enlarging_within_tolerance():
    """19 level px to 20 output px: patches are resized apart, within 1 of a per-patch cv2.resize."""
    slide = open_slide(BOXES)
    coords = roi_grid((0, 0, 300, 250), 38.0)
    patches = read_patches(slide, coords, 38.0, level=1, patch_size_px=20)
    expected = np.stack([cv2.resize(composited_read(slide, x, y, 1, 19), (20, 20), interpolation=cv2.INTER_AREA)
                         for x, y in coords])
    difference = np.abs(patches.astype(int) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.02


def test_thumbnail_reads_the_coarsest_level_that_gives_its_size(tmp_path, monkeypatch):
    tissue = cv2.cvtColor(cv2.imread(str(TISSUE_IMAGE)), cv2.COLOR_BGR2RGB)
    levels = write_pyramid(tmp_path / "tissue.tiff", tissue, mpp=0.25, factors=(4, 16))  # 1000, 250, 62 px
    slide = open_slide(tmp_path / "tissue.tiff")
    calls = recording_reads(monkeypatch)
    # 256 px: level 0 shrunk 4-fold and level 1 as it is both give 250 px; level 1 reads 16x fewer px.
    thumbnail, scale = read_thumbnail(slide, thumbnail_px=256)
    np.testing.assert_array_equal(thumbnail, levels[1])
    assert scale == pytest.approx(1 / 4) and {level for _, level, _ in calls} == {1}
    # 512 px: level 0 halved (500 px) beats level 1 (250 px).
    calls.clear()
    thumbnail, scale = read_thumbnail(slide, thumbnail_px=512)
    np.testing.assert_array_equal(thumbnail, cv2.resize(tissue, (500, 500), interpolation=cv2.INTER_AREA))
    assert scale == pytest.approx(1 / 2) and {level for _, level, _ in calls} == {0}


def test_cmu_single_level_pcam_scale_patches_inside_roi():
    rois = np.array([CMU_ROI])
    result = tile_slide(CMU, rois, ["roi0"], ["patient7"], negatives="none")
    downsample = 0.972 / 0.499
    assert result.grid.level == 0 and result.grid.target_mpp == pytest.approx(0.972)
    assert result.grid.downsample == pytest.approx(1.948, abs=1e-3)
    side = result.grid.patch_level0_px
    assert side == pytest.approx(96 * downsample)
    # 600 x 1000 px ROI / 187 px patches: 3 x 5 grid, all tissue.
    assert result.x.shape == (15, 96, 96, 3) and result.counts["positive"]["kept"] == 15
    assert (result.y == 1).all() and (result.group == "patient7").all()
    xy = result.coords
    assert (xy[:, 0] >= CMU_ROI[0]).all() and (xy[:, 1] >= CMU_ROI[1]).all()
    assert (xy[:, 0] + side <= CMU_ROI[2]).all() and (xy[:, 1] + side <= CMU_ROI[3]).all()
    # Each patch is its own 187 px level-0 box shrunk with INTER_AREA, read and resized one by one.
    assert round(side) == 187
    slide = open_slide(CMU)
    reference = np.stack([cv2.resize(direct_read(slide, x, y, 0, 187), (96, 96), interpolation=cv2.INTER_AREA)
                          for x, y in xy])
    np.testing.assert_array_equal(result.x, reference)


def test_reads_stay_bounded(monkeypatch):
    sizes = []
    original = openslide.OpenSlide.read_region

    def recording(self, location, level, size):
        sizes.append(size)
        return original(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", recording)
    rois = np.array([CMU_ROI])
    small = tile_slide(CMU, rois, ["r"], ["p"], max_read_px=400, thumbnail_px=256)
    assert max(max(s) for s in sizes) <= 400 and len(sizes) > 10
    sizes.clear()
    large = tile_slide(CMU, rois, ["r"], ["p"], max_read_px=4096, thumbnail_px=256)
    assert max(max(s) for s in sizes) > 400
    np.testing.assert_array_equal(small.coords, large.coords)
    np.testing.assert_array_equal(small.x, large.x)
    with pytest.raises(SlideError, match="max_read_px 100 is too small"):
        tile_slide(CMU, rois, ["r"], ["p"], max_read_px=100)


def test_tcga_without_mpp_fails_clearly_and_works_with_override():
    rois = np.array([[1500, 1000, 2600, 2000]])
    with pytest.raises(SlideError, match=r"^slide tcga-cr-7395-01a-01-ts1\.svs \(aperio, .*\) has no openslide\.mpp-x"):
        tile_slide(TCGA, rois, ["r"], ["p"])
    result = tile_slide(TCGA, rois, ["r"], ["p"], mpp_override=0.25, negatives="none")
    # wanted downsample 0.972 / 0.25 = 3.888: level 1 (2.0005), shrunk a further 1.94x.
    assert result.grid.level == 1
    assert result.grid.patch_level0_px == pytest.approx(96 * 3.888)
    positive = result.counts["positive"]
    assert positive["kept"] + sum(positive["rejected"].values()) == 4  # floor(1100 / 373.2) * floor(1000 / 373.2)
    assert positive["kept"] >= 3 and result.x.shape == (positive["kept"], 96, 96, 3)
    xy = result.coords
    assert (xy >= [1500, 1000]).all() and (xy + 96 * 3.888 <= [2600, 2000]).all()


@pytest.mark.parametrize("factor, level", [(1.0, 0), (2.0, 1), (4.0, 2), (4.0161, 2), (8.0, 3), (8.0863, 3)])
def test_boxes_levels_from_target_mpp(factor, level):
    mpp = open_slide(BOXES).properties["openslide.mpp-x"]
    result = tile_slide(BOXES, np.array([[0, 0, 300, 250]]), ["r"], ["p"], target_mpp=float(mpp) * factor,
                        patch_size_px=8, negatives="none",
                        quality={"hue_range": None, "saturation_range": None, "value_range": None})
    assert result.grid.level == level
    side = 8 * factor
    assert len(result.x) == int(300 // side) * int(250 // side)


def test_bad_rois_are_skipped_with_reasons_and_counts():
    rois = np.array([
        CMU_ROI,                   # good
        [5000, 5000, 5200, 5200],  # outside the 2220 x 2967 slide
        [500, 500, 400, 700],      # xs >= xe
        [900, 900, 900, 1300],     # xs == xe
        [100, 100, 150, 150],      # smaller than one 187 px patch
        [0, 0, 400, 400],          # blank glass: every patch fails S > 0.07
        [2100, 2800, 2400, 3100],  # partly outside: clipped to (2100, 2800, 2220, 2967), too small
    ])
    ids = ["good", "outside", "reversed", "flat", "tiny", "glass", "edge"]
    result = tile_slide(CMU, rois, ids, [f"p{i}" for i in range(7)], negatives="none")
    assert [(s["item"], s["reason"]) for s in result.skipped] == [
        ("cmu-1-small-region.svs:flat", "roi_empty"),
        ("cmu-1-small-region.svs:reversed", "roi_empty"),
        ("cmu-1-small-region.svs:outside", "roi_outside_slide"),
        ("cmu-1-small-region.svs:edge", "roi_smaller_than_patch"),
        ("cmu-1-small-region.svs:tiny", "roi_smaller_than_patch"),
        ("cmu-1-small-region.svs:glass", "roi_all_patches_rejected"),
    ]
    counts = result.counts
    assert counts["skipped"] == {"roi_empty": 2, "roi_outside_slide": 1, "roi_smaller_than_patch": 2,
                                 "roi_all_patches_rejected": 1}
    assert counts["rois_clipped"] == 1
    # 15 good patches kept; the glass ROI's 2 x 2 grid is rejected for low saturation.
    assert counts["positive"] == {"kept": 15, "rejected": {"low_saturation": 4}}
    assert (result.group == "p0").all()


def test_missing_and_unreadable_slides_raise(tmp_path):
    rois = np.array([CMU_ROI])
    with pytest.raises(SlideError, match="not found"):
        tile_slide(tmp_path / "nope.svs", rois, ["r"], ["p"])
    corrupt = bytearray(CMU.read_bytes())
    corrupt[200_000:1_200_000] = bytes(1_000_000)  # wipe JPEG tiles, keep the TIFF directory
    (tmp_path / "corrupt.svs").write_bytes(bytes(corrupt))
    with pytest.raises(SlideError, match=r"cannot read slide corrupt\.svs"):
        tile_slide(tmp_path / "corrupt.svs", rois, ["r"], ["p"])


def test_negatives_are_tissue_outside_rois_with_one_group_per_tissue_piece(tmp_path):
    rois = np.array([[900, 600, 1500, 1200], [900, 2000, 1500, 2600]])
    result = tile_slide(CMU, rois, ["a", "b"], ["upper", "lower"], thumbnail_px=512)
    negative = result.y == 0
    side = result.grid.patch_level0_px
    xy = result.coords[negative].astype(float)
    assert negative.sum() >= 10 and result.counts["negative"]["kept"] == negative.sum()
    for x0, y0, x1, y1 in rois:
        overlap = (xy[:, 0] < x1) & (xy[:, 0] + side > x0) & (xy[:, 1] < y1) & (xy[:, 1] + side > y0)
        assert not overlap.any()
    # This region is one connected piece of tissue holding both ROIs: its negatives form one group
    # (nearest-ROI-per-patch would have split them at the middle row, 1600).
    assert len(set(result.group[negative])) == 1 and result.group[negative][0] in {"upper", "lower"}
    # Kept negatives pass the DLBCL rule measured independently (unblurred HSV, OpenCV 8-bit).
    hsv = cv2.cvtColor(result.x[negative].reshape(-1, 96, 3), cv2.COLOR_RGB2HSV).reshape(-1, 96 * 96, 3)
    assert (hsv[..., 1].mean(axis=1) / 255 > 0.065).all() and (hsv[..., 2].mean(axis=1) / 255 < 0.81).all()

    path = save_overview(tmp_path / "overview" / "cmu.png", result, rois)
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    thumb_h, thumb_w = result.tissue.thumbnail.shape[:2]
    assert image.shape[0] > OVERVIEW_TITLE_PX + thumb_h and image.shape[1] >= thumb_w
    on_map = image[OVERVIEW_TITLE_PX:OVERVIEW_TITLE_PX + thumb_h, :thumb_w]
    for key in ("roi", "positive", "negative"):
        assert (on_map == OVERVIEW_COLOURS[key]).all(axis=2).sum() > 50, key
    assert not list((tmp_path / "overview").glob("*.tmp"))


def test_an_unannotated_core_between_two_patients_stays_in_one_group():
    from common.slides import _box_distance, _nearest_roi_per_component
    from common.tiling import TissueMap

    # A 300 x 100 px thumbnail at scale 0.1 (level 0: 3000 x 1000) with three pink cores on white glass:
    # left (patient A's ROI), middle (no ROI), right (patient B's ROI).
    thumbnail = np.full((100, 300, 3), 245, np.uint8)
    for cx in (50, 150, 250):
        cv2.circle(thumbnail, (cx, 50), 35, (200, 120, 170), -1)
    rois = np.array([[300, 300, 700, 700], [2300, 300, 2700, 700]], np.float64)
    xs = np.arange(1200, 1800, 100, dtype=np.float64)  # middle core, left half nearer A, right half nearer B
    points = np.concatenate([np.stack([xs, np.full_like(xs, 500)], 1), [[150.0, 500.0], [2850.0, 500.0]]])
    hsv = cv2.cvtColor(thumbnail.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)
    core = TissueMap(thumbnail, 0.1, hsv[..., 1] > 0.07).pieces(points, patch_level0_px=100)
    assert len(set(core[:len(xs)])) == 1 and len(set(core)) == 3 and (core > 0).all()
    distance = _box_distance(points, rois)
    assert set(distance[:len(xs)].argmin(axis=1)) == {0, 1}  # per patch, the middle core would be split
    nearest = _nearest_roi_per_component(distance, core)
    assert len(set(nearest[:len(xs)])) == 1
    assert nearest[len(xs)] == 0 and nearest[len(xs) + 1] == 1  # cores with an ROI keep their patient
    glass = _nearest_roi_per_component(distance, np.zeros(len(points), int))  # no tissue: per patch
    np.testing.assert_array_equal(glass, distance.argmin(axis=1))


def test_tile_tissue_is_02s_grid_and_rules_without_rois():
    """All tissue of a slide: the very cells, pixels and rejections of tile_slide on a slide without ROIs,
    each with the tissue piece under its centre."""
    tiles = tile_tissue(CMU, thumbnail_px=512)
    no_rois = tile_slide(CMU, np.zeros((0, 4)), [], [], thumbnail_px=512)
    assert tiles.grid == no_rois.grid and tiles.grid.level == 0 and tiles.grid.level_mpp == pytest.approx(0.499)
    np.testing.assert_array_equal(tiles.coords, no_rois.coords)
    np.testing.assert_array_equal(tiles.x, no_rois.x)
    np.testing.assert_array_equal(tiles.rejected_coords, no_rois.rejected_coords)
    np.testing.assert_array_equal(tiles.rejected_reason, no_rois.rejected_reason)
    assert len(tiles.coords) > 50 and (no_rois.group == "cmu-1-small-region.svs").all()
    # The CMU region's tissue is one connected piece (a speck of dirt elsewhere is another): one core id.
    assert tiles.core.shape == (len(tiles.coords),) and len(set(tiles.core.tolist())) == 1 and tiles.core[0] > 0
    # Cells of a slide-wide grid from (0, 0), 187.0 px apart.
    step = tiles.grid.patch_level0_px
    np.testing.assert_array_equal(tiles.coords % 1, 0)
    np.testing.assert_allclose(tiles.coords / step, np.rint(tiles.coords / step), atol=0.01)


def test_balance_reads_only_the_negatives_it_needs(monkeypatch):
    """One negative per kept positive, drawn at random from the candidates before reading; the other
    candidates are never read (reported as dropped) and the draw is the same for the same seed."""
    rois = np.array([[900, 600, 1500, 1200]])  # 3 x 3 positives on a slide with ~50 tissue cells outside
    everything = tile_slide(CMU, rois, ["a"], ["p"], thumbnail_px=512)
    calls = recording_reads(monkeypatch)
    balanced = tile_slide(CMU, rois, ["a"], ["p"], thumbnail_px=512, balance=True, seed=1)
    n_pos = balanced.counts["positive"]["kept"]
    assert n_pos == 8 and balanced.counts["negative"]["kept"] == n_pos and (balanced.y == 0).sum() == n_pos
    negatives = balanced.coords[balanced.y == 0]
    neg = everything.y == 0
    candidates = np.concatenate([everything.coords[neg], everything.rejected_coords[everything.rejected_y == 0]])
    assert len(candidates) == 46
    # The kept negatives are candidates of the unbalanced run, with the very same pixels.
    same = (everything.coords[:, None] == negatives[None]).all(axis=2)
    assert same.sum() == n_pos
    np.testing.assert_array_equal(everything.x[same.any(axis=1)], balanced.x[balanced.y == 0])
    # Read: the 9 positive cells and ceil(8 * 1.1) + 8 = 17 drawn candidates, not all 46; dropped: the 29
    # never drawn and the 8 drawn that passed beyond the 8 needed (one drawn was rejected).
    assert balanced.patches_read == 9 + 17 and everything.patches_read == 9 + 46
    assert balanced.counts["negative"] == {"kept": 8, "rejected": {"high_value": 1}, "dropped": 37, "read_unused": 8}
    for tiles in (balanced, everything):  # every patch read is kept, rejected or (balance only) read unused
        counted = [tiles.counts[cls]["kept"] + sum(tiles.counts[cls]["rejected"].values())
                   for cls in ("positive", "negative")]
        assert tiles.patches_read == sum(counted) + tiles.counts["negative"]["read_unused"]
    assert everything.counts["negative"]["read_unused"] == 0
    for tiles in (balanced, everything):  # the filter's brightness of each kept patch, in the order of x
        np.testing.assert_array_equal(tiles.mean_value, hsv_means(tiles.x)[:, 2])
    assert len(balanced.dropped_coords) == 37 and (balanced.dropped_y == 0).all()
    patch_px = round(balanced.grid.patch_level0_px)
    read_px = sum(size[0] * size[1] for _, level, size in calls if size[1] == patch_px)
    assert read_px <= 26 * patch_px * (patch_px + 1)
    again = tile_slide(CMU, rois, ["a"], ["p"], thumbnail_px=512, balance=True, seed=1)
    np.testing.assert_array_equal(again.coords, balanced.coords)
    other = tile_slide(CMU, rois, ["a"], ["p"], thumbnail_px=512, balance=True, seed=2)
    assert not np.array_equal(other.coords, balanced.coords)


def test_negatives_modes_on_three_cores_one_with_an_roi(tmp_path):
    """Three round cores of real H&E on glass at 0.972 um/px (a patch is 96 level-0 px); an ROI in the
    left core only. all: tissue outside the ROI in every core; cores_without_roi: exactly those of the
    two cores without an ROI; none: no negatives."""
    tissue = cv2.cvtColor(cv2.imread(str(TISSUE_IMAGE)), cv2.COLOR_BGR2RGB)
    image = np.full((480, 1680, 3), 242, np.uint8)
    yy, xx = np.mgrid[:480, :1680]
    core = np.zeros((480, 1680), np.int64)
    for index, cx in enumerate((240, 840, 1440), start=1):  # 200 px of glass between cores
        inside = (xx - cx) ** 2 + (yy - 240) ** 2 < 200 ** 2
        image[inside] = tissue[yy[inside] % 1000, xx[inside] % 1000]
        core[inside] = index
    write_pyramid(tmp_path / "tma.tiff", image, mpp=0.972, factors=(4,))
    rois = np.array([[144, 144, 336, 336]])  # 2 x 2 patches in the left core
    no_filter = {"hue_range": None, "saturation_range": None, "value_range": None}
    negatives = {}
    for mode in ("all", "cores_without_roi", "none"):
        result = tile_slide(tmp_path / "tma.tiff", rois, ["r"], ["p"], quality=no_filter, negatives=mode)
        assert result.counts["positive"]["kept"] == 4 and (result.group == "p").all()
        negatives[mode] = result.coords[result.y == 0]
    on_core = core[negatives["all"][:, 1] + 48, negatives["all"][:, 0] + 48]  # the core under each centre
    assert (on_core > 0).all() and set(np.bincount(on_core, minlength=4)[1:] > 0) == {True}
    np.testing.assert_array_equal(negatives["cores_without_roi"], negatives["all"][on_core != 1])
    assert len(negatives["none"]) == 0
    with pytest.raises(SlideError, match="negatives must be one of all, cores_without_roi, none"):
        tile_slide(tmp_path / "tma.tiff", rois, ["r"], ["p"], negatives="benign")


def test_overview_draws_balance_dropped_patches_in_their_colour_with_a_legend(tmp_path):
    rois = np.array([[900, 600, 1500, 1200]])
    result = tile_slide(CMU, rois, ["a"], ["p"], thumbnail_px=512, balance=True, seed=1)
    assert len(result.dropped_coords) == 37
    image = cv2.cvtColor(cv2.imread(str(save_overview(tmp_path / "o.png", result, rois))), cv2.COLOR_BGR2RGB)
    scale, side = result.tissue.scale, result.grid.patch_level0_px
    # The middle of each dropped patch's top edge, in the PNG: the dropped colour exactly, on most of
    # them (a neighbour's outline may share a pixel after rounding).
    x = np.rint((result.dropped_coords[:, 0] + side / 2) * scale).astype(int)
    y = np.rint(result.dropped_coords[:, 1] * scale).astype(int) + OVERVIEW_TITLE_PX
    dropped = (image[y, x] == OVERVIEW_COLOURS["dropped"]).all(axis=1)
    assert dropped.mean() > 0.8
    # Inside the patch the thumbnail is tinted toward the colour, not replaced: closer to it than before.
    inside = image[y + 3, x] .astype(int)
    before = result.tissue.thumbnail[y + 3 - OVERVIEW_TITLE_PX, x].astype(int)
    colour = np.array(OVERVIEW_COLOURS["dropped"])
    assert (np.abs(inside - colour).sum(1) < np.abs(before - colour).sum(1)).mean() > 0.9
    # The legend's colour squares: one per category, below the map.
    legend = image[OVERVIEW_TITLE_PX + result.tissue.thumbnail.shape[0]:, :30]
    for key, rgb in OVERVIEW_COLOURS.items():
        assert (legend == rgb).all(axis=2).sum() >= 100, key
    # The five colours are distinct.
    assert len(set(OVERVIEW_COLOURS.values())) == 5
