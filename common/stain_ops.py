"""Pieces every stain normaliser shares: the common base (parameters, chunked transform, JSON state),
optical density, OpenCV Lab, tissue masks, masked percentiles, eigen-decompositions and the CPU/device
kernels. The methods themselves are in ``stain_macenko``, ``stain_vahadane`` and ``stain_reinhard``;
``common.stain`` builds them by name.

Shapes: ``U`` estimation units (patches or groups), ``P`` pixels per unit, ``L`` values per row.

Speed (CPU): optical densities go through 8-bit lookup tables (OpenCV), percentiles through a partial
selection; the results equal the plain per-pixel formulas bit for bit. ``CPU_KERNELS = False`` runs
the torch code every other device runs on the CPU too (the tests compare the two paths without a GPU).
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

from common.errors import UserError

FIT_SCOPES = ("patch", "group")
CPU_KERNELS = True
CHUNK_PIXELS = 64 * 96 * 96  # pixels per transform chunk: 64 PCam patches keep the working set in cache
MAX_CHUNK_PATCHES = 85  # Reinhard's (patch, channel, level) index must fit 16 bits: 85 * 3 * 256 <= 65536
STATE_VERSION = 1
# Standard H&E optical densities (Ruifrok & Johnston 2001), rows hematoxylin then eosin.
RUIFROK_HE = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11))
# Knobs of every method (config.yaml: normalize.*).
COMMON_PARAMS = {
    "fit_scope": "patch",  # "patch": one stain estimate per patch (the thesis); "group": per slide/patient
    "min_tissue_fraction": 0.05,  # below this fraction of tissue pixels a patch is returned unchanged
    "min_eigen_ratio": 0.002,  # 2nd / 1st eigenvalue of the tissue OD covariance; below it: one stain only
    "group_max_patches": 64,  # a group's stain estimate uses at most this many evenly spaced patches
}
_POSITIVE = ("io", "group_max_patches", "n_iterations", "max_fit_pixels", "luminosity_threshold", "tolerance")


class StainError(UserError):
    """A user mistake: unknown method or parameter, bad array, unusable reference, unfitted use."""


class StainNormalizer:
    """What every method shares: resolved parameters, the fitted ``state``, the chunked ``transform``
    and the JSON round trip. A method class sets ``method`` and ``defaults`` and defines ``fit``,
    ``_features`` (per-pixel work done once per chunk), ``_estimate`` (per-unit source statistics)
    and ``_apply`` (the mapping to the reference).

    Attributes:
        params: the resolved parameters (``COMMON_PARAMS`` and the method's ``defaults``, overridden).
        state: the fitted reference statistics (JSON-ready), None before ``fit``.
        n_unchanged: patches the last ``transform`` returned unchanged (too little tissue, one stain).
    """

    method = ""
    defaults: dict = {}
    changes_pixels = True  # False only for the identity, whose output 03 need not store again

    def __init__(self, **params):
        defaults = {**COMMON_PARAMS, **self.defaults}
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise StainError(f"unknown parameter(s) {unknown} for stain method {self.method!r}; "
                             f"expected some of {sorted(defaults)}")
        self.params = {key: params.get(key, value) for key, value in defaults.items()}
        check_params(self.params)
        self.state: dict | None = None
        self.n_unchanged = 0

    def transform(self, images: np.ndarray, groups: np.ndarray | None = None, device: str = "cpu",
                  workers: int = 1) -> np.ndarray:
        """Normalise a batch of patches to the fitted reference.

        Args:
            images: uint8 RGB (N, H, W, 3).
            groups: (N,) slide/patient id of each patch; required when ``fit_scope="group"``
                (the source stains are estimated once per distinct id), ignored otherwise.
            device: torch device for the arithmetic, "cpu" or "cuda".
            workers: on the CPU, chunks of at most 85 patches run side by side in this many threads.
                Chunk ops are too small for torch's intra-op threads to pay off (on a busy machine
                their barriers stall every op), so a caller passing workers > 1 sets
                ``torch.set_num_threads(1)`` first, as 03 does.

        Returns:
            uint8 RGB (N, H, W, 3); patches with too little tissue are copied unchanged and counted
            in ``self.n_unchanged``. The same for any chunking, worker and thread count.

        Raises:
            StainError: unfitted normaliser, bad array, missing or misshaped ``groups``, bad device.
        """
        images = check_rgb(images, "images", allow_single=False)
        self.n_unchanged = 0
        self._require_fitted()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise StainError(f"device={device!r} requested but CUDA is not available")
        n, height, width, _ = images.shape
        chunk = chunk_patches(height, width)
        out = np.empty_like(images)
        by_group = self.params["fit_scope"] == "group"
        if by_group:
            group_index, group_source = self._estimate_groups(images, groups, device)

        def normalise_chunk(start: int) -> int:
            """Normalise images[start:start + chunk] into out; returns how many were left unchanged."""
            batch = images[start:start + chunk]
            features = self._features(batch, device)
            if by_group:
                rows = torch.as_tensor(group_index[start:start + chunk], device=device)
                source = tuple(part[rows] for part in group_source)
            else:
                source = self._estimate(features)
            normalised, ok = self._apply(batch, features, source)
            out[start:start + chunk] = normalised
            return int((~ok).sum())

        starts = range(0, n, chunk)
        if device != "cpu" or workers <= 1 or len(starts) == 1:
            self.n_unchanged = sum(map(normalise_chunk, starts))
        else:  # chunks are independent, so the output does not depend on the worker count
            with ThreadPoolExecutor(max_workers=min(workers, len(starts))) as pool:
                self.n_unchanged = sum(pool.map(normalise_chunk, starts))
        return out

    def to_json(self) -> str:
        """The method, resolved parameters and fitted state as a JSON string (floats kept exactly)."""
        return json.dumps({"version": STATE_VERSION, "method": self.method, "params": self.params,
                           "state": self.state})

    @classmethod
    def from_json(cls, text: str):
        """Rebuild a normaliser of this method from ``to_json`` output; its transforms are bit-identical.

        Raises:
            StainError: text that is not a saved normaliser of this method.
        """
        method, params, state = parse_saved(text)
        if method != cls.method:
            raise StainError(f"saved stain normaliser is {method!r}, not {cls.method!r}")
        normalizer = cls(**params)
        normalizer.state = state
        return normalizer

    def _require_fitted(self) -> None:
        if self.state is None:
            raise StainError(f"stain normaliser {self.method!r} is not fitted; call fit(reference) first")

    def _estimate_groups(self, images: np.ndarray, groups: np.ndarray | None, device: str):
        """(index (N,) of each patch's group, the per-group ``_estimate`` from at most
        ``group_max_patches`` evenly spaced patches of the group pooled into one image)."""
        if groups is None:
            raise StainError("fit_scope='group' needs groups (one slide/patient id per patch)")
        groups = np.asarray(groups)
        if groups.shape != (len(images),):
            raise StainError(f"groups has shape {groups.shape}, expected ({len(images)},) like images")
        names, index = np.unique(groups, return_inverse=True)
        estimates = []
        for g in range(len(names)):
            members = np.flatnonzero(index == g)
            take = np.unique(np.linspace(0, len(members) - 1, int(self.params["group_max_patches"]))
                             .round().astype(np.int64))
            pooled = images[members[take]].reshape(1, -1, images.shape[2], 3)
            estimates.append(self._estimate(self._features(pooled, device)))
        return index, tuple(torch.cat(parts) for parts in zip(*estimates, strict=True))

    def _pooled_reference(self, reference: np.ndarray):
        """The reference (H, W, 3) or (N, H, W, 3) pooled into one unit: (reference (N, H, W, 3), its
        ``_estimate``). Raises StainError when the pool has too little tissue or a single stain."""
        reference = check_rgb(reference, "fit target", allow_single=True)
        estimate = self._estimate(self._features(reference.reshape(1, -1, 1, 3), "cpu"))
        if not bool(estimate[-1][0]):
            raise StainError(f"the stain reference (shape {reference.shape}) has too little tissue or a "
                             f"single stain; choose another reference image")
        return reference, estimate

    def _reference_estimates(self, reference: np.ndarray):
        """(reference uint8 (N, H, W, 3), ``_estimate`` of all its pixels pooled into one unit,
        ``_estimate`` of each of its usable patches (parts indexed by patch; None when N = 1)).

        Raises:
            StainError: bad array; the pool, or every patch, has too little tissue or a single stain.
        """
        reference, pooled = self._pooled_reference(reference)
        if len(reference) == 1:
            return reference, pooled, None
        chunk = chunk_patches(*reference.shape[1:3])
        parts = [self._estimate(self._features(reference[start:start + chunk], "cpu"))
                 for start in range(0, len(reference), chunk)]
        per_patch = tuple(torch.cat(part) for part in zip(*parts, strict=True))
        ok = per_patch[-1]
        if not bool(ok.any()):
            raise StainError(f"no patch of the stain reference (shape {reference.shape}) has enough tissue "
                             f"and two stains; choose another reference")
        return reference, pooled, tuple(part[ok] for part in per_patch)

    def _features(self, images: np.ndarray, device: str) -> tuple:
        raise NotImplementedError

    def _estimate(self, features: tuple) -> tuple:
        raise NotImplementedError

    def _apply(self, images: np.ndarray, features: tuple, source: tuple) -> tuple[np.ndarray, torch.Tensor]:
        raise NotImplementedError


class TwoStainNormalizer(StainNormalizer):
    """What Macenko and Vahadane share: a fitted (2, 3) stain matrix and the fit of the reference (the
    stains from all reference pixels pooled, the target concentrations from the median over its usable
    patches of each patch's own 99th percentiles; see ``two_stain_state``)."""

    @property
    def stain_matrix(self) -> np.ndarray:
        """float64 (2, 3): fitted stain optical densities, rows hematoxylin then eosin, unit length, >= 0."""
        self._require_fitted()
        return np.asarray(self.state["stain_matrix"], dtype=np.float64)

    def fit(self, reference: np.ndarray):
        """Estimate the reference from uint8 RGB (H, W, 3), or patches (N, H, W, 3); returns self.

        Raises:
            StainError: bad array, or a reference with too little tissue / a single stain.
        """
        reference, (stains, max_conc, _), per_patch = self._reference_estimates(reference)
        per_patch_max = None if per_patch is None else per_patch[1]
        self.state = {**reference_id(reference), **two_stain_state(stains[0], max_conc[0], per_patch_max)}
        return self

    def _target(self, max_conc: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference stains float32 (2, 3) and each patch's concentration scale float32 (n, 2): the
        reference's 99th-percentile concentrations over the patch's own."""
        target_stains = torch.tensor(self.state["stain_matrix"], device=device).float()
        target_max = torch.tensor(self.state["max_concentration"], device=device).float()
        return target_stains, target_max / max_conc.clamp(min=1e-6)


def chunk_patches(height: int, width: int) -> int:
    """Patches of height x width px per chunk: about ``CHUNK_PIXELS`` pixels, at most ``MAX_CHUNK_PATCHES``."""
    return max(1, min(CHUNK_PIXELS // (height * width), MAX_CHUNK_PATCHES))


def check_params(params: dict) -> None:
    """Raise StainError for a bad value among the resolved parameters of any method."""
    if params["fit_scope"] not in FIT_SCOPES:
        raise StainError(f"fit_scope={params['fit_scope']!r}; expected one of {FIT_SCOPES}")
    for key, value in params.items():
        if key == "keep_residual":
            if not isinstance(value, bool):
                raise StainError(f"stain parameter {key}={value!r} must be true or false")
        elif key != "fit_scope" and (isinstance(value, bool) or not isinstance(value, int | float)
                                     or not math.isfinite(value)):
            raise StainError(f"stain parameter {key}={value!r} must be a finite number")
    if not 0.0 <= params["min_tissue_fraction"] <= 1.0:
        raise StainError(f"min_tissue_fraction={params['min_tissue_fraction']} must be within [0, 1]")
    for key in _POSITIVE:
        if key in params and params[key] <= 0:
            raise StainError(f"stain parameter {key}={params[key]} must be > 0")
    if "alpha" in params and not 0.0 <= params["alpha"] < 50.0:
        raise StainError(f"alpha={params['alpha']} must be a percentile within [0, 50)")


def parse_saved(text: str) -> tuple[str, dict, dict]:
    """(method, params, state) of a ``to_json`` string; StainError for anything else."""
    try:
        saved = json.loads(text)
        method, params, state = saved["method"], saved["params"], saved["state"]
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise StainError(f"not a saved stain normaliser: {error}") from None
    if saved.get("version") != STATE_VERSION:
        raise StainError(f"saved stain normaliser has version {saved.get('version')!r}, expected {STATE_VERSION}")
    return method, params, state


def reference_id(reference: np.ndarray) -> dict:
    """The shape and MD5 of a fitted reference uint8 (N, H, W, 3), recorded in every state."""
    return {"target_shape": list(reference.shape),
            "target_md5": hashlib.md5(np.ascontiguousarray(reference).tobytes()).hexdigest()}


def two_stain_state(stains: torch.Tensor, max_conc: torch.Tensor, per_patch_max_conc: torch.Tensor | None) -> dict:
    """Macenko/Vahadane reference state from the pooled reference's stains (2, 3) and max concentrations
    (2,): the stain matrix clipped of rounding-level negatives and renormalised to unit rows.

    For a reference of several patches, per_patch_max_conc (K, 2) holds each usable patch's own 99th
    percentiles, and their median is the target: a typical reference patch then maps onto itself,
    whereas the pooled 99th percentile is set by the pool's densest patches and boosts every stain."""
    if per_patch_max_conc is not None:
        max_conc = torch.quantile(per_patch_max_conc.double(), 0.5, dim=0)
    matrix = stains.double()
    if bool((matrix < -0.05).any()):
        raise StainError(f"the stain reference gives negative stain optical densities {matrix.tolist()}; "
                         f"choose another reference image")
    matrix = matrix.clamp(min=0.0)
    matrix = matrix / matrix.norm(dim=1, keepdim=True)
    return {"stain_matrix": matrix.tolist(), "max_concentration": max_conc.double().tolist()}


def check_rgb(images, what: str, allow_single: bool) -> np.ndarray:
    """images as a contiguous uint8 (N, H, W, 3) array; StainError for anything else."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise StainError(f"{what} must be a uint8 numpy array, got "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    ok_ndim = (3, 4) if allow_single else (4,)
    if images.ndim not in ok_ndim or images.shape[-1] != 3 or 0 in images.shape:
        expected = "(H, W, 3) or (N, H, W, 3)" if allow_single else "(N, H, W, 3)"
        raise StainError(f"{what} must be RGB {expected}, got shape {images.shape}")
    return np.ascontiguousarray(images if images.ndim == 4 else images[None])


# ---------------------------------------------------------------- pixels
def optical_density(images: np.ndarray, io: float, offset: float, device: str) -> torch.Tensor:
    """float32 (n, 3, P) optical density -log((I + offset) / io) through a 256-entry lookup table.

    offset 1 is torchstain's convention; offset 0 is staintools' (I = 0 read as 1, OD >= 1e-6)."""
    table = od_table(io, offset)
    n = len(images)
    channel_first = np.ascontiguousarray(images.reshape(n, -1, 3).transpose(0, 2, 1))
    if device == "cpu" and CPU_KERNELS:
        # OpenCV's table lookup reads the uint8 index directly and is several times faster than
        # numpy's or torch's gathers, which first widen the index to int64.
        rows = channel_first.reshape(n * 3, -1)
        return torch.from_numpy(cv2.LUT(rows, table.astype(np.float32)).reshape(n, 3, -1))
    lut = torch.tensor(table, dtype=torch.float32, device=device)
    return lut[torch.as_tensor(channel_first, device=device).long()]


def od_table(io: float, offset: float) -> np.ndarray:
    """float64 (256,) optical density of each 8-bit level (see ``optical_density``)."""
    levels = np.arange(256, dtype=np.float64)
    if offset == 0.0:
        return np.maximum(-np.log(np.maximum(levels, 1.0) / io), 1e-6)
    return -np.log((levels + offset) / io)


def lab8(images: np.ndarray) -> np.ndarray:
    """uint8 (n, P, 3) OpenCV 8-bit Lab (L * 255 / 100, a + 128, b + 128) of uint8 RGB (n, H, W, 3).

    The patches are stacked into one tall image so that OpenCV converts the batch in one call."""
    mosaic = np.ascontiguousarray(images.reshape(-1, images.shape[2], 3))
    return cv2.cvtColor(mosaic, cv2.COLOR_RGB2LAB).reshape(len(images), -1, 3)


def luminosity_mask(lab: np.ndarray, threshold: float) -> np.ndarray:
    """bool (n, P): L / 255 < threshold on OpenCV 8-bit Lab (n, P, 3) (staintools' tissue mask)."""
    # L / 255 grows with L, so the test holds exactly for the levels below the first one failing it.
    passing_levels = int((np.arange(256) / 255.0 < threshold).sum())
    return lab[..., 0] < passing_levels


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """int32 (U,) True entries per row of a bool (U, L) mask; summing its bytes is faster than a bool sum."""
    return mask.view(torch.uint8).sum(dim=1, dtype=torch.int32)


def enough_tissue(tissue: torch.Tensor, params: dict) -> torch.Tensor:
    """bool (U,): at least 3 tissue pixels and ``min_tissue_fraction`` of the unit's pixels."""
    count = count_true(tissue)
    return (count >= 3) & (count >= params["min_tissue_fraction"] * tissue.shape[1])


def keep_unusable(out: np.ndarray, images: np.ndarray, ok: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Copy the unusable patches of images (n, H, W, 3) back into out in place; returns (out, ok (n,) on CPU)."""
    ok = ok.cpu()
    unusable = ~ok.numpy()
    out[unusable] = images[unusable]
    return out, ok


# ---------------------------------------------------------------- statistics
def percentile(values: torch.Tensor, mask: torch.Tensor | None, q: float) -> torch.Tensor:
    """(U,) q-th percentile (numpy's linear rule) of values (U, L) over mask (U, L) per row.

    mask None means every value. Only the few extreme values are ordered (a partial selection, not
    a full sort); rows with an empty mask give non-finite values that callers flag."""
    length = values.shape[1]
    if mask is None:
        count = torch.full((len(values),), length, device=values.device)
    else:
        count = count_true(mask)
    position = (count - 1).clamp(min=0).double() * (q / 100.0)
    low = position.floor().long()
    frac = (position - low).to(values.dtype)
    if q <= 50.0:
        k = min(length, int(low.max()) + 2)
        filled = values if mask is None else values.masked_fill(~mask, math.inf)
        top = extremes(filled, k, largest=False)
        first, second = low, low + 1
    else:
        k = max(1, min(length, int((count - 1 - low).max()) + 1))
        filled = values if mask is None else values.masked_fill(~mask, -math.inf)
        top = extremes(filled, k, largest=True)
        first, second = count - 1 - low, count - 2 - low
    a = top.gather(1, first.clamp(0, k - 1)[:, None])[:, 0]
    b = top.gather(1, second.clamp(0, k - 1)[:, None])[:, 0]
    return torch.where(frac > 0, a + frac * (b - a), a)


def extremes(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """(U, k) the k largest (descending) or smallest (ascending) values of each row of values (U, L)."""
    if values.device.type != "cpu" or not CPU_KERNELS:
        return values.topk(k, dim=1, largest=largest).values
    # On the CPU numpy's introselect partition is faster than torch.topk; only the k-wide
    # block it isolates is then sorted.
    array = values.numpy()
    length = array.shape[1]
    if largest:
        # copy(): a reversed view keeps a negative stride even when numpy deems it contiguous (k = 1).
        block = np.sort(np.partition(array, length - k, axis=1)[:, length - k:], axis=1)[:, ::-1].copy()
    else:
        block = np.sort(np.partition(array, k - 1, axis=1)[:, :k], axis=1)
    return torch.from_numpy(block)


def max_concentrations(conc: torch.Tensor) -> torch.Tensor:
    """float32 (U, 2) 99th percentile of each stain's concentrations (U, 2, L) over all pixels."""
    return percentile(conc.reshape(-1, conc.shape[2]), None, 99.0).reshape(-1, 2)


def tissue_od_eigen(od: torch.Tensor, tissue: torch.Tensor):
    """Eigen-decomposition of the tissue OD covariance (ddof 1) per row of od (U, 3, L).

    Returns (eigenvalues (U, 3) ascending, eigenvectors (U, 3, 3) float64, 2nd/1st eigenvalue (U,))."""
    weight = tissue.to(od.dtype)[:, None, :]
    count = count_true(tissue).clamp(min=2).to(od.dtype)
    weighted = od * weight
    mean = weighted.sum(dim=2) / count[:, None]
    # od * w - mean * w equals (od - mean) * w for w in {0, 1}, in one pass instead of two.
    centred = torch.addcmul(weighted, mean[:, :, None], weight, value=-1.0)
    return eigen_ratio((centred @ centred.transpose(1, 2)).double() / (count - 1).double()[:, None, None])


def eigen_ratio(cov: torch.Tensor):
    """(eigenvalues (U, 3) ascending, eigenvectors (U, 3, 3), 2nd/1st eigenvalue (U,)) of cov (U, 3, 3)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    ratio = eigenvalues[:, 1] / eigenvalues[:, 2].clamp(min=1e-12)
    return eigenvalues, eigenvectors, ratio


# ---------------------------------------------------------------- two-stain models
def pseudo_inverse(stains: torch.Tensor) -> torch.Tensor:
    """(U, 2, 3) least-squares unmixing matrix (S S^T)^-1 S of stain rows S (U, 2, 3)."""
    gram = stains.double() @ stains.double().transpose(1, 2)
    det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
    adjugate = torch.stack([torch.stack([gram[:, 1, 1], -gram[:, 0, 1]], -1),
                            torch.stack([-gram[:, 1, 0], gram[:, 0, 0]], -1)], -2)
    return (adjugate / det[:, None, None] @ stains.double()).float()


def h_then_e(stains: torch.Tensor) -> torch.Tensor:
    """The two stain rows of each unit (U, 2, 3) ordered hematoxylin then eosin: of the two possible
    assignments, the one whose rows best match the Ruifrok-Johnston H and E vectors (the larger sum of
    cosines). "Larger red OD first" has a margin of only 0.01-0.05 on PCam's purple stains and swaps
    some references; a swapped reference turns stroma brown."""
    standard = torch.tensor(RUIFROK_HE, dtype=stains.dtype, device=stains.device)
    standard = standard / standard.norm(dim=1, keepdim=True)
    cosine = (stains / stains.norm(dim=2, keepdim=True).clamp(min=1e-12)) @ standard.T  # (U, row, H|E)
    swap = cosine[:, 0, 1] + cosine[:, 1, 0] > cosine[:, 0, 0] + cosine[:, 1, 1]
    return torch.where(swap[:, None, None], stains.flip(1), stains)


def stains_usable(stains, max_conc, ratio, tissue, params) -> torch.Tensor:
    """ok (U,): enough tissue, two distinct stains, finite and positive concentrations."""
    cosine = (stains[:, 0] * stains[:, 1]).sum(dim=1)
    return (enough_tissue(tissue, params) & (ratio >= params["min_eigen_ratio"])
            & torch.isfinite(stains).all(dim=2).all(dim=1) & (cosine.abs() < 0.995)
            & torch.isfinite(max_conc).all(dim=1) & (max_conc > 1e-6).all(dim=1))
