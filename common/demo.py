"""Deterministic synthetic demo data in the real on-disk formats of PatchCamelyon and DLBCL-Morph.

`make demo` runs the whole pipeline on a fresh machine without the real datasets, so this module writes
a small dataset that the very same code reads as if it were real:

- PCam (`write_demo_pcam`): `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5` (or whole-file
  gzipped `.h5.gz`) with `x` uint8 (N, 96, 96, 3) RGB and `y` uint8 (N, 1, 1, 1), the official
  `..._meta.csv` files (`,coord_y,coord_x,tumor_patch,center_tumor_patch,wsi`), and `demo_junk.csv`
  (`split,index,kind`) listing the deliberately bad patches (blank glass, brown IHC, blurred): the
  known-junk CSV that 01's grid search scores against (`filter_pcam.junk_csv`), as a user's own would be.
- DLBCL-Morph (`write_demo_dlbcl`): `TMA/annotations.csv` (`patient_id,tma_id,stain,xs,ys,xe,ye`, ROI
  boxes in level-0 pixels) and `TMA/HE/<tma_id>.svs`: pyramidal tiled TIFFs (downsamples 1, 4, 16,
  zlib tiles, resolution tags) that OpenSlide opens as `generic-tiff` with `openslide.mpp-x` set.
  Each slide is a tissue microarray of round cores; lymphoma is rendered inside the ROI boxes and
  normal lymph node elsewhere. A few rows of another stain (CD10) are there to be ignored.

Rendering. Tissue is built as maps of hematoxylin and eosin optical density C (per pixel) and turned
into RGB by the Beer-Lambert law, I = Io * exp(-(C @ S)), with a (2, 3) stain matrix S of unit OD
rows. The classes differ only in morphology, at PCam's scale (0.972 um/px):
- normal lymph node: dense small round dark lymphocyte nuclei (r ~3 um), a few pale large cells,
  pink stroma bands;
- metastatic breast carcinoma: cohesive nests of large pleomorphic vesicular nuclei (r 5-9.5 um)
  with nucleoli and abundant eosinophilic cytoplasm, separated by stroma;
- diffuse large B-cell lymphoma: diffuse sheets of large round/oval vesicular nuclei (r ~5-6.5 um)
  with nucleoli, scant cytoplasm, some small lymphocytes in between, no nests.
Nuclei are placed on jittered hexagonal grids (one per cell kind, larger kinds first, smaller ones
kept clear of them) and drawn all at once: a Euclidean distance transform gives every pixel its
nearest nucleus, and the nucleus's shape (ellipse with a wobbly contour), chromatin profile, nucleolus
and cytoplasm are evaluated from the pixel's offset to that centre. Colour carries almost no class
information within a source: the mean colour of each patch (PCam) or of each class region of a core
(DLBCL) is set to that of stain amounts drawn from one class-independent distribution (see
`_match_mean_colour`); per-patch amounts vary more than per-slide ones, so no slide's colour stands
for a label. The two sources use different stain matrices and intensities, jittered per slide, so
stain normalisation has work to do.

Everything is deterministic from the seed (numpy `default_rng`, one stream per split and per slide).

Usage:
    python -m common.demo [--config configs/demo.yaml]       # writes demo.out_dir/{pcam,dlbcl}
    write_demo(Path("data/demo"), seed=0, pcam_per_split={"train": 1200, "valid": 300, "test": 300},
               dlbcl_slides=4, dlbcl_cores_per_slide=6)
"""

from __future__ import annotations

import csv
import gzip
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import tifffile
from scipy import ndimage
from scipy.spatial import cKDTree

from common.config import UserError

# ---------------------------------------------------------------------------------------------------
# Scales and formats
# ---------------------------------------------------------------------------------------------------
RENDER_MPP = 0.972  # um/px: PCam's scale (Camelyon16 at 40x undersampled to 10x); all tissue drawn at it
PATCH_PX = 96  # PCam patch side
CENTRE_PX = 32  # PCam label region: positive iff tumour in the centre 32 x 32
PCAM_MARGIN_PX = 8  # drawn around each patch so that nuclei at its edges are cut, not missing
SPLITS = ("train", "valid", "test")
PCAM_PREFIX = "camelyonpatch_level_2_split_"
PCAM_META_HEADER = ["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"]
DLBCL_HEADER = ["patient_id", "tma_id", "stain", "xs", "ys", "xe", "ye"]
SLIDE_DOWNSAMPLES = (1, 4, 16)
SLIDE_TILE_PX = 256
JUNK_KINDS = ("blank", "ihc", "blur")
CORE_RADIUS_UM = (425.0, 525.0)  # TMA cores 0.85-1.05 mm across
CHUNK_PX = 3_500_000  # pixels drawn per batch: ~25 float32 temporaries of this size stay < 0.5 GB

# Tissue region codes of the label maps the renderer draws from.
GLASS, NODE, STROMA, CARCINOMA, LYMPHOMA = range(5)
# Background (between-cell) optical densities per region: (hematoxylin, eosin).
_BACKGROUND_OD = np.array([[0.0, 0.0], [0.05, 0.20], [0.03, 0.50], [0.04, 0.18], [0.06, 0.20]], np.float32)

# Stain matrices, rows hematoxylin then eosin (unit OD vectors, R G B). PCam: the Macenko reference
# vectors (a purple-pink Camelyon-like stain); DLBCL: close to Ruifrok & Johnston's (bluer H, magenta E).
_PCAM_STAINS = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
_DLBCL_STAINS = np.array([[0.62, 0.72, 0.31], [0.09, 0.96, 0.26]])
_DAB = np.array([0.268, 0.570, 0.776])  # Ruifrok & Johnston's diaminobenzidine (brown)


class DemoError(UserError):
    """A bad argument to the demo writer (printed as one line, exit 2)."""


# ---------------------------------------------------------------------------------------------------
# Cell kinds
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _CellKind:
    """One kind of cell, in micrometres; `keep` is the occupancy of its grid sites per region code."""

    spacing_um: float  # hexagonal grid pitch
    keep: tuple[float, float, float, float, float]  # per region: GLASS, NODE, STROMA, CARCINOMA, LYMPHOMA
    radius_um: tuple[float, float]  # nucleus semi-major axis, uniform range
    aspect: tuple[float, float]  # minor / major axis
    wobble: float  # amplitude of the 2nd and 3rd harmonics of the contour (pleomorphism)
    chromatin_od: tuple[float, float]  # hematoxylin OD at the nuclear rim
    vesicular: float  # fraction of the rim's chromatin missing in the nuclear centre
    nucleolus_od: float  # peak OD of a nucleolus (0: none)
    nucleolus_prob: float
    cytoplasm_scale: float  # cytoplasm radius / nucleus radius (1: none)
    cytoplasm_od: tuple[float, float]  # (hematoxylin, eosin) OD of the cytoplasm


_CARCINOMA = _CellKind(17.0, (0, 0, 0, 0.97, 0), (5.0, 9.5), (0.6, 1.0), 0.16, (0.75, 1.05), 0.55,
                       0.9, 0.7, 1.9, (0.04, 0.55))
_BLAST = _CellKind(12.5, (0, 0, 0, 0, 0.93), (4.6, 6.4), (0.75, 1.0), 0.05, (0.85, 1.15), 0.45,
                   0.8, 0.85, 1.3, (0.10, 0.22))
_HISTIOCYTE = _CellKind(24.0, (0, 0.35, 0, 0, 0.05), (4.2, 5.6), (0.55, 0.9), 0.08, (0.6, 0.8), 0.5,
                        0.4, 0.3, 1.8, (0.03, 0.30))
_FIBROBLAST = _CellKind(15.0, (0, 0, 0.6, 0, 0), (4.0, 7.0), (0.22, 0.4), 0.05, (0.9, 1.2), 0.1,
                        0.0, 0.0, 1.0, (0.0, 0.0))
_LYMPHOCYTE = _CellKind(7.8, (0, 0.97, 0.12, 0.03, 0.30), (2.9, 3.6), (0.8, 1.0), 0.05, (1.25, 1.6), 0.1,
                        0.0, 0.0, 1.25, (0.02, 0.08))
_CELL_KINDS = (_CARCINOMA, _BLAST, _HISTIOCYTE, _FIBROBLAST, _LYMPHOCYTE)  # largest first


# ---------------------------------------------------------------------------------------------------
# Random fields and nucleus placement
# ---------------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_px: float | tuple[float, float]
                  ) -> np.ndarray:
    """Approximately Gaussian-filtered white noise per image, scaled to unit standard deviation.

    Coarse fields are drawn on a grid about sigma / 2 px apart, blurred there and resized up (bicubic),
    which costs a fraction of filtering at full resolution. Images are stacked into one 2-D array for
    OpenCV; the little bleed across their borders does not matter for noise.

    Args:
        rng: random generator.
        shape: (N, H, W).
        sigma_px: filter sigma in pixels, one value or (sigma_y, sigma_x) for anisotropic fibres.

    Returns:
        float32 (N, H, W), mean ~0, std 1 over the batch.
    """
    n, height, width = shape
    sig_y, sig_x = (sigma_px, sigma_px) if np.isscalar(sigma_px) else sigma_px
    step_y, step_x = max(1, int(sig_y / 2)), max(1, int(sig_x / 2))
    low_h, low_w = -(-height // step_y) + 1, -(-width // step_x) + 1
    low = cv2.GaussianBlur(rng.standard_normal((n * low_h, low_w), dtype=np.float32), (0, 0),
                           sigmaX=sig_x / step_x, sigmaY=sig_y / step_y, borderType=cv2.BORDER_REFLECT)
    if step_y > 1 or step_x > 1:
        low = cv2.resize(low, (low_w * step_x, n * low_h * step_y), interpolation=cv2.INTER_CUBIC)
    field = low.reshape(n, low_h * step_y, low_w * step_x)[:, :height, :width]
    # The spread from a subsample: a full pass would cost as much as the field itself.
    return field / max(float(field[:, ::3, ::3].std()), 1e-6)


def _place_nuclei(region: np.ndarray, cellularity: np.ndarray, rng: np.random.Generator) -> dict:
    """Sample nuclei of every cell kind on jittered hexagonal grids, larger kinds first.

    A site is kept with the kind's occupancy for the region under it times the local cellularity;
    sites of smaller kinds falling inside an already placed cell are dropped, so large cells are not
    cut by the Voronoi borders of small neighbours.

    Args:
        region: uint8 (N, H, W) region codes.
        cellularity: float32 (N, H, W) in [0, 1], local cell density.
        rng: random generator.

    Returns:
        dict of 1-D arrays, one entry per nucleus: `image` (int), `y`, `x` (px), `radius` (px), `aspect`,
        `angle` (rad), `wobble2`, `wobble3`, `phase2`, `phase3`, `chromatin`, `vesicular`, `nucleolus`,
        `nucleolus_dy`, `nucleolus_dx` (in radii), `cell_radius` (px), `cyto_h`, `cyto_e` (OD).
    """
    n_img, height, width = region.shape
    parts: list[dict] = []
    placed = np.zeros((0, 3))  # (image * far, y, x) of nuclei placed so far, for the exclusion test
    placed_reach = np.zeros(0)
    far = 10.0 * (height + width)  # separates images in one k-d tree
    for kind in _CELL_KINDS:
        pitch = kind.spacing_um / RENDER_MPP
        rows = np.arange(-pitch / 2, height + pitch, pitch * np.sqrt(3) / 2)
        cols = np.arange(-pitch / 2, width + pitch, pitch)
        grid_y = np.broadcast_to(rows[:, None], (rows.size, cols.size))
        grid_x = cols[None, :] + (np.arange(rows.size) % 2)[:, None] * pitch / 2
        shape = (n_img, rows.size, cols.size)
        y = grid_y + rng.uniform(-0.35, 0.35, shape) * pitch
        x = grid_x + rng.uniform(-0.35, 0.35, shape) * pitch
        image = np.broadcast_to(np.arange(n_img)[:, None, None], shape)
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        image, y, x = image[inside], y[inside], x[inside]
        iy, ix = y.astype(np.intp), x.astype(np.intp)
        occupancy = np.asarray(kind.keep, np.float32)[region[image, iy, ix]] * cellularity[image, iy, ix]
        keep = rng.random(y.size) < occupancy
        image, y, x = image[keep], y[keep], x[keep]
        count = y.size
        radius = rng.uniform(*kind.radius_um, count) / RENDER_MPP
        if placed_reach.size and count:
            dist, idx = cKDTree(placed).query(np.column_stack([image * far, y, x]))
            clear = dist > placed_reach[np.minimum(idx, placed_reach.size - 1)] + 0.6 * radius
            image, y, x, radius = image[clear], y[clear], x[clear], radius[clear]
            count = y.size
        nucleolus_angle = rng.uniform(0, 2 * np.pi, count)
        nucleolus_offset = rng.uniform(0.0, 0.5, count)
        parts.append({
            "image": image, "y": y, "x": x, "radius": radius,
            "aspect": rng.uniform(*kind.aspect, count),
            "angle": rng.uniform(0, np.pi, count),
            "wobble2": kind.wobble * rng.uniform(0.3, 1.0, count),
            "wobble3": kind.wobble * rng.uniform(0.0, 0.8, count),
            "phase2": rng.uniform(0, 2 * np.pi, count),
            "phase3": rng.uniform(0, 2 * np.pi, count),
            "chromatin": rng.uniform(*kind.chromatin_od, count),
            "vesicular": np.full(count, kind.vesicular),
            "nucleolus": kind.nucleolus_od * (rng.random(count) < kind.nucleolus_prob),
            "nucleolus_dy": nucleolus_offset * np.sin(nucleolus_angle),
            "nucleolus_dx": nucleolus_offset * np.cos(nucleolus_angle),
            "cell_radius": kind.cytoplasm_scale * radius,
            "cyto_h": np.full(count, kind.cytoplasm_od[0]),
            "cyto_e": np.full(count, kind.cytoplasm_od[1]),
        })
        placed = np.concatenate([placed, np.column_stack([image * far, y, x])])
        placed_reach = np.concatenate([placed_reach, np.maximum(kind.cytoplasm_scale, 1.15) * radius])
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _render_od(region: np.ndarray, cellularity: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Draw hematoxylin and eosin optical-density maps for a batch of region maps.

    Args:
        region: uint8 (N, H, W) region codes (GLASS, NODE, STROMA, CARCINOMA, LYMPHOMA).
        cellularity: float32 (N, H, W) in [0, 1].
        rng: random generator.

    Returns:
        (haem, eosin): float32 (N, H, W) optical densities (0 on glass).
    """
    n_img, height, width = region.shape
    cells = _place_nuclei(region, cellularity, rng)
    is_tissue = region != GLASS
    tissue = cv2.GaussianBlur(is_tissue.astype(np.float32).reshape(n_img * height, width), (0, 0), 0.7
                              ).reshape(region.shape)
    haem, eosin = _BACKGROUND_OD[:, 0][region], _BACKGROUND_OD[:, 1][region]
    # Stroma is fibrous: anisotropic noise, along x or y per image (the canvases are square);
    # elsewhere the eosin is mottled by the same fine noise that textures cytoplasm.
    fibres = _smooth_noise(rng, region.shape, (0.8, 5.0))
    turn = rng.random(n_img) < 0.5
    fibres[turn] = fibres[turn].transpose(0, 2, 1)
    mottle = _smooth_noise(rng, region.shape, 1.5)
    eosin *= 1 + 0.35 * np.where(region == STROMA, fibres, 0.5 * mottle)
    del fibres
    np.clip(eosin, 0, None, out=eosin)
    if cells["y"].size == 0:
        return haem * tissue, eosin * tissue

    # Nearest nucleus of every pixel: OpenCV's distance transform labels each zero pixel's Voronoi cell
    # (5x5 chamfer, near-exact), numbering the zero pixels in raster order of the stacked images.
    marker_at = (cells["image"] * height + cells["y"].astype(np.intp)) * width + cells["x"].astype(np.intp)
    marker_at, first = np.unique(marker_at, return_index=True)
    not_marker = np.ones(region.size, np.uint8)
    not_marker[marker_at] = 0
    _, voronoi = cv2.distanceTransformWithLabels(not_marker.reshape(n_img * height, width), cv2.DIST_L2, 5,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    # Only tissue pixels are drawn, as flat arrays.
    at = np.flatnonzero(is_tissue)
    nid = first[voronoi.ravel()[at] - 1]
    own = (cells["image"][nid] == at // (height * width)).astype(np.float32)
    radius = cells["radius"]
    # Per-nucleus constants, gathered once per pixel as rows of one table.
    table = np.stack([
        cells["y"], cells["x"], np.cos(cells["angle"]), np.sin(cells["angle"]), 1 / cells["aspect"], radius,
        radius * cells["wobble2"] * np.cos(cells["phase2"]), -radius * cells["wobble2"] * np.sin(cells["phase2"]),
        radius * cells["wobble3"] * np.cos(cells["phase3"]), -radius * cells["wobble3"] * np.sin(cells["phase3"]),
        cells["chromatin"], cells["vesicular"], cells["nucleolus"], cells["nucleolus_dx"] * radius,
        cells["nucleolus_dy"] * radius, 1 / (2 * (0.17 * radius) ** 2),
        np.where(cells["cell_radius"] > radius + 0.5, cells["cell_radius"], 0), cells["cyto_h"], cells["cyto_e"],
    ]).astype(np.float32).take(nid, axis=1)
    (cy, cx, cos, sin, inv_aspect, rad, a2, b2, a3, b3, chrom, vesicular, nucleolus_od, nucleolus_u, nucleolus_v,
     nucleolus_k, cell_radius, cyto_h, cyto_e) = table
    dy = (at // width % height).astype(np.float32) - cy
    dx = (at % width).astype(np.float32) - cx
    u = dx * cos + dy * sin
    v = (dy * cos - dx * sin) * inv_aspect
    dist = np.hypot(u, v)
    # Contour r(phi) = r (1 + w2 cos(2 phi + p2) + w3 cos(3 phi + p3)), with cos/sin of phi from (u, v).
    c, s = u / np.maximum(dist, 1e-3), v / np.maximum(dist, 1e-3)
    contour = rad + a2 * (c * c - s * s) + b2 * (2 * c * s) + a3 * c * (4 * c * c - 3) + b3 * s * (3 - 4 * s * s)
    del c, s
    # Anti-aliased edge about one pixel wide.
    nucleus = np.clip(contour - dist + 0.5, 0, 1) * own
    # Vesicular nuclei: chromatin marginated to the membrane, a paler centre; granular texture.
    granules = 1 + 0.25 * _smooth_noise(rng, region.shape, 0.8).ravel()[at]
    chromatin = chrom * (1 - vesicular * np.clip(1 - dist / (0.8 * contour), 0, 1)) * granules
    del contour, granules
    nucleolus = nucleolus_od * np.exp(-((u - nucleolus_u) ** 2 + (v - nucleolus_v) ** 2) * nucleolus_k) * nucleus
    del u, v
    cytoplasm = np.clip(cell_radius - np.hypot(dx, dy) + 0.5, 0, 1) * (1 - nucleus) * own
    del dx, dy
    between = 1 - np.clip(nucleus + cytoplasm, 0, 1)
    cyto_texture = 1 + 0.15 * mottle.ravel()[at]
    haem_flat, eosin_flat = haem.ravel(), eosin.ravel()
    haem_flat[at] = between * haem_flat[at] + nucleus * chromatin + 0.6 * nucleolus + cytoplasm * cyto_h
    eosin_flat[at] = (between * eosin_flat[at] + 0.05 * nucleus + 0.5 * nucleolus
                      + cytoplasm * cyto_e * cyto_texture)
    haem *= tissue
    eosin *= tissue
    return haem, eosin


def _match_mean_colour(haem: np.ndarray, eosin: np.ndarray, mask: np.ndarray, stains: np.ndarray,
                       target_od: np.ndarray, n_iter: int = 4) -> np.ndarray:
    """Make the mean colour over `mask` of each image a fixed target, whatever its texture.

    The target is the colour of a uniform layer holding `target_od` of each stain. Matching the mean
    *intensity*, not the mean OD, is what keeps the class out of the colour: at equal mean OD, dark
    nuclei on a pale background look brighter than uniform tissue (exp is convex), and by a different
    amount in each channel. Two steps, each a fixed-point iteration:
    1. scale the H and E maps (in place) so that the least-squares H and E unmixing of the mean
       apparent OD hits the target;
    2. per-channel OD gains (returned, for `_to_rgb`) that remove the residual the two stains
       cannot, so all three channel means match (gains stay within a few percent of 1).

    Args:
        haem, eosin: float32 (N, H, W) optical densities; rescaled in place over `mask`.
        mask: bool (N, H, W) pixels that define the mean.
        stains: (N, 2, 3) unit OD vectors per image.
        target_od: (N, 2) wanted H and E amounts.
        n_iter: iterations per step (4 bring the mean within ~1 % of the target).

    Every 4th pixel along each axis is used for the means.

    Returns:
        float32 (N, 3) per-channel OD gains for the masked pixels (1 where the mask is empty).
    """
    # Every 4th pixel in each direction estimates the means well; only masked pixels, as flat arrays.
    sub_mask = mask[:, ::4, ::4]
    image = np.nonzero(sub_mask)[0]
    n_img = haem.shape[0]
    count = np.bincount(image, minlength=n_img)[:, None]
    has = count > 0
    count = np.maximum(count, 1)
    stains = stains.astype(np.float32)
    od_h = haem[:, ::4, ::4][sub_mask][:, None] * stains[image, 0]  # (M, 3)
    od_e = eosin[:, ::4, ::4][sub_mask][:, None] * stains[image, 1]
    target_rgb = np.einsum("nk,nkc->nc", target_od, stains)

    def apparent(gain: np.ndarray, scale: np.ndarray) -> np.ndarray:
        # -log of the mean transmittance per channel, (N, 3), with H and E scaled by `scale` (N, 2).
        t = np.exp(-gain[image] * (scale[image, :1] * od_h + scale[image, 1:] * od_e))
        mean_t = np.stack([np.bincount(image, t[:, c], minlength=n_img) for c in range(3)], axis=1) / count
        return -np.log(np.clip(mean_t, 1e-6, 1))

    unmix = np.linalg.pinv(stains)  # (N, 3, 2): apparent channel OD -> (H, E)
    scale = np.ones((n_img, 2), np.float32)
    ones = np.ones((n_img, 3), np.float32)
    for _ in range(n_iter):
        unmixed = np.einsum("nc,nck->nk", apparent(ones, scale), unmix)
        scale *= np.where(has & (unmixed > 1e-4), target_od / np.maximum(unmixed, 1e-4), 1).astype(np.float32)
    gain = ones.copy()
    for _ in range(n_iter):
        now = apparent(gain, scale)
        gain *= np.where(has & (now > 1e-4), target_rgb / np.maximum(now, 1e-4), 1).astype(np.float32)
    for od_map, f in ((haem, scale[:, 0]), (eosin, scale[:, 1])):
        od_map *= np.where(mask, f[:, None, None], np.float32(1))
    return gain


def _jitter_stains(rng: np.random.Generator, stains: np.ndarray, n: int, sd: float) -> np.ndarray:
    """Perturb a (2, 3) stain matrix n times (Gaussian noise on the OD vectors, rows renormalised).

    Returns:
        float64 (n, 2, 3) unit-row stain matrices.
    """
    jittered = np.clip(stains[None] + rng.normal(0, sd, (n, 2, 3)), 0.02, None)
    return jittered / np.linalg.norm(jittered, axis=2, keepdims=True)


def _to_rgb(haem: np.ndarray, eosin: np.ndarray, stains: np.ndarray, io: np.ndarray, noise: np.ndarray,
            od_gain: np.ndarray) -> np.ndarray:
    """Beer-Lambert: I = Io * exp(-g * (C @ S)) plus sensor noise, rounded to uint8.

    Args:
        haem, eosin: float32 (N, H, W) optical densities.
        stains: (N, 2, 3) unit OD vectors per image (rows: first stain, second stain).
        io: (N,) illumination (0..255).
        noise: float32 (N, H, W, 3) additive intensity noise (0 for none).
        od_gain: float32 per-channel OD gain g, broadcastable to (N, H, W, 3) (see `_match_mean_colour`).

    Returns:
        uint8 (N, H, W, 3) RGB.
    """
    stains = stains.astype(np.float32)[:, None, None]
    od = (haem[..., None] * stains[..., 0, :] + eosin[..., None] * stains[..., 1, :]) * od_gain
    rgb = io.astype(np.float32)[:, None, None, None] * np.exp(-od) + noise
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# PatchCamelyon
# ---------------------------------------------------------------------------------------------------
def _pcam_regions(rng: np.random.Generator, want_tumour: np.ndarray, periphery_tumour: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Region maps for PCam patches: lymph node, stroma bands, glass, and carcinoma nests.

    Args:
        rng: random generator.
        want_tumour: bool (N,) patches that get a carcinoma nest over their centre.
        periphery_tumour: bool (N,) patches that get carcinoma only away from the centre 32 x 32.

    Returns:
        region uint8 (N, S, S) and cellularity float32 (N, S, S), S = 96 + 2 * margin.
    """
    n = want_tumour.size
    side = PATCH_PX + 2 * PCAM_MARGIN_PX
    shape = (n, side, side)
    grid_y, grid_x = np.mgrid[0:side, 0:side].astype(np.float32) - (side - 1) / 2
    region = np.full(shape, NODE, np.uint8)
    # Trabeculae and vessel walls: zero crossings of a smooth field, in about half of the patches.
    band_width = np.where(rng.random(n) < 0.5, rng.uniform(0.05, 0.25, n), 0).astype(np.float32)
    region[np.abs(_smooth_noise(rng, shape, 9.0)) < band_width[:, None, None]] = STROMA

    # Carcinoma: a smooth field plus a Gaussian bump at the nest's centre, thresholded; nests are split
    # by thin stroma septa and rimmed by desmoplastic stroma.
    centre_r = CENTRE_PX / 2 - 2
    peripheral_r = PATCH_PX / 2 - 6
    angle = rng.uniform(0, 2 * np.pi, n)
    offset = np.where(periphery_tumour[:, None], peripheral_r, rng.uniform(0, centre_r, (n, 1))) * np.column_stack(
        [np.sin(angle), np.cos(angle)])
    spread = np.where(periphery_tumour, rng.uniform(8, 14, n), rng.uniform(18, 45, n)).astype(np.float32)
    dist2 = (grid_y - offset[:, 0, None, None]) ** 2 + (grid_x - offset[:, 1, None, None]) ** 2
    nest_field = 0.5 * _smooth_noise(rng, shape, 10.0) + 2.0 * np.exp(-dist2 / (2 * spread[:, None, None] ** 2))
    nest = nest_field > 1.0
    rim = (nest_field > 0.8) & ~nest
    septa = np.abs(_smooth_noise(rng, shape, 7.0)) < 0.08
    has_tumour = (want_tumour | periphery_tumour)[:, None, None]
    region[has_tumour & rim] = STROMA
    region[has_tumour & nest & ~septa] = CARCINOMA
    region[has_tumour & nest & septa] = STROMA
    # The core of the nest is solid, so a positive always has tumour inside its centre 32 x 32 and a
    # peripheral nest never reaches it.
    region[want_tumour[:, None, None] & (dist2 < 36)] = CARCINOMA
    central = (np.abs(grid_y) < CENTRE_PX / 2 + 6) & (np.abs(grid_x) < CENTRE_PX / 2 + 6)
    region[periphery_tumour[:, None, None] & central & (region == CARCINOMA)] = NODE

    # Glass (tissue edge, fat) in about a third of the patches, never over the centre, in both classes.
    glass_level = np.where(rng.random(n) < 0.3, rng.uniform(0.8, 1.8, n), np.inf).astype(np.float32)
    region[(_smooth_noise(rng, shape, 14.0) > glass_level[:, None, None]) & ~central] = GLASS
    cellularity = np.clip(0.8 + 0.2 * _smooth_noise(rng, shape, 12.0), 0.5, 1.0)
    return region, cellularity


def _render_pcam_chunk(rng: np.random.Generator, labels: np.ndarray, periphery: np.ndarray, stains: np.ndarray,
                       io: np.ndarray, target_od: np.ndarray, junk: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one batch of PCam patches.

    Args:
        rng: random generator.
        labels: uint8 (N,) planned labels (1: tumour over the centre).
        periphery: bool (N,) negatives with carcinoma away from the centre.
        stains: (N, 2, 3) H&E stain matrices; io: (N,) illumination; target_od: (N, 2) mean H and E OD.
        junk: int (N,) 0 regular, 1 blank glass, 2 IHC (DAB instead of eosin), 3 blurred.

    Returns:
        x uint8 (N, 96, 96, 3) RGB, tumour_any bool (N,), tumour_centre bool (N,).
    """
    region, cellularity = _pcam_regions(rng, labels == 1, periphery)
    region[junk == 1] = GLASS
    haem, eosin = _render_od(region, cellularity, rng)
    crop = np.s_[:, PCAM_MARGIN_PX:PCAM_MARGIN_PX + PATCH_PX, PCAM_MARGIN_PX:PCAM_MARGIN_PX + PATCH_PX]
    region, haem, eosin = region[crop], np.ascontiguousarray(haem[crop]), np.ascontiguousarray(eosin[crop])
    gain = _match_mean_colour(haem, eosin, region != GLASS, stains, target_od)

    ihc = junk == 2
    stains = stains.copy()
    stains[ihc, 1] = _DAB
    # IHC: a light hematoxylin counterstain and brown DAB where eosin (cytoplasm, stroma) was.
    haem[ihc] *= 0.3
    eosin[ihc] = 1.8 * eosin[ihc] + 0.8 * haem[ihc]
    noise = 1.5 * rng.standard_normal(haem.shape + (3,), dtype=np.float32)
    gain[ihc] = 1
    x = _to_rgb(haem, eosin, stains, io, noise, gain[:, None, None, :])
    blur = junk == 3
    x[blur] = ndimage.gaussian_filter(x[blur], (0, 3.5, 3.5, 0))
    c0, c1 = (PATCH_PX - CENTRE_PX) // 2, (PATCH_PX + CENTRE_PX) // 2
    tumour = region == CARCINOMA
    return x, tumour.any(axis=(1, 2)), tumour[:, c0:c1, c0:c1].any(axis=(1, 2))


def _check_pcam_args(n_per_split: dict, junk_fraction: float) -> None:
    if set(n_per_split) != set(SPLITS):
        raise DemoError(f"demo pcam_per_split must name exactly {', '.join(SPLITS)}; got {sorted(n_per_split)}")
    for split, n in n_per_split.items():
        if not isinstance(n, int | np.integer) or n < 2:
            raise DemoError(f"demo pcam_per_split.{split} = {n!r}: need an integer >= 2 (both labels)")
    if not 0 <= junk_fraction <= 0.5:
        raise DemoError(f"demo junk_fraction = {junk_fraction!r}: need a number in [0, 0.5]")


def _write_h5(path: Path, key: str, data: np.ndarray, gzip_file: bool) -> Path:
    """Write one official-layout HDF5 file (uncompressed dataset), whole-file gzipped if asked."""
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset(key, data=data)
    if not gzip_file:
        os.replace(tmp, path)
        return path
    gz_path = path.with_name(path.name + ".gz")
    gz_tmp = gz_path.with_name(gz_path.name + ".tmp")
    # mtime=0 and no stored name: the same data gives the same bytes.
    with open(tmp, "rb") as src, open(gz_tmp, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    tmp.unlink()
    os.replace(gz_tmp, gz_path)
    return gz_path


def write_demo_pcam(pcam_dir: Path, n_per_split: dict[str, int], seed: int, junk_fraction: float = 0.06,
                    gzip_files: bool = False) -> dict:
    """Write a synthetic PatchCamelyon in the official file layout.

    Labels are ~50/50; a positive has carcinoma in its centre 32 x 32 px (the PCam rule), and a few
    negatives have carcinoma only outside it (`tumor_patch` True, `center_tumor_patch` False). Patches
    come from several fake slides (`wsi`) per split, no slide in two splits, each slide with its own
    stain jitter. `junk_fraction` of every split, spread over both labels, is junk: blank glass, brown
    IHC-like tissue or blurred tissue; their indices go to `demo_junk.csv` (`split,index,kind`).

    Args:
        pcam_dir: output folder (created).
        n_per_split: patches per split, keys exactly train, valid, test, each >= 2.
        seed: the one seed; each split has its own stream, so a split's content does not depend on the
            sizes of the others.
        junk_fraction: fraction of each split that is junk, in [0, 0.5].
        gzip_files: write `.h5.gz` (whole file gzipped, as distributed) instead of `.h5`.

    Returns:
        dict: `files` (paths written), `junk_csv` (path), `counts` {split: {n, positive, junk}}.

    Raises:
        DemoError: bad sizes or junk fraction.
    """
    _check_pcam_args(n_per_split, junk_fraction)
    pcam_dir = Path(pcam_dir)
    pcam_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    junk_rows_csv: list[tuple[str, int, str]] = []
    counts: dict[str, dict[str, int]] = {}
    next_slide = {"normal": 1, "tumor": 1, "test": 1}
    for split_no, split in enumerate(SPLITS):
        n = int(n_per_split[split])
        rng = np.random.default_rng([seed, 101, split_no])
        labels = np.zeros(n, np.uint8)
        labels[rng.permutation(n)[: n // 2]] = 1

        # Fake slides: tumour slides give positives and negatives, normal slides negatives only.
        n_slides = int(np.clip(round(n / 40), 2, 40))
        n_tumour_slides = max(1, n_slides // 2)
        kinds = ["tumor"] * n_tumour_slides + ["normal"] * (n_slides - n_tumour_slides)
        names = []
        for kind in kinds:
            key = "test" if split == "test" else kind
            prefix = "camelyon16_test" if split == "test" else f"camelyon16_train_{kind}"
            names.append(f"{prefix}_{next_slide[key]:03d}")
            next_slide[key] += 1
        # Half the negatives come from tumour slides, so that no slide's colour stands for a label;
        # slides differ less in colour than patches do (stain amounts vary most from patch to patch).
        from_tumour_slide = (labels == 1) | (rng.random(n) < 0.5)
        slide = np.where(from_tumour_slide, rng.integers(0, n_tumour_slides, n),
                         rng.integers(n_tumour_slides, max(n_slides, n_tumour_slides + 1), n)) % n_slides
        slide_stains = _jitter_stains(rng, _PCAM_STAINS, n_slides, 0.015)
        slide_io = rng.uniform(242, 247, n_slides)
        slide_od = rng.uniform([0.49, 0.28], [0.55, 0.32], (n_slides, 2))
        target_od = slide_od[slide] * rng.lognormal(0, 0.2, (n, 2))
        periphery = (labels == 0) & (rng.random(n) < 0.04)

        n_junk = int(round(junk_fraction * n))
        junk = np.zeros(n, np.int64)
        junk_rows = rng.permutation(n)[:n_junk]
        junk[junk_rows] = np.arange(n_junk) % 3 + 1
        junk_rows_csv += [(split, int(i), JUNK_KINDS[junk[i] - 1]) for i in np.flatnonzero(junk)]

        x = np.empty((n, PATCH_PX, PATCH_PX, 3), np.uint8)
        tumour_any = np.zeros(n, bool)
        tumour_centre = np.zeros(n, bool)
        chunk = max(1, CHUNK_PX // (PATCH_PX + 2 * PCAM_MARGIN_PX) ** 2)
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            x[part], tumour_any[part], tumour_centre[part] = _render_pcam_chunk(
                rng, labels[part], periphery[part], slide_stains[slide[part]], slide_io[slide[part]],
                target_od[part], junk[part])
        # Blank glass keeps its planned label (junk spans both labels); the CSV flags follow y.
        blank = junk == 1
        tumour_centre[blank] = labels[blank] == 1
        tumour_any |= tumour_centre
        if not np.array_equal(tumour_centre, labels == 1):
            raise RuntimeError("demo PCam: rendered tumour masks disagree with the planned labels")

        stem = pcam_dir / f"{PCAM_PREFIX}{split}"
        files.append(_write_h5(stem.with_name(stem.name + "_x.h5"), "x", x, gzip_files))
        files.append(_write_h5(stem.with_name(stem.name + "_y.h5"), "y", labels.reshape(n, 1, 1, 1), gzip_files))
        coords = rng.integers(0, 3000, (n, 2)) * 32  # level-0 px on the fake slide, like PCam's
        meta_path = stem.with_name(stem.name + "_meta.csv")
        with open(meta_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(PCAM_META_HEADER)
            writer.writerows(zip(range(n), coords[:, 0].tolist(), coords[:, 1].tolist(),
                                 map(str, tumour_any.tolist()), map(str, tumour_centre.tolist()),
                                 (names[s] for s in slide), strict=True))
        files.append(meta_path)
        counts[split] = {"n": n, "positive": int(labels.sum()), "junk": n_junk}
    junk_csv = pcam_dir / "demo_junk.csv"
    with open(junk_csv, "w", newline="") as f:
        csv.writer(f).writerows([("split", "index", "kind"), *junk_rows_csv])
    return {"files": files, "junk_csv": junk_csv, "counts": counts}


# ---------------------------------------------------------------------------------------------------
# DLBCL-Morph
# ---------------------------------------------------------------------------------------------------
def _roi_boxes(rng: np.random.Generator, core_radius_px: float, n_boxes: int) -> np.ndarray:
    """ROI boxes inside a core, relative to its centre (render px).

    One box is a large rectangle inscribed in 0.93 of the core radius; two boxes split such a
    rectangle across its longer side with a gap.

    Returns:
        float (n_boxes, 4) as (xs, ys, xe, ye), (xs, ys) top-left.
    """
    if n_boxes == 0:
        return np.zeros((0, 4))
    reach = 0.93 * core_radius_px
    half_w = reach * rng.uniform(0.55, 0.75)
    half_h = np.sqrt(reach ** 2 - half_w ** 2) * rng.uniform(0.8, 1.0)
    if rng.random() < 0.5:
        half_w, half_h = half_h, half_w
    boxes = np.array([[-half_w, -half_h, half_w, half_h]])
    if n_boxes == 2:
        gap = 0.06 * core_radius_px
        if half_w >= half_h:
            boxes = np.array([[-half_w, -half_h, -gap, half_h], [gap, -half_h, half_w, half_h]])
        else:
            boxes = np.array([[-half_w, -half_h, half_w, -gap], [-half_w, gap, half_w, half_h]])
    return boxes


def _render_cores(rng: np.random.Generator, radii_px: np.ndarray, boxes: list[np.ndarray], side_px: int,
                  stains: np.ndarray, io: float) -> np.ndarray:
    """Render TMA cores (render scale) on glass: normal lymph node with lymphoma inside the ROI boxes.

    Args:
        rng: random generator.
        radii_px: float (K,) core radii.
        boxes: K arrays (B, 4) of ROI boxes relative to the core centre.
        side_px: canvas side; every core is centred in its canvas.
        stains: (2, 3) the slide's stain matrix; io: the slide's illumination.

    Returns:
        uint8 (K, side_px, side_px, 3) RGB.
    """
    k = radii_px.size
    shape = (k, side_px, side_px)
    grid_y, grid_x = np.mgrid[0:side_px, 0:side_px].astype(np.float32) - (side_px - 1) / 2
    angle = np.arctan2(grid_y, grid_x)
    # A slightly irregular round edge: cos(m angle + phase) expanded, so only (H, W) trigonometry.
    edge = np.ones(shape, np.float32)
    for m, amplitude in ((3, 0.02), (5, 0.015)):
        phase = rng.uniform(0, 2 * np.pi, (k, 1, 1)).astype(np.float32)
        edge += amplitude * (np.cos(m * angle) * np.cos(phase) - np.sin(m * angle) * np.sin(phase))
    edge *= radii_px.astype(np.float32)[:, None, None]
    core = np.hypot(grid_y, grid_x) < edge
    region = np.where(core, NODE, GLASS).astype(np.uint8)
    region[core & (np.abs(_smooth_noise(rng, shape, 12.0)) < 0.12)] = STROMA
    region[core & (_smooth_noise(rng, shape, 10.0) > 2.3)] = GLASS  # small tears and fat vacuoles
    roi = np.zeros(shape, bool)
    for i, core_boxes in enumerate(boxes):
        for xs, ys, xe, ye in core_boxes:
            roi[i] |= (grid_x >= xs) & (grid_x < xe) & (grid_y >= ys) & (grid_y < ye)
    region[roi & (region == NODE)] = LYMPHOMA
    cellularity = np.clip(0.82 + 0.18 * _smooth_noise(rng, shape, 20.0), 0.5, 1.0)
    haem, eosin = _render_od(region, cellularity, rng)

    # Colour: ROI and the rest of each core get the same mean H and E (the core's own amounts), then a
    # smooth staining-unevenness field varies both independently of the class.
    tissue = region != GLASS
    outside = tissue & ~roi
    core_od = rng.uniform([0.80, 0.40], [0.95, 0.50], (k, 2)) * rng.lognormal(0, 0.06, (k, 2))
    stains = np.broadcast_to(stains, (k, 2, 3))
    gain_outside = _match_mean_colour(haem, eosin, outside, stains, core_od)
    gain_roi = _match_mean_colour(haem, eosin, tissue & roi, stains, core_od)
    gain = np.where(roi[..., None], gain_roi[:, None, None], gain_outside[:, None, None])
    haem *= np.exp(0.10 * _smooth_noise(rng, shape, 60.0))
    eosin *= np.exp(0.10 * _smooth_noise(rng, shape, 60.0))
    # Sensor noise on tissue only: glass stays one flat colour, like the slide background around it.
    noise = 1.5 * rng.standard_normal(shape + (3,), dtype=np.float32) * tissue[..., None]
    return _to_rgb(haem, eosin, stains, np.full(k, io), noise, gain)


def _write_pyramid(path: Path, level0: np.ndarray, slide_mpp: float) -> None:
    """Write a tiled pyramidal TIFF (downsamples 1, 4, 16; zlib tiles; resolution tags in px/cm)."""
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp) as tif:
        for i, down in enumerate(SLIDE_DOWNSAMPLES):
            level = level0 if down == 1 else cv2.resize(
                level0, (level0.shape[1] // down, level0.shape[0] // down), interpolation=cv2.INTER_AREA)
            px_per_cm = 1e4 / (slide_mpp * down)
            tif.write(level, photometric="rgb", tile=(SLIDE_TILE_PX, SLIDE_TILE_PX), compression="zlib",
                      compressionargs={"level": 1}, resolution=(px_per_cm, px_per_cm),
                      resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1, maxworkers=2)
    os.replace(tmp, path)


def _check_slide(path: Path, slide_mpp: float) -> None:
    """Fail loudly if OpenSlide does not read the slide as a pyramid with the written mpp."""
    with openslide.OpenSlide(path) as slide:
        mpp = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
        if slide.level_count < 2 or not abs(mpp - slide_mpp) <= 1e-3:
            raise RuntimeError(f"demo slide {path}: OpenSlide sees {slide.level_count} levels, mpp {mpp}")


@dataclass(frozen=True)
class _SlideJob:
    """Everything one worker needs to write one TMA slide."""

    path: Path
    seed: int
    slide_no: int
    patients: tuple[int, ...]  # patient id of each core
    slide_mpp: float
    width_px: int
    height_px: int
    n_cols: int
    pitch_px: int
    margin_px: int


def _write_slide(job: _SlideJob) -> list[list]:
    """Render, write and check one TMA slide; return its annotation rows (H&E boxes, then 2 CD10 rows)."""
    rng = np.random.default_rng([job.seed, 203, job.slide_no])
    tma_id = job.path.stem
    n_cores = len(job.patients)
    scale = RENDER_MPP / job.slide_mpp  # level-0 px per render px
    stains = _jitter_stains(rng, _DLBCL_STAINS, 1, 0.04)[0]
    io = rng.uniform(236, 246)
    radii = rng.uniform(*CORE_RADIUS_UM, n_cores) / RENDER_MPP
    n_boxes = rng.choice([0, 1, 1, 2], n_cores)
    n_boxes[0] = max(1, n_boxes[0])  # every slide has lymphoma
    boxes = [_roi_boxes(rng, r, int(b)) for r, b in zip(radii, n_boxes, strict=True)]
    level0 = np.full((job.height_px, job.width_px, 3), int(np.clip(np.rint(io), 0, 255)), np.uint8)
    side = int(np.ceil(2 * radii.max() + 8))
    side_level0 = round(side * scale)
    centre = (side - 1) / 2
    rows = []
    cores_per_chunk = max(1, CHUNK_PX // side ** 2)
    for start in range(0, n_cores, cores_per_chunk):
        part = slice(start, min(n_cores, start + cores_per_chunk))
        rgb = _render_cores(rng, radii[part], boxes[part], side, stains, io)
        for j, core_rgb in enumerate(rgb, start=start):
            row, col = divmod(j, job.n_cols)
            top = job.margin_px + row * job.pitch_px + int(rng.integers(0, job.pitch_px - side_level0 + 1))
            left = job.margin_px + col * job.pitch_px + int(rng.integers(0, job.pitch_px - side_level0 + 1))
            level0[top:top + side_level0, left:left + side_level0] = cv2.resize(
                core_rgb, (side_level0, side_level0), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
            # Render px -> level-0 px, rounded inwards so that a box stays inside the lymphoma.
            first = np.ceil((boxes[j][:, :2] + centre + 0.5) * scale).astype(int) + (left, top)
            last = np.floor((boxes[j][:, 2:] + centre + 0.5) * scale).astype(int) + (left, top)
            rows.extend([job.patients[j], tma_id, "HE", *a.tolist(), *b.tolist()]
                        for a, b in zip(first, last, strict=True))
    # Another stain's boxes for the same TMA: no CD10 slide exists, the reader must filter by stain.
    rows.extend([r[0], tma_id, "CD10", r[3] + 40, r[4] + 40, r[5] + 40, r[6] + 40] for r in rows[:2])
    _write_pyramid(job.path, level0, job.slide_mpp)
    _check_slide(job.path, job.slide_mpp)
    return rows


def write_demo_dlbcl(dlbcl_dir: Path, n_slides: int, cores_per_slide: int, seed: int, slide_mpp: float = 0.5,
                     n_patients: int | None = None, workers: int | None = None) -> dict:
    """Write a synthetic DLBCL-Morph: H&E TMA slides and `annotations.csv`.

    Each slide holds `cores_per_slide` round cores (diameter 0.85-1.05 mm) on glass in a grid. Each
    core belongs to one patient (patients may have several cores, on any slide) and has 0, 1 or 2 ROI
    boxes (the first core of a slide always has one); lymphoma is rendered inside the boxes and normal
    lymph node elsewhere. Tissue is drawn at 0.972 um/px and resized to `slide_mpp`. Each slide's H&E
    rows are followed by two rows of another stain (CD10) for the same TMA id; no CD10 slide is
    written, so a reader must filter by the stain column.

    Args:
        dlbcl_dir: output folder; writes `TMA/annotations.csv` and `TMA/HE/<tma_id>.svs`.
        n_slides: number of H&E slides (>= 1), named TA101, TA102, ...
        cores_per_slide: cores per slide (>= 1).
        seed: the one seed; each slide has its own stream (results do not depend on `workers`).
        slide_mpp: level-0 resolution in um/px (written to the TIFF resolution tags).
        n_patients: distinct patients (<= number of cores); default three quarters of the cores.
        workers: processes writing slides in parallel; default min(n_slides, CPU count). They are
            spawned, so a calling script needs the usual `if __name__ == "__main__":` guard.

    Returns:
        dict: `annotations` (path), `slides` (paths), `n_cores`, `n_patients`, `n_roi` (H&E boxes).

    Raises:
        DemoError: bad counts or mpp.
    """
    n_cores = n_slides * cores_per_slide
    if n_slides < 1 or cores_per_slide < 1:
        raise DemoError(f"demo dlbcl: need >= 1 slide and >= 1 core per slide, got {n_slides} x {cores_per_slide}")
    if not 0.05 <= slide_mpp <= 5:
        raise DemoError(f"demo dlbcl slide_mpp = {slide_mpp!r}: need um/px in [0.05, 5]")
    n_patients = max(1, (3 * n_cores) // 4) if n_patients is None else n_patients
    if not 1 <= n_patients <= n_cores:
        raise DemoError(f"demo dlbcl n_patients = {n_patients}: need 1..{n_cores} (one core at least each)")
    dlbcl_dir = Path(dlbcl_dir)
    he_dir = dlbcl_dir / "TMA" / "HE"
    he_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng([seed, 202])
    patient_ids = rng.choice(np.arange(10000, 100000), n_patients, replace=False)
    core_patient = np.concatenate([np.arange(n_patients), rng.integers(0, n_patients, n_cores - n_patients)])
    core_patient = patient_ids[rng.permutation(core_patient)].reshape(n_slides, cores_per_slide)

    # Layout: a grid of square canvases (the largest core plus a rim) 0.1 mm apart, 0.15 mm margin,
    # slide sides multiples of 16 so that the pyramid's downsamples are exact.
    canvas_level0 = round(int(np.ceil(2 * CORE_RADIUS_UM[1] / RENDER_MPP + 8)) * RENDER_MPP / slide_mpp)
    pitch = canvas_level0 + int(0.1e3 / slide_mpp)
    n_cols = int(np.ceil(np.sqrt(cores_per_slide * 1.5)))
    n_rows = int(np.ceil(cores_per_slide / n_cols))
    margin = int(0.15e3 / slide_mpp)
    step = SLIDE_DOWNSAMPLES[-1]
    width = -(-(2 * margin + n_cols * pitch) // step) * step
    height = -(-(2 * margin + n_rows * pitch) // step) * step
    jobs = [_SlideJob(he_dir / f"TA{101 + i}.svs", seed, i, tuple(int(p) for p in core_patient[i]), slide_mpp,
                      width, height, n_cols, pitch, margin) for i in range(n_slides)]
    workers = min(n_slides, os.cpu_count() or 1) if workers is None else max(1, workers)
    if workers == 1:
        slide_rows = [_write_slide(job) for job in jobs]
    else:
        # Spawned processes: safe with OpenCV's and tifffile's threads, unlike fork.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            slide_rows = list(pool.map(_write_slide, jobs))
    rows = [row for part in slide_rows for row in part]

    annotations = dlbcl_dir / "TMA" / "annotations.csv"
    with open(annotations, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DLBCL_HEADER)
        writer.writerows(rows)
    return {"annotations": annotations, "slides": [job.path for job in jobs], "n_cores": n_cores,
            "n_patients": n_patients, "n_roi": sum(r[2] == "HE" for r in rows)}


def write_demo(out_dir: Path, seed: int, pcam_per_split: dict[str, int], dlbcl_slides: int,
               dlbcl_cores_per_slide: int) -> dict:
    """Write the whole demo: PCam into `out_dir/pcam`, DLBCL-Morph into `out_dir/dlbcl`.

    Returns:
        dict: {"pcam": write_demo_pcam's result, "dlbcl": write_demo_dlbcl's result}.
    """
    out_dir = Path(out_dir)
    return {"pcam": write_demo_pcam(out_dir / "pcam", pcam_per_split, seed),
            "dlbcl": write_demo_dlbcl(out_dir / "dlbcl", dlbcl_slides, dlbcl_cores_per_slide, seed)}


def main(argv: list[str] | None = None) -> int:
    """`python -m common.demo [--config FILE] [--set key=value]...`: write the demo into demo.out_dir."""
    from common.cli import parse
    from common.config import load_config

    args = parse(argv, __doc__)
    cfg = load_config(args.config, args.overrides)
    demo = cfg["demo"]
    out_dir = Path(demo["out_dir"])
    print(f"== demo data | seed {cfg['run']['seed']} | output {out_dir}")
    result = write_demo(out_dir, cfg["run"]["seed"], demo["pcam_per_split"], demo["dlbcl_slides"],
                        demo["dlbcl_cores_per_slide"])
    for split, count in result["pcam"]["counts"].items():
        print(f"   pcam {split}: {count['n']} patches, {count['positive']} positive, {count['junk']} junk")
    dlbcl = result["dlbcl"]
    print(f"   dlbcl: {len(dlbcl['slides'])} slides, {dlbcl['n_cores']} cores, {dlbcl['n_patients']} patients, "
          f"{dlbcl['n_roi']} H&E ROI boxes")
    return 0


if __name__ == "__main__":
    from common.cli import run

    sys.exit(run(main))
