"""Patch quality filters: mean hue, saturation and value (thesis §5.1.2), brown pixels, focus.

The thesis keeps a PatchCamelyon patch when, after a Gaussian blur, its mean HSV hue, saturation and
brightness fall in fixed ranges; the aim is to drop blank glass and the few IHC (brown DAB) patches so
that only H&E tissue remains. DLBCL-Morph tiles get the same test with looser limits. Means cannot see
two kinds of junk, so two per-pixel tests follow (both sources, ``patch_measures``):
- ``ihc_like``: IHC with a hematoxylin counterstain averages brown and blue to an H&E-like mean hue
  (~0.95), but its pixels hold DAB: the fraction of tissue pixels whose blue optical density exceeds
  0.8x their green one (``brown_fraction``; rules at ``TISSUE_OD``) is ~1 there and <= 0.34 on real
  H&E, so ``max_brown_fraction`` 0.45 separates them.
- ``out_of_focus``: blur leaves the means alone but removes fine detail: the variance of the grey
  image's Laplacian (``laplacian_variance``) is >= 0.0020 on every real tissue patch in tests/data and
  <= 0.0009 once blurred with sigma 2 px, so ``min_laplacian_var`` is 0.0014.

Inputs: uint8 RGB patches ``(N, H, W, 3)`` -- a numpy array or anything sliceable with ``.shape``
(e.g. an ``h5py`` dataset), read in chunks so memory stays bounded.
Outputs: per-patch measures ``float32 (N, 5)`` (``MEASURES``: hue, saturation, value on 0..1, brown
fraction, Laplacian variance), keep flags and the first failing reason per patch, and a brightness
summary of what was kept. Choosing thresholds (grid search, borderline patches) is ``common.filter_search``.

Scales. Saturation and value are HSV as OpenCV and ``colorsys`` define them, on 0..1. Hue is on 0..1
(0 red, 1/3 green, 2/3 blue) and circular; a patch's hue is the hue of its mean chroma vector, i.e. the
saturation-weighted circular mean, so near-grey pixels (whose hue is noise) do not vote and pink
(hue ~0.95) and red (~0.02) average to red rather than to green. A hue range ``(lo, hi)`` with
``lo > hi`` wraps through 0.

Thresholds. ``THESIS_PRESET`` is the thesis's published numbers: SATURATION [0.3, 0.4], BRIGHTNESS
[0.5, 0.8], HUE [0.5, 0.6]. The thesis does not say its hue scale; on the real H&E tiles in
``tests/data`` the linear mean of OpenCV's 8-bit hue (0..179, i.e. degrees / 2) divided by
255 -- the usual slip of scaling all three uint8 channels by 255 -- gives 0.49..0.65, which matches the
published [0.5, 0.6]; under that reading the range is 255..306 degrees, i.e. (0.708, 0.85) here (violet
to magenta), and that is what the preset holds. Taken literally it keeps 1.4 % of the real tissue
patches (the thesis averaged hue linearly, which pulls pink towards violet; saturation 0.3..0.4 drops
pale and dense tissue alike), so it is there for reproduction only.

``DEFAULT_THRESHOLDS`` does what the thesis meant, and was checked on real images (see
``tests/test_filters.py``): H&E hue sits between hematoxylin blue-violet and eosin pink-red, measured
0.69..0.96 on real tissue, while DAB brown sits at 0.05..0.07 and blank glass has mean saturation
<= 0.035 (real tissue >= 0.086, PCam patches with a few strands included). Hence a hue range from blue
(0.60) through violet to pink (0.975), a saturation floor of 0.06 between glass and the
palest tissue (the range stops at 0.975, short of red: IHC with a blue hematoxylin counterstain averages
to 0.98..0.035 -- brown plus blue -- as the demo's IHC patches show, and real tissue stays <= 0.96;
blood-filled patches, hue ~0.98, are the price), no brightness ceiling (pale tissue reaches V = 0.96,
as bright as glass) and a brightness floor of 0.25 that only drops near-black patches (ink, scanner
fill; real tissue >= 0.50). The same value range is the rule for DLBCL-Morph too (config.yaml checks it):
a ceiling on one source only makes brightness a cue for the source. Measured on 209 tissue, 57 glass,
209 DAB-restained (pure and counterstained) and 209 blurred (sigma 2 px) patches: keeps 100 % of
tissue, rejects 100 % of glass, of the brown, of the counterstained and of the blurred patches.
``DLBCL_QUALITY`` is the thesis's DLBCL-Morph rule: mean S > 0.07 and V < 0.8 (kept for reproduction).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from common.errors import UserError

REJECT_REASONS = ("low_saturation", "high_saturation", "low_value", "high_value", "ihc_like", "off_hue",
                  "out_of_focus")
# Columns of ``patch_measures``: the HSV means, then the two per-pixel tests.
MEASURES = ("hue", "saturation", "value", "brown_fraction", "laplacian_var")
# Threshold keys of ``filter_patches``, as they appear in a config section.
THRESHOLD_KEYS = ("hue_range", "saturation_range", "value_range", "max_brown_fraction", "min_laplacian_var",
                  "blur_sigma_px")

# Pixel rules of the colour test. Optical density OD = -ln((I + 1) / 256) per channel. A pixel is tissue
# when its OD summed over R, G and B exceeds TISSUE_OD (about mean RGB 230: glass and faint haze are
# left out of the fraction), and brown when its blue OD exceeds BROWN_BLUE_PER_GREEN_OD times its green
# OD: DAB absorbs blue most (Ruifrok's DAB vector has blue/green 1.37), hematoxylin and eosin absorb green
# most (Ruifrok H 0.41, E 0.11). On the real tissue in tests/data, 99 % of tissue pixels stay below 0.84;
# pixels holding DAB and up to an equal amount of hematoxylin lie above 0.84 (measured in the tests).
TISSUE_OD = 0.3
BROWN_BLUE_PER_GREEN_OD = 0.8
_TISSUE_PRODUCT = 256.0**3 * np.exp(-TISSUE_OD)
_LEVEL = (np.arange(256) + 1.0) / 256.0
# At green * 256 + blue: OD_B > k OD_G.
_BROWN_GB = (_LEVEL[None, :] < _LEVEL[:, None] ** BROWN_BLUE_PER_GREEN_OD).ravel()
# ITU-R BT.601 luma weights (OpenCV's RGB -> grey), for the focus test.
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32) / 255.0
# Patches per numpy block of the per-pixel tests: float32 OD of 256 patches of 96 px is 28 MB.
_PIXEL_BLOCK = 256

# Thesis hue read as OpenCV 8-bit hue / 255 (see the module docstring): h_ours = h_thesis * 510 / 360.
_THESIS_HUE_TO_TURNS = 510.0 / 360.0

THESIS_PRESET = {
    "hue_range": (0.5 * _THESIS_HUE_TO_TURNS, 0.6 * _THESIS_HUE_TO_TURNS),
    "saturation_range": (0.3, 0.4),
    "value_range": (0.5, 0.8),
    "blur_sigma_px": 1.0,
}

DEFAULT_THRESHOLDS = {
    "hue_range": (0.60, 0.975),
    "saturation_range": (0.06, None),
    "value_range": (0.25, None),
    "max_brown_fraction": 0.45,
    "min_laplacian_var": 0.0014,
    "blur_sigma_px": 1.0,
}

DLBCL_QUALITY = {
    "saturation_range": (0.07, None),
    "value_range": (None, 0.8),
    "hue_range": None,
}

# Pixels per OpenCV call: 8 patches of 96 px make float32 work buffers of ~1 MB, so that one step's
# input and output stay in a core's L2 cache (2 MB); 1024 patches ran 3x slower per patch, 1 or 2
# patches pay Python and call overhead.
_BLOCK_PX = 8 * 96 * 96


class FilterError(UserError):
    """A threshold or input given to the patch filters is invalid."""


def _check_patches(x) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4 or shape[3] != 3:
        raise FilterError(f"patches must have shape (N, H, W, 3), got {shape}")
    dtype = getattr(x, "dtype", None)
    if dtype is not None and np.dtype(dtype) != np.uint8:
        raise FilterError(f"patches must be uint8 RGB, got dtype {dtype}")


def _gaussian_ksize(blur_sigma_px: float) -> int:
    """Kernel size of ``cv2.GaussianBlur(img, (0, 0), sigma)`` on float images: cvRound(8 sigma + 1) | 1."""
    return int(round(blur_sigma_px * 8 + 1)) | 1


class _BlockMeans:
    """Reusable work buffers for the HSV sums of up to ``block`` patches of one shape.

    The pipeline per block, each step one OpenCV call over all its patches: reflect-101 padding of
    ``radius`` rows above and below each patch (uint8), so that patches stacked vertically into one
    image blur as if alone (left and right borders are the image's own); a separable Gaussian blur
    from uint8 to float32 with the 1/255 scale folded into the kernel; RGB -> HSV; hue and saturation
    copied into planes; the chroma vector (S cos H, S sin H) by ``cv2.polarToCart``; per-patch sums over
    the unpadded rows. Reusing the buffers keeps them in cache, which matters more than the arithmetic.
    """

    def __init__(self, block: int, height: int, width: int, blur_sigma_px: float):
        self.block, self.height, self.width = block, height, width
        if blur_sigma_px > 0:
            ksize = _gaussian_ksize(blur_sigma_px)
            kernel = cv2.getGaussianKernel(ksize, blur_sigma_px, cv2.CV_32F)
        else:
            ksize, kernel = 1, np.ones((1, 1), np.float32)
        self.radius = ksize // 2
        self.kernel_x = kernel * np.float32(1.0 / 255.0)
        self.kernel_y = kernel
        padded_h = height + 2 * self.radius
        self.padded = np.empty((block, padded_h, width, 3), np.uint8)
        self.blurred = np.empty((block * padded_h, width, 3), np.float32)
        self.hsv = np.empty_like(self.blurred)
        # Planes: hue (degrees), saturation, S cos H, S sin H.
        self.planes = np.empty((4, block * padded_h * width), np.float32)

    def sums(self, x: np.ndarray, out: np.ndarray) -> None:
        """Per-patch sums over the pixels of uint8 (n, H, W, 3) into float64 out (4, n): S cos H, S sin H, S, V."""
        n, h, w, r = len(x), self.height, self.width, self.radius
        padded = self.padded[:n]
        padded[:, r:r + h] = x
        if 0 < r < h - 1:
            padded[:, :r] = x[:, r:0:-1]
            padded[:, r + h:] = x[:, h - 2:h - 2 - r:-1]
        elif r > 0:
            # Radius beyond the patch: reflect repeatedly, as OpenCV's border does.
            padded[:] = np.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)), mode="reflect")
        rows = n * (h + 2 * r)
        blurred, hsv = self.blurred[:rows], self.hsv[:rows]
        cv2.sepFilter2D(padded.reshape(rows, w, 3), cv2.CV_32F, self.kernel_x, self.kernel_y, dst=blurred,
                        borderType=cv2.BORDER_REFLECT_101)
        cv2.cvtColor(blurred, cv2.COLOR_RGB2HSV, dst=hsv)
        size = rows * w
        hue, sat, chroma_x, chroma_y = self.planes[:, :size]
        cv2.mixChannels([hsv], [hue.reshape(rows, w), sat.reshape(rows, w)], [0, 0, 1, 1])
        cv2.polarToCart(sat, hue, x=chroma_x, y=chroma_y, angleInDegrees=True)
        inner = slice(r * w, (r + h) * w)
        out[:3] = self.planes[1:, :size].reshape(3, n, (h + 2 * r) * w)[:, :, inner].sum(axis=2)[[1, 2, 0]]
        out[3] = hsv.reshape(n, (h + 2 * r) * w, 3)[:, inner, 2].sum(axis=1)


def hsv_means(x, blur_sigma_px: float = 1.0, chunk_size: int = 4096) -> np.ndarray:
    """Per-patch mean hue, saturation and value after a Gaussian blur.

    Patches go through OpenCV in blocks of a few (see ``_BlockMeans``), on as many threads as OpenCV is
    set to use (``cv2.setNumThreads``); a patch's result depends only on its own pixels, not on the
    block, chunk or thread that computed it.

    Args:
        x: uint8 (N, H, W, 3) RGB; a numpy array or any sliceable with ``.shape`` (h5py dataset).
        blur_sigma_px: Gaussian sigma in pixels; the kernel and border are those of
            ``cv2.GaussianBlur(img, (0, 0), sigma)`` on float images (size cvRound(8 sigma + 1) | 1, i.e.
            radius ~4 sigma; reflect-101 border at each patch's own edges); 0 disables the blur.
        chunk_size: patches read from ``x`` at a time.

    Returns:
        float32 (N, 3): hue (saturation-weighted circular mean, 0..1, 0 red, 1/3 green, 2/3 blue),
        mean saturation (0..1) and mean value (0..1). A fully grey patch gets hue 0.
    """
    _check_patches(x)
    if blur_sigma_px < 0:
        raise FilterError(f"blur_sigma_px must be >= 0, got {blur_sigma_px}")
    if chunk_size < 1:
        raise FilterError(f"chunk_size must be >= 1, got {chunk_size}")
    n, height, width = x.shape[:3]
    sums = np.empty((4, n), np.float64)
    block = max(1, min(chunk_size, _BLOCK_PX // max(1, height * width)))
    n_blocks = -(-min(n, chunk_size) // block)
    # OpenCV's thread setting bounds ours: each thread runs whole blocks with its own buffers (OpenCV
    # releases the GIL), since one 96 px patch is too small for OpenCV to split across its threads.
    threads = max(1, min(cv2.getNumThreads(), n_blocks))
    workspaces = [_BlockMeans(min(block, n) if n else 1, height, width, blur_sigma_px) for _ in range(threads)]

    def run(workspace: _BlockMeans, chunk: np.ndarray, offset: int, starts: np.ndarray) -> None:
        for sub in starts.tolist():
            part = chunk[sub:sub + block]
            workspace.sums(part, sums[:, offset + sub:offset + sub + len(part)])

    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, n, chunk_size):
            chunk = np.asarray(x[start:start + chunk_size])
            shares = np.array_split(np.arange(0, len(chunk), block), threads)
            list(pool.map(run, workspaces, [chunk] * threads, [start] * threads, shares))
    chroma_x, chroma_y, sat, val = sums
    hue = np.mod(np.arctan2(chroma_y, chroma_x) / (2 * np.pi), 1.0)
    return np.stack([hue, sat / (height * width), val / (height * width)], axis=1).astype(np.float32)


def _brown_fraction_block(x: np.ndarray) -> np.ndarray:
    # OD_R + OD_G + OD_B > TISSUE_OD  <=>  (R + 1)(G + 1)(B + 1) < 256^3 exp(-TISSUE_OD), in integers;
    # the brown rule depends on (G, B) alone: one lookup in the flat 256 x 256 table at G * 256 + B
    # (one index array for np.take, not two fancy indexes).
    red, green, blue = (x[..., channel] for channel in range(3))
    product = (red.astype(np.uint32) + 1) * (green.astype(np.uint32) + 1)
    product *= blue.astype(np.uint32) + 1
    tissue = product < _TISSUE_PRODUCT
    index = green.astype(np.uint16) << 8
    index |= blue
    brown = np.take(_BROWN_GB, index)
    brown &= tissue
    return np.count_nonzero(brown, axis=(1, 2)) / np.maximum(np.count_nonzero(tissue, axis=(1, 2)), 1)


def _laplacian_var_block(x: np.ndarray) -> np.ndarray:
    n, height, width = x.shape[:3]
    grey = cv2.transform(x.reshape(n * height, width, 3).astype(np.float32), _GREY_WEIGHTS[None])
    # Patches stacked vertically: rows at a patch's top and bottom edge mix two patches; they are dropped.
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=1).reshape(n, height, width)[:, 1:-1, 1:-1]
    return lap.reshape(n, -1).var(axis=1)


def _per_pixel(x: np.ndarray, block_fn) -> np.ndarray:
    """``block_fn`` over blocks of ``_PIXEL_BLOCK`` patches on OpenCV's thread count; float32 (N,)."""
    out = np.empty(len(x), np.float32)
    starts = range(0, len(x), _PIXEL_BLOCK)

    def run(start: int) -> None:
        out[start:start + _PIXEL_BLOCK] = block_fn(x[start:start + _PIXEL_BLOCK])

    with ThreadPoolExecutor(max(1, min(cv2.getNumThreads(), len(starts)))) as pool:
        list(pool.map(run, starts))
    return out


def brown_fraction(x: np.ndarray) -> np.ndarray:
    """Fraction of a patch's tissue pixels that are brown (DAB-like), per patch.

    Args:
        x: uint8 (N, H, W, 3) RGB, in memory.

    Returns:
        float32 (N,) in 0..1: brown pixels / tissue pixels (rules: ``TISSUE_OD``,
        ``BROWN_BLUE_PER_GREEN_OD``); 0 for a patch without tissue pixels. Unblurred pixels.
    """
    _check_patches(x)
    return _per_pixel(x, _brown_fraction_block)


def laplacian_variance(x: np.ndarray) -> np.ndarray:
    """Sharpness per patch: the variance of the 4-neighbour Laplacian of the grey image.

    Grey is BT.601 luma on 0..1; the Laplacian (the 3x3 kernel [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    OpenCV's ``Laplacian(ksize=1)``) is taken at the (H - 2) x (W - 2) interior pixels, so no border
    rule is involved. A Gaussian blur of sigma s scales the energy of detail at spatial frequency f
    (cycles/px) by exp(-(2 pi f s)^2): blur lowers this measure by orders of magnitude, the contrast of
    pale versus dense tissue by far less.

    Args:
        x: uint8 (N, H, W, 3) RGB, in memory, H and W >= 3.

    Returns:
        float32 (N,), in (grey / px^2)^2 with grey on 0..1.
    """
    _check_patches(x)
    if x.shape[1] < 3 or x.shape[2] < 3:
        raise FilterError(f"the focus test needs patches of at least 3 x 3 px, got {x.shape[1:3]}")
    return _per_pixel(x, _laplacian_var_block)


def patch_measures(x, blur_sigma_px: float = 1.0, chunk_size: int = 4096, per_pixel: bool = True) -> np.ndarray:
    """Everything the filter tests look at, per patch, reading ``x`` once.

    Args:
        x: uint8 (N, H, W, 3) RGB; a numpy array or any sliceable with ``.shape`` (h5py dataset).
        blur_sigma_px: Gaussian sigma in pixels for the HSV means (see ``hsv_means``); the per-pixel
            tests use the unblurred pixels.
        chunk_size: patches read from ``x`` at a time.
        per_pixel: also compute the brown fraction and the Laplacian variance.

    Returns:
        float32 (N, 5) with the columns ``MEASURES`` (hue, saturation, value, brown_fraction,
        laplacian_var), or (N, 3) HSV means when ``per_pixel`` is False.
    """
    _check_patches(x)
    if chunk_size < 1:
        raise FilterError(f"chunk_size must be >= 1, got {chunk_size}")
    n = x.shape[0]
    out = np.empty((n, len(MEASURES) if per_pixel else 3), np.float32)
    for start in range(0, n, chunk_size):
        chunk = np.asarray(x[start:start + chunk_size])
        part = out[start:start + len(chunk)]
        part[:, :3] = hsv_means(chunk, blur_sigma_px, chunk_size)
        if per_pixel:
            part[:, 3] = brown_fraction(chunk)
            part[:, 4] = laplacian_variance(chunk)
    return out


def _check_range(name: str, bounds, lo_min: float = 0.0, hi_max: float = 1.0) -> tuple:
    if bounds is None:
        return (None, None)
    if not isinstance(bounds, Sequence) or len(bounds) != 2:
        raise FilterError(f"{name} must be (lo, hi) or None, got {bounds!r}")
    lo, hi = bounds
    for value in (lo, hi):
        if value is not None and not lo_min <= float(value) <= hi_max:
            raise FilterError(f"{name} {bounds!r}: bounds must lie in [{lo_min}, {hi_max}]")
    return (None if lo is None else float(lo), None if hi is None else float(hi))


def _check_limit(name: str, value, hi_max: float | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or value < 0 or (hi_max is not None and value > hi_max):
        raise FilterError(f"{name} = {value!r}: need a number in [0, {hi_max if hi_max is not None else 'inf'}] "
                          "or None")
    return float(value)


def keep_from_means(means: np.ndarray, *, hue_range=None, saturation_range=None, value_range=None,
                    max_brown_fraction=None, min_laplacian_var=None,
                    blur_sigma_px: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Apply thresholds to precomputed measures (see ``patch_measures``); bounds are inclusive.

    Args:
        means: float (N, 5) with the columns ``MEASURES``, or (N, 3) HSV means (hue, saturation,
            value on 0..1) when max_brown_fraction and min_laplacian_var are None.
        hue_range: (lo, hi) on 0..1, circular (lo > hi wraps through 0), or None for no limit.
        saturation_range: (lo, hi) on 0..1, either end None for no limit; None for no limit.
        value_range: (lo, hi) on 0..1, as saturation_range.
        max_brown_fraction: ``ihc_like`` when more than this fraction (0..1) of the tissue pixels is
            brown; None for no limit.
        min_laplacian_var: ``out_of_focus`` when the Laplacian variance ((grey / px^2)^2, grey on
            0..1) is below this; None for no limit.
        blur_sigma_px: ignored here (the means are already computed); accepted so that a thresholds
            dict such as ``DEFAULT_THRESHOLDS`` can be passed whole.

    Returns:
        keep: bool (N,); reason: str (N,), '' for kept patches, else the first failing reason in
        ``REJECT_REASONS`` order.
    """
    del blur_sigma_px
    sat_lo, sat_hi = _check_range("saturation_range", saturation_range)
    val_lo, val_hi = _check_range("value_range", value_range)
    for name, lo, hi in (("saturation_range", sat_lo, sat_hi), ("value_range", val_lo, val_hi)):
        if lo is not None and hi is not None and lo > hi:
            raise FilterError(f"{name} ({lo}, {hi}): lo > hi")
    hue_lo, hue_hi = _check_range("hue_range", hue_range)
    if (hue_lo is None) != (hue_hi is None):
        raise FilterError(f"hue_range {hue_range!r}: give both ends or None (the range is circular)")
    brown_max = _check_limit("max_brown_fraction", max_brown_fraction, 1.0)
    lap_min = _check_limit("min_laplacian_var", min_laplacian_var, None)
    means = np.asarray(means, dtype=np.float64)
    if (brown_max is not None or lap_min is not None) and means.shape[1] < len(MEASURES):
        raise FilterError("max_brown_fraction and min_laplacian_var need the per-pixel measures "
                          "(patch_measures(..., per_pixel=True))")
    hue, sat, val = means[:, 0], means[:, 1], means[:, 2]
    no_limit = np.zeros(len(means), bool)
    if hue_lo is None:
        off_hue = no_limit
    elif hue_lo <= hue_hi:
        off_hue = (hue < hue_lo) | (hue > hue_hi)
    else:
        off_hue = (hue < hue_lo) & (hue > hue_hi)
    failures = np.stack([
        sat < sat_lo if sat_lo is not None else no_limit,
        sat > sat_hi if sat_hi is not None else no_limit,
        val < val_lo if val_lo is not None else no_limit,
        val > val_hi if val_hi is not None else no_limit,
        means[:, 3] > brown_max if brown_max is not None else no_limit,
        off_hue,
        means[:, 4] < lap_min if lap_min is not None else no_limit,
    ], axis=1)
    keep = ~failures.any(axis=1)
    reason = np.where(keep, "", np.asarray(REJECT_REASONS)[failures.argmax(axis=1)])
    return keep, reason


def filter_patches(x, **thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Keep flags and rejection reasons for patches (thesis §5.1.2 filter plus the per-pixel tests).

    ``measure_and_filter`` without the measures; arguments and returns as there.
    """
    _, keep, reason = measure_and_filter(x, **thresholds)
    return keep, reason


def measure_and_filter(x, *, hue_range=None, saturation_range=None, value_range=None, max_brown_fraction=None,
                       min_laplacian_var=None, blur_sigma_px: float = 1.0,
                       chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The filter's measures, keep flags and rejection reasons for patches (thesis §5.1.2 filter plus the
    per-pixel tests), from one pass over the pixels.

    Args:
        x: uint8 (N, H, W, 3) RGB; numpy array or h5py dataset, read ``chunk_size`` patches at a time.
        hue_range: (lo, hi) mean hue on 0..1, circular: lo > hi wraps through 0, e.g. (0.75, 0.05) is
            purple..pink..red. None for no limit.
        saturation_range: (lo, hi) mean saturation on 0..1; None (or a None end) for no limit.
        value_range: (lo, hi) mean value on 0..1; None (or a None end) for no limit.
        max_brown_fraction: largest fraction of brown tissue pixels (``ihc_like`` above); None: off.
        min_laplacian_var: least Laplacian variance (``out_of_focus`` below); None: off.
        blur_sigma_px: Gaussian sigma in pixels applied before the HSV means.
        chunk_size: patches in memory at a time.

    Returns:
        measures: float32 (N, 5) with the columns ``MEASURES``, or (N, 3) HSV means when neither
        per-pixel test is on (see ``patch_measures``); keep: bool (N,); reason: str array (N,), '' where
        kept, else the first failing reason in ``REJECT_REASONS`` order.

    Raises:
        FilterError: malformed thresholds or input shape.
    """
    thresholds = {"hue_range": hue_range, "saturation_range": saturation_range, "value_range": value_range,
                  "max_brown_fraction": max_brown_fraction, "min_laplacian_var": min_laplacian_var}
    keep_from_means(np.zeros((0, len(MEASURES))), **thresholds)
    per_pixel = max_brown_fraction is not None or min_laplacian_var is not None
    measures = patch_measures(x, blur_sigma_px, chunk_size, per_pixel)
    return (measures, *keep_from_means(measures, **thresholds))


def thresholds_from_config(section: dict) -> dict:
    """The ``filter_patches`` keyword arguments held by a config section (``filter_pcam``, ``tile_dlbcl``).

    Keys of ``THRESHOLD_KEYS`` that the section lacks are None (no limit), except blur_sigma_px (1.0);
    YAML lists become tuples.
    """
    out = {key: section.get(key) for key in THRESHOLD_KEYS}
    out["blur_sigma_px"] = 1.0 if out["blur_sigma_px"] is None else float(out["blur_sigma_px"])
    return {key: tuple(value) if isinstance(value, list) else value for key, value in out.items()}


def brightness_summary(mean_value: np.ndarray) -> dict:
    """Distribution of per-patch mean HSV value (brightness, 0..1) for a step's summary.

    Args:
        mean_value: float (N,), e.g. ``hsv_means(kept_x)[:, 2]`` or column 2 of ``patch_measures``.

    Returns:
        {"n", "mean", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "fraction_above_0.8"}: percentiles
        of the mean V; 0.8 is the thesis's DLBCL ceiling, so the last entry says how much kept tissue
        that ceiling would drop. Values are None when N is 0.
    """
    v = np.asarray(mean_value, np.float64)
    keys = ("p1", "p5", "p25", "p50", "p75", "p95", "p99")
    if len(v) == 0:
        return {"n": 0, "mean": None, **dict.fromkeys(keys), "fraction_above_0.8": None}
    pct = np.percentile(v, [1, 5, 25, 50, 75, 95, 99])
    return {"n": len(v), "mean": round(float(v.mean()), 4), **{k: round(float(p), 4) for k, p in zip(keys, pct,
                                                                                                   strict=True)},
            "fraction_above_0.8": round(float((v > 0.8).mean()), 4)}
