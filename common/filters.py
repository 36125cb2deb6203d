"""Patch quality filters on mean hue, saturation and value (thesis §5.1.2).

The thesis keeps a PatchCamelyon patch when, after a Gaussian blur, its mean HSV hue, saturation and
brightness fall in fixed ranges; the aim is to drop blank glass and the few IHC (brown DAB) patches so
that only H&E tissue remains. DLBCL-Morph tiles get the same test with looser limits.

Inputs: uint8 RGB patches ``(N, H, W, 3)`` -- a numpy array or anything sliceable with ``.shape``
(e.g. an ``h5py`` dataset), read in chunks so memory stays bounded.
Outputs: per-patch means ``float32 (N, 3)`` (hue, saturation, value on 0..1), keep flags and the first
failing reason per patch, and grid-search tables for choosing thresholds.

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
fill; real tissue >= 0.50). Measured on 209 tissue, 57 glass and 209 DAB-restained patches: keeps
100 % of tissue, rejects 100 % of glass and 100 % of the brown patches.
``DLBCL_QUALITY`` is the thesis's DLBCL-Morph rule: mean S > 0.07 and V < 0.8.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from common.errors import UserError

REJECT_REASONS = ("low_saturation", "high_saturation", "low_value", "high_value", "off_hue")

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


def keep_from_means(means: np.ndarray, *, hue_range=None, saturation_range=None, value_range=None,
                    blur_sigma_px: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Apply thresholds to precomputed means (see ``hsv_means``); bounds are inclusive.

    Args:
        means: float (N, 3) hue, saturation, value on 0..1.
        hue_range: (lo, hi) on 0..1, circular (lo > hi wraps through 0), or None for no limit.
        saturation_range: (lo, hi) on 0..1, either end None for no limit; None for no limit.
        value_range: (lo, hi) on 0..1, as saturation_range.
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
    means = np.asarray(means, dtype=np.float64)
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
        off_hue,
    ], axis=1)
    keep = ~failures.any(axis=1)
    reason = np.where(keep, "", np.asarray(REJECT_REASONS)[failures.argmax(axis=1)])
    return keep, reason


def filter_patches(x, *, hue_range=None, saturation_range=None, value_range=None,
                   blur_sigma_px: float = 1.0, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Keep flags and rejection reasons for patches (thesis §5.1.2 filter).

    Args:
        x: uint8 (N, H, W, 3) RGB; numpy array or h5py dataset, read ``chunk_size`` patches at a time.
        hue_range: (lo, hi) mean hue on 0..1, circular: lo > hi wraps through 0, e.g. (0.75, 0.05) is
            purple..pink..red. None for no limit.
        saturation_range: (lo, hi) mean saturation on 0..1; None (or a None end) for no limit.
        value_range: (lo, hi) mean value on 0..1; None (or a None end) for no limit.
        blur_sigma_px: Gaussian sigma in pixels applied before the means.
        chunk_size: patches in memory at a time.

    Returns:
        keep: bool (N,); reason: str array (N,), '' where kept, else the first failing reason in
        ``REJECT_REASONS`` order.

    Raises:
        FilterError: malformed thresholds or input shape.
    """
    thresholds = {"hue_range": hue_range, "saturation_range": saturation_range, "value_range": value_range}
    keep_from_means(np.zeros((0, 3)), **thresholds)
    return keep_from_means(hsv_means(x, blur_sigma_px, chunk_size), **thresholds)


def grid_search(x, is_junk: np.ndarray | None, labels: np.ndarray | None, candidates: list[dict],
                chunk_size: int = 4096) -> list[dict]:
    """Score threshold candidates on a labelled sample; the means are computed once per blur sigma.

    Args:
        x: uint8 (N, H, W, 3) RGB (numpy array or h5py dataset).
        is_junk: bool (N,) True for patches that should be rejected (glass, IHC), or None.
        labels: (N,) any hashable label per patch (e.g. class or source) for kept fractions, or None.
        candidates: thresholds dicts with keys hue_range, saturation_range, value_range and optional
            blur_sigma_px (default 1.0), as accepted by ``filter_patches``.
        chunk_size: patches in memory at a time.

    Returns:
        One dict per candidate, in order: ``thresholds`` (the candidate), ``kept_fraction`` (overall),
        ``kept_fraction_by_label`` ({label: fraction}, present when labels is given) and, when is_junk
        is given, ``precision`` and ``recall`` of rejection (positive class = junk; NaN when undefined).
    """
    n = x.shape[0]
    if is_junk is not None and len(is_junk) != n:
        raise FilterError(f"is_junk has {len(is_junk)} entries for {n} patches")
    if labels is not None and len(labels) != n:
        raise FilterError(f"labels has {len(labels)} entries for {n} patches")
    means_by_sigma: dict[float, np.ndarray] = {}
    results = []
    for candidate in candidates:
        sigma = float(candidate.get("blur_sigma_px", 1.0))
        if sigma not in means_by_sigma:
            means_by_sigma[sigma] = hsv_means(x, sigma, chunk_size)
        keep, _ = keep_from_means(means_by_sigma[sigma], **candidate)
        row = {"thresholds": candidate, "kept_fraction": float(keep.mean()) if n else float("nan")}
        if labels is not None:
            label_array = np.asarray(labels)
            row["kept_fraction_by_label"] = {
                label.item() if hasattr(label, "item") else label: float(keep[label_array == label].mean())
                for label in np.unique(label_array)
            }
        if is_junk is not None:
            junk = np.asarray(is_junk, bool)
            rejected = ~keep
            true_rejections = int((rejected & junk).sum())
            row["precision"] = float(true_rejections / rejected.sum()) if rejected.any() else float("nan")
            row["recall"] = float(true_rejections / junk.sum()) if junk.any() else float("nan")
        results.append(row)
    return results
