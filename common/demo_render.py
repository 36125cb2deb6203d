"""Rendering of the synthetic demo tissue (written to disk in the real formats by ``common.demo``).

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
`match_mean_colour`); per-patch amounts vary more than per-slide ones, so no slide's colour stands
for a label. The two sources use different stain matrices and intensities, jittered per slide, so
stain normalisation has work to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

RENDER_MPP = 0.972  # um/px: PCam's scale (Camelyon16 at 40x undersampled to 10x); all tissue drawn at it
PATCH_PX = 96  # PCam patch side
CENTRE_PX = 32  # PCam label region: positive iff tumour in the centre 32 x 32
PCAM_MARGIN_PX = 8  # drawn around each patch so that nuclei at its edges are cut, not missing
CORE_RADIUS_UM = (425.0, 525.0)  # TMA cores 0.85-1.05 mm across
# Stain matrices, rows hematoxylin then eosin (unit OD vectors, R G B). PCam: the Macenko reference
# vectors (a purple-pink Camelyon-like stain); DLBCL: close to Ruifrok & Johnston's (bluer H, magenta E).
PCAM_STAINS = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
DLBCL_STAINS = np.array([[0.62, 0.72, 0.31], [0.09, 0.96, 0.26]])
DAB = np.array([0.268, 0.570, 0.776])  # Ruifrok & Johnston's diaminobenzidine (brown)


CHUNK_PX = 3_500_000  # pixels drawn per batch: ~25 float32 temporaries of this size stay < 0.5 GB


# Tissue region codes of the label maps the renderer draws from.
GLASS, NODE, STROMA, CARCINOMA, LYMPHOMA = range(5)


# Background (between-cell) optical densities per region: (hematoxylin, eosin).
_BACKGROUND_OD = np.array([[0.0, 0.0], [0.05, 0.20], [0.03, 0.50], [0.04, 0.18], [0.06, 0.20]], np.float32)


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


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_px: float | tuple[float, float]
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


def place_nuclei(region: np.ndarray, cellularity: np.ndarray, rng: np.random.Generator) -> dict:
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


def render_od(region: np.ndarray, cellularity: np.ndarray, rng: np.random.Generator
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
    cells = place_nuclei(region, cellularity, rng)
    is_tissue = region != GLASS
    tissue = cv2.GaussianBlur(is_tissue.astype(np.float32).reshape(n_img * height, width), (0, 0), 0.7
                              ).reshape(region.shape)
    haem, eosin = _BACKGROUND_OD[:, 0][region], _BACKGROUND_OD[:, 1][region]
    # Stroma is fibrous: anisotropic noise, along x or y per image (the canvases are square);
    # elsewhere the eosin is mottled by the same fine noise that textures cytoplasm.
    fibres = smooth_noise(rng, region.shape, (0.8, 5.0))
    turn = rng.random(n_img) < 0.5
    fibres[turn] = fibres[turn].transpose(0, 2, 1)
    mottle = smooth_noise(rng, region.shape, 1.5)
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
    granules = 1 + 0.25 * smooth_noise(rng, region.shape, 0.8).ravel()[at]
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


def match_mean_colour(haem: np.ndarray, eosin: np.ndarray, mask: np.ndarray, stains: np.ndarray,
                       target_od: np.ndarray, n_iter: int = 4) -> np.ndarray:
    """Make the mean colour over `mask` of each image a fixed target, whatever its texture.

    The target is the colour of a uniform layer holding `target_od` of each stain. Matching the mean
    *intensity*, not the mean OD, is what keeps the class out of the colour: at equal mean OD, dark
    nuclei on a pale background look brighter than uniform tissue (exp is convex), and by a different
    amount in each channel. Two steps, each a fixed-point iteration:
    1. scale the H and E maps (in place) so that the least-squares H and E unmixing of the mean
       apparent OD hits the target;
    2. per-channel OD gains (returned, for `to_rgb`) that remove the residual the two stains
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


def jitter_stains(rng: np.random.Generator, stains: np.ndarray, n: int, sd: float) -> np.ndarray:
    """Perturb a (2, 3) stain matrix n times (Gaussian noise on the OD vectors, rows renormalised).

    Returns:
        float64 (n, 2, 3) unit-row stain matrices.
    """
    jittered = np.clip(stains[None] + rng.normal(0, sd, (n, 2, 3)), 0.02, None)
    return jittered / np.linalg.norm(jittered, axis=2, keepdims=True)


def to_rgb(haem: np.ndarray, eosin: np.ndarray, stains: np.ndarray, io: np.ndarray, noise: np.ndarray,
            od_gain: np.ndarray) -> np.ndarray:
    """Beer-Lambert: I = Io * exp(-g * (C @ S)) plus sensor noise, rounded to uint8.

    Args:
        haem, eosin: float32 (N, H, W) optical densities.
        stains: (N, 2, 3) unit OD vectors per image (rows: first stain, second stain).
        io: (N,) illumination (0..255).
        noise: float32 (N, H, W, 3) additive intensity noise (0 for none).
        od_gain: float32 per-channel OD gain g, broadcastable to (N, H, W, 3) (see `match_mean_colour`).

    Returns:
        uint8 (N, H, W, 3) RGB.
    """
    stains = stains.astype(np.float32)[:, None, None]
    od = (haem[..., None] * stains[..., 0, :] + eosin[..., None] * stains[..., 1, :]) * od_gain
    rgb = io.astype(np.float32)[:, None, None, None] * np.exp(-od) + noise
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def pcam_regions(rng: np.random.Generator, want_tumour: np.ndarray, periphery_tumour: np.ndarray
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
    region[np.abs(smooth_noise(rng, shape, 9.0)) < band_width[:, None, None]] = STROMA

    # Carcinoma: a smooth field plus a Gaussian bump at the nest's centre, thresholded; nests are split
    # by thin stroma septa and rimmed by desmoplastic stroma.
    centre_r = CENTRE_PX / 2 - 2
    peripheral_r = PATCH_PX / 2 - 6
    angle = rng.uniform(0, 2 * np.pi, n)
    offset = np.where(periphery_tumour[:, None], peripheral_r, rng.uniform(0, centre_r, (n, 1))) * np.column_stack(
        [np.sin(angle), np.cos(angle)])
    spread = np.where(periphery_tumour, rng.uniform(8, 14, n), rng.uniform(18, 45, n)).astype(np.float32)
    dist2 = (grid_y - offset[:, 0, None, None]) ** 2 + (grid_x - offset[:, 1, None, None]) ** 2
    nest_field = 0.5 * smooth_noise(rng, shape, 10.0) + 2.0 * np.exp(-dist2 / (2 * spread[:, None, None] ** 2))
    nest = nest_field > 1.0
    rim = (nest_field > 0.8) & ~nest
    septa = np.abs(smooth_noise(rng, shape, 7.0)) < 0.08
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
    region[(smooth_noise(rng, shape, 14.0) > glass_level[:, None, None]) & ~central] = GLASS
    cellularity = np.clip(0.8 + 0.2 * smooth_noise(rng, shape, 12.0), 0.5, 1.0)
    return region, cellularity


def render_pcam_chunk(rng: np.random.Generator, labels: np.ndarray, periphery: np.ndarray, stains: np.ndarray,
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
    region, cellularity = pcam_regions(rng, labels == 1, periphery)
    region[junk == 1] = GLASS
    haem, eosin = render_od(region, cellularity, rng)
    crop = np.s_[:, PCAM_MARGIN_PX:PCAM_MARGIN_PX + PATCH_PX, PCAM_MARGIN_PX:PCAM_MARGIN_PX + PATCH_PX]
    region, haem, eosin = region[crop], np.ascontiguousarray(haem[crop]), np.ascontiguousarray(eosin[crop])
    gain = match_mean_colour(haem, eosin, region != GLASS, stains, target_od)

    ihc = junk == 2
    stains = stains.copy()
    stains[ihc, 1] = DAB
    # IHC: a light hematoxylin counterstain and brown DAB where eosin (cytoplasm, stroma) was.
    haem[ihc] *= 0.3
    eosin[ihc] = 1.8 * eosin[ihc] + 0.8 * haem[ihc]
    noise = 1.5 * rng.standard_normal(haem.shape + (3,), dtype=np.float32)
    gain[ihc] = 1
    x = to_rgb(haem, eosin, stains, io, noise, gain[:, None, None, :])
    blur = junk == 3
    x[blur] = ndimage.gaussian_filter(x[blur], (0, 3.5, 3.5, 0))
    c0, c1 = (PATCH_PX - CENTRE_PX) // 2, (PATCH_PX + CENTRE_PX) // 2
    tumour = region == CARCINOMA
    return x, tumour.any(axis=(1, 2)), tumour[:, c0:c1, c0:c1].any(axis=(1, 2))


def roi_boxes(rng: np.random.Generator, core_radius_px: float, n_boxes: int) -> np.ndarray:
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


def render_cores(rng: np.random.Generator, radii_px: np.ndarray, boxes: list[np.ndarray], side_px: int,
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
    region[core & (np.abs(smooth_noise(rng, shape, 12.0)) < 0.12)] = STROMA
    region[core & (smooth_noise(rng, shape, 10.0) > 2.3)] = GLASS  # small tears and fat vacuoles
    roi = np.zeros(shape, bool)
    for i, core_boxes in enumerate(boxes):
        for xs, ys, xe, ye in core_boxes:
            roi[i] |= (grid_x >= xs) & (grid_x < xe) & (grid_y >= ys) & (grid_y < ye)
    region[roi & (region == NODE)] = LYMPHOMA
    cellularity = np.clip(0.82 + 0.18 * smooth_noise(rng, shape, 20.0), 0.5, 1.0)
    haem, eosin = render_od(region, cellularity, rng)

    # Colour: ROI and the rest of each core get the same mean H and E (the core's own amounts), then a
    # smooth staining-unevenness field varies both independently of the class.
    tissue = region != GLASS
    outside = tissue & ~roi
    core_od = rng.uniform([0.80, 0.40], [0.95, 0.50], (k, 2)) * rng.lognormal(0, 0.06, (k, 2))
    stains = np.broadcast_to(stains, (k, 2, 3))
    gain_outside = match_mean_colour(haem, eosin, outside, stains, core_od)
    gain_roi = match_mean_colour(haem, eosin, tissue & roi, stains, core_od)
    gain = np.where(roi[..., None], gain_roi[:, None, None], gain_outside[:, None, None])
    haem *= np.exp(0.10 * smooth_noise(rng, shape, 60.0))
    eosin *= np.exp(0.10 * smooth_noise(rng, shape, 60.0))
    # Sensor noise on tissue only: glass stays one flat colour, like the slide background around it.
    noise = 1.5 * rng.standard_normal(shape + (3,), dtype=np.float32) * tissue[..., None]
    return to_rgb(haem, eosin, stains, np.full(k, io), noise, gain)
