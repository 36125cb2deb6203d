"""Stain normalisation of H&E patches: one fit/transform API for every method, batched in torch.

The thesis mixes PatchCamelyon and DLBCL-Morph; their stain colours differ so much that a
feature clustering can tell the datasets apart. Stain normalisation maps every patch onto the
colours of one reference image. Methods:

- ``none``: identity.
- ``macenko``: Macenko et al., "A method for normalizing histology slides for quantitative
  analysis", ISBI 2009. Conventions of torchstain 1.4.1's numpy ``MacenkoNormalizer``
  (Io = 240, alpha = 1, beta = 0.15, hematoxylin first).
- ``vahadane``: Vahadane et al., "Structure-preserving color normalization and sparse stain
  separation for histological images", IEEE TMI 2016. Conventions of staintools 2.1.2
  (luminosity tissue mask, sparse non-negative dictionary with 2 atoms and lambda 0.1,
  non-negative lasso concentrations with lambda 0.01), solved here without SPAMS by a
  deterministic batched alternating minimisation.
- ``reinhard``: Reinhard et al., "Color transfer between images", IEEE CG&A 2001, in OpenCV's
  8-bit Lab as staintools 2.1.2 and tiatoolbox do.

Inputs: uint8 RGB patches ``(N, H, W, 3)``; a reference (target) image ``(H, W, 3)`` or batch.
Outputs: uint8 patches of the same shape; the fitted state as JSON.

Speed (CPU): optical densities and Reinhard's transfer go through 8- and 16-bit lookup tables
(OpenCV), percentiles through a partial selection, Reinhard's Lab statistics through per-patch level
histograms; the results equal the plain per-pixel formulas bit for bit.

Patches with too little tissue to estimate their stains (white or black glass, a flat colour, a
single stain) are returned unchanged and counted in ``Normalizer.n_unchanged``; a transform never
produces NaN or Inf and never raises on such patches.

Usage::

    normalizer = make_normalizer("macenko", fit_scope="group")
    normalizer.fit(reference_rgb)
    out = normalizer.transform(patches, groups=patient_ids)
    state = normalizer.to_json()          # Normalizer.from_json(state) gives identical output
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

METHODS = ("none", "macenko", "vahadane", "reinhard")
FIT_SCOPES = ("patch", "group")

# Every knob, per method; make_normalizer rejects anything else.
_COMMON_PARAMS = {
    "fit_scope": "patch",  # "patch": one stain estimate per patch (the thesis); "group": per slide/patient
    "min_tissue_fraction": 0.05,  # below this fraction of tissue pixels a patch is returned unchanged
    "min_eigen_ratio": 0.002,  # 2nd / 1st eigenvalue of the tissue OD covariance; below it: one stain only
    "group_max_patches": 64,  # a group's stain estimate uses at most this many evenly spaced patches
}
_METHOD_PARAMS = {
    "none": {},
    "macenko": {"io": 240.0, "alpha": 1.0, "beta": 0.15, "keep_residual": False},
    "vahadane": {
        "luminosity_threshold": 0.8,  # Lab L / 255 below this is tissue (staintools)
        "dictionary_lambda": 0.1,  # L1 weight of the sparse codes while learning the stain matrix
        "concentration_lambda": 0.01,  # L1 weight of the final concentrations
        "n_iterations": 100,  # most alternating code / dictionary updates
        "tolerance": 1e-4,  # stop once no stain OD component moves more than this in one update
        "max_fit_pixels": 1024,  # tissue pixels per estimate used to learn the dictionary
        "seed": 0,  # fixes which tissue pixels are subsampled
        "keep_residual": False,
    },
    "reinhard": {"luminosity_threshold": 0.8},
}
# keep_residual (Macenko, Vahadane): False follows torchstain / staintools, whose output is rebuilt from
# the two stains alone, so the optical density a 2-stain model cannot represent is lost (1-8 grey levels
# mean on real H&E, the reference included). True adds that residual, (I - S^T S^+) od, back unchanged
# and inverts the optical density exactly (rounded), so a patch with the reference's stains comes back
# unchanged; it also keeps whatever colour is not H&E (pigment, JPEG artefacts, a third dye).
_BOOL_PARAMS = ("keep_residual",)
# On the CPU two steps use faster NumPy/OpenCV kernels instead of the torch code every other device
# runs; False runs the device code on the CPU (the tests compare the two paths without a GPU).
CPU_KERNELS = True
_CHUNK_PIXELS = 64 * 96 * 96  # pixels per transform chunk: 64 PCam patches keep the working set in cache
_MAX_CHUNK_PATCHES = 85  # Reinhard's (patch, channel, level) index must fit 16 bits: 85 * 3 * 256 <= 65536
_STATE_VERSION = 1
# Standard H&E optical densities (Ruifrok & Johnston 2001): a deterministic start for the dictionary.
_RUIFROK_HE = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11))


class StainError(UserError):
    """A user mistake: unknown method or parameter, bad array, unusable reference, unfitted use."""


def make_normalizer(method: str, **params) -> Normalizer:
    """Build an unfitted normaliser.

    Args:
        method: one of ``METHODS``.
        **params: overrides of the method's defaults (see ``_COMMON_PARAMS`` and
            ``_METHOD_PARAMS``), e.g. ``fit_scope="group"``, ``io=240.0``.

    Returns:
        A ``Normalizer``; call ``fit`` before ``transform`` (except for ``none``).

    Raises:
        StainError: unknown method, unknown parameter or bad parameter value.
    """
    return Normalizer(method, params)


class Normalizer:
    """Stain normaliser with the same two calls for every method: ``fit(target)``, ``transform(images)``.

    Attributes:
        method: the method name.
        params: the resolved parameters (defaults plus overrides).
        n_unchanged: patches the last ``transform`` returned unchanged (too little tissue or a
            single stain).
    """

    def __init__(self, method: str, params: dict | None = None, state: dict | None = None):
        if method not in METHODS:
            raise StainError(f"unknown stain method {method!r}; expected one of {METHODS}")
        defaults = {**_COMMON_PARAMS, **_METHOD_PARAMS[method]}
        params = dict(params or {})
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise StainError(f"unknown parameter(s) {unknown} for stain method {method!r}; "
                             f"expected some of {sorted(defaults)}")
        self.method = method
        self.params = {key: params.get(key, value) for key, value in defaults.items()}
        self._check_params()
        self.state = state
        self.n_unchanged = 0

    def _check_params(self) -> None:
        p = self.params
        if p["fit_scope"] not in FIT_SCOPES:
            raise StainError(f"fit_scope={p['fit_scope']!r}; expected one of {FIT_SCOPES}")
        for key, value in p.items():
            if key in _BOOL_PARAMS:
                if not isinstance(value, bool):
                    raise StainError(f"stain parameter {key}={value!r} must be true or false")
                continue
            if key == "fit_scope":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise StainError(f"stain parameter {key}={value!r} must be a finite number")
        if not 0.0 <= p["min_tissue_fraction"] <= 1.0:
            raise StainError(f"min_tissue_fraction={p['min_tissue_fraction']} must be within [0, 1]")
        positive = ("io", "group_max_patches", "n_iterations", "max_fit_pixels", "luminosity_threshold",
                    "tolerance")
        for key in positive:
            if key in p and p[key] <= 0:
                raise StainError(f"stain parameter {key}={p[key]} must be > 0")
        if "alpha" in p and not 0.0 <= p["alpha"] < 50.0:
            raise StainError(f"alpha={p['alpha']} must be a percentile within [0, 50)")

    # ---------------------------------------------------------------- public API
    @property
    def stain_matrix(self) -> np.ndarray:
        """float64 (2, 3): fitted stain optical densities, rows hematoxylin then eosin, unit length, >= 0."""
        if self.method not in ("macenko", "vahadane"):
            raise StainError(f"stain method {self.method!r} has no stain matrix")
        self._require_fitted()
        return np.asarray(self.state["stain_matrix"], dtype=np.float64)

    def fit(self, target: np.ndarray) -> Normalizer:
        """Estimate the reference stain statistics from one image or a batch pooled together.

        Args:
            target: uint8 RGB (H, W, 3), or (N, H, W, 3) whose pixels are pooled into one estimate.

        Returns:
            self.

        Raises:
            StainError: bad array, or a target with too little tissue / a single stain.
        """
        if self.method == "none":
            self.state = {}
            return self
        target = _check_rgb(target, "fit target", allow_single=True)
        unit = target.reshape(1, -1, 1, 3)
        stains, max_conc, ok = self._estimate(self._prepare(unit, "cpu"))
        if not bool(ok[0]):
            raise StainError(f"the stain reference (shape {target.shape}) has too little tissue or a "
                             f"single stain; choose another reference image")
        state = {"target_shape": list(target.shape),
                 "target_md5": hashlib.md5(np.ascontiguousarray(target).tobytes()).hexdigest()}
        if self.method == "reinhard":
            state["lab_mean"] = stains[0, 0].tolist()
            state["lab_std"] = stains[0, 1].tolist()
        else:
            matrix = stains[0].double()
            if bool((matrix < -0.05).any()):
                raise StainError(f"the stain reference gives negative stain optical densities "
                                 f"{matrix.tolist()}; choose another reference image")
            # Rounding-level negatives are clipped so the recorded matrix is non-negative, unit length.
            matrix = matrix.clamp(min=0.0)
            matrix = matrix / matrix.norm(dim=1, keepdim=True)
            state["stain_matrix"] = matrix.tolist()
            state["max_concentration"] = max_conc[0].double().tolist()
        self.state = state
        return self

    def transform(self, images: np.ndarray, groups: np.ndarray | None = None,
                  device: str = "cpu") -> np.ndarray:
        """Normalise a batch of patches to the fitted reference.

        Args:
            images: uint8 RGB (N, H, W, 3).
            groups: (N,) slide/patient id of each patch; required when ``fit_scope="group"``
                (the source stains are estimated once per distinct id), ignored otherwise.
            device: torch device for the arithmetic, "cpu" or "cuda". On the CPU, chunks of at most
                85 patches run side by side on ``torch.get_num_threads()`` threads, each chunk
                single-threaded; torch's thread count is 1 during the call and restored after it.

        Returns:
            uint8 RGB (N, H, W, 3); patches with too little tissue are copied unchanged and counted
            in ``self.n_unchanged``. The same for any chunking and thread count.

        Raises:
            StainError: unfitted normaliser, bad array, missing or misshaped ``groups``, bad device.
        """
        images = _check_rgb(images, "images", allow_single=False)
        self.n_unchanged = 0
        if self.method == "none":
            return images.copy()
        self._require_fitted()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise StainError(f"device={device!r} requested but CUDA is not available")
        n, height, width, _ = images.shape
        chunk = max(1, min(_CHUNK_PIXELS // (height * width), _MAX_CHUNK_PATCHES))
        out = np.empty_like(images)
        if self.params["fit_scope"] == "group":
            group_index, group_stains, group_conc, group_ok = self._estimate_groups(images, groups, device)

        def normalise_chunk(start: int) -> int:
            """Normalise images[start:start + chunk] into out; returns how many were left unchanged."""
            batch = images[start:start + chunk]
            features = self._prepare(batch, device)
            if self.params["fit_scope"] == "group":
                rows = torch.as_tensor(group_index[start:start + chunk], device=device)
                source = (group_stains[rows], group_conc[rows], group_ok[rows])
            else:
                source = self._estimate(features)
            normalised, ok = self._apply(batch, features, source)
            out[start:start + chunk] = normalised
            return int((~ok).sum())

        starts = range(0, n, chunk)
        if device != "cpu" or torch.get_num_threads() == 1 or len(starts) == 1:
            self.n_unchanged = sum(map(normalise_chunk, starts))
            return out
        # On the CPU the chunks run side by side on torch's thread budget, each single-threaded:
        # a chunk's ops are too small for intra-op threads to pay off, and on a busy machine their
        # barriers stall every op (measured 3-4x slower than one thread). Chunks are independent,
        # so the output does not depend on the thread count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # process-wide while the chunks run; restored below
        try:
            with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
                self.n_unchanged = sum(pool.map(normalise_chunk, starts))
        finally:
            torch.set_num_threads(threads)
        return out

    def to_json(self) -> str:
        """The method, resolved parameters and fitted state as a JSON string (floats kept exactly)."""
        return json.dumps({"version": _STATE_VERSION, "method": self.method, "params": self.params,
                           "state": self.state})

    @classmethod
    def from_json(cls, text: str) -> Normalizer:
        """Rebuild a normaliser from ``to_json`` output; its transforms are bit-identical.

        Raises:
            StainError: text that is not a saved normaliser.
        """
        try:
            saved = json.loads(text)
            method, params, state = saved["method"], saved["params"], saved["state"]
        except (json.JSONDecodeError, TypeError, KeyError) as error:
            raise StainError(f"not a saved stain normaliser: {error}") from None
        if saved.get("version") != _STATE_VERSION:
            raise StainError(f"saved stain normaliser has version {saved.get('version')!r}, "
                             f"expected {_STATE_VERSION}")
        return cls(method, params, state)

    # ---------------------------------------------------------------- estimation
    def _require_fitted(self) -> None:
        if self.state is None:
            raise StainError(f"stain normaliser {self.method!r} is not fitted; call fit(reference) first")

    def _prepare(self, images: np.ndarray, device: str) -> tuple[torch.Tensor, ...]:
        """Per-pixel features of images (U, H, W, 3), computed once per chunk: (od (U, 3, P),
        tissue (U, P) bool), or (Lab level index uint16 (U, P, 3), tissue, tissue OD covariance
        (U, 3, 3), Lab level histogram (U, 3, 256)) for Reinhard."""
        if self.method == "macenko":
            od = _optical_density(images, self.params["io"], 1.0, device)
            # OD falls as intensity rises, so "every channel >= beta" is "the smallest OD >= beta".
            tissue = torch.minimum(torch.minimum(od[:, 0], od[:, 1]), od[:, 2]) >= self.params["beta"]
            return od, tissue
        lab8 = _lab8(images)
        tissue = torch.as_tensor(_luminosity_mask(lab8, self.params["luminosity_threshold"]), device=device)
        if self.method == "vahadane":
            return _optical_density(images, 255.0, 0.0, device), tissue
        # Reinhard needs no stains, but the same patches are skipped for every method: the tissue OD
        # covariance feeds the single-stain test.
        index = _level_index(lab8)
        return (index, tissue, _tissue_od_covariance(images, tissue),
                torch.as_tensor(_level_histogram(index), device=device))

    def _estimate(self, features: tuple[torch.Tensor, ...]):
        """Per-image stain estimate: (stains (U, 2, 3), max_conc (U, 2), ok (U,)) for Macenko/Vahadane,
        (lab stats (U, 2, 3) = [mean, std], unused (U, 2), ok (U,)) for Reinhard."""
        if self.method == "macenko":
            return _macenko_estimate(*features, self.params)
        if self.method == "vahadane":
            return _vahadane_estimate(*features, self.params)
        return _reinhard_estimate(*features, self.params)

    def _estimate_groups(self, images: np.ndarray, groups: np.ndarray | None, device: str):
        """One estimate per distinct group from at most ``group_max_patches`` evenly spaced patches."""
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
            estimates.append(self._estimate(self._prepare(pooled, device)))
        stains, conc, ok = (torch.cat(parts) for parts in zip(*estimates, strict=True))
        return index, stains, conc, ok

    # ---------------------------------------------------------------- application
    def _apply(self, images: np.ndarray, features, source) -> tuple[np.ndarray, torch.Tensor]:
        """Map images (n, H, W, 3) with their features and per-image source estimates to the
        reference; unusable ones are copied. Returns (uint8 (n, H, W, 3), ok (n,) bool)."""
        stains, max_conc, ok = source
        od = features[0]
        if self.method == "reinhard":
            return _reinhard_apply(images, od, stains, ok, self.state)
        target_stains = torch.tensor(self.state["stain_matrix"], device=od.device).float()
        target_max = torch.tensor(self.state["max_concentration"], device=od.device).float()
        scale = target_max / max_conc.clamp(min=1e-6)  # (n, 2)
        # A non-finite output can only come from non-finite per-patch factors: the optical densities
        # are finite table values, usable patches have max_conc > 1e-6 and distinct unit stains (a
        # bounded unmixing), and exp(-x) overflows only to +inf, which the clamp turns into 255. So
        # the few per-patch scalars are checked instead of every output value, and unusable patches
        # get zero factors so that no NaN is ever cast to uint8.
        keep_residual = self.params["keep_residual"]
        if self.method == "macenko":
            io = float(self.params["io"])
            # Unmix, rescale and remix fold into one 3x3 matrix per patch; so does keeping the residual.
            unmix = _pseudo_inverse(stains)
            mixing = target_stains.T @ (scale[:, :, None] * unmix)
            if keep_residual:
                mixing = mixing + torch.eye(3, device=od.device) - stains.transpose(1, 2) @ unmix
            ok = ok & torch.isfinite(mixing).all(dim=2).all(dim=1)
            mixing = torch.where(ok[:, None, None], mixing, 0.0)
            rgb = io * torch.exp(-(mixing @ od))
            # torchstain truncates io * exp(-od) = I + 1; the exact inverse of od = -log((I + 1) / io) is
            # io * exp(-od) - 1, rounded.
            rgb = (rgb - 1.0).round().clamp(0.0, 255.0) if keep_residual else rgb.clamp(max=255.0)
        else:
            ok = ok & torch.isfinite(stains).all(dim=2).all(dim=1) & torch.isfinite(scale).all(dim=1)
            stains = torch.where(ok[:, None, None], stains, torch.eye(2, 3, device=od.device))
            scale = torch.where(ok[:, None], scale, 0.0)
            conc = _nonneg_lasso(stains, od, self.params["concentration_lambda"])
            mixed = target_stains.T @ (conc * scale[:, :, None])
            if keep_residual:
                mixed = mixed + od - stains.transpose(1, 2) @ conc
            rgb = 255.0 * torch.exp(-mixed)
            rgb = rgb.round().clamp(0.0, 255.0) if keep_residual else rgb
        n, height, width, _ = images.shape
        out = rgb.to(torch.uint8).permute(0, 2, 1).reshape(n, height, width, 3).cpu().numpy()
        return _keep_unusable(out, images, ok)


def load_normalizer(text: str) -> Normalizer:
    """Same as ``Normalizer.from_json``: rebuild a saved normaliser from its JSON string."""
    return Normalizer.from_json(text)


def _check_rgb(images, what: str, allow_single: bool) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise StainError(f"{what} must be a uint8 numpy array, got "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    ok_ndim = (3, 4) if allow_single else (4,)
    if images.ndim not in ok_ndim or images.shape[-1] != 3 or 0 in images.shape:
        expected = "(H, W, 3) or (N, H, W, 3)" if allow_single else "(N, H, W, 3)"
        raise StainError(f"{what} must be RGB {expected}, got shape {images.shape}")
    return np.ascontiguousarray(images if images.ndim == 4 else images[None])


def _optical_density(images: np.ndarray, io: float, offset: float, device: str) -> torch.Tensor:
    """float32 (n, 3, P) optical density -log((I + offset) / io) through a 256-entry lookup table.

    offset 1 is torchstain's convention; offset 0 is staintools' (I = 0 read as 1, OD >= 1e-6)."""
    table = _od_table(io, offset)
    n = len(images)
    channel_first = np.ascontiguousarray(images.reshape(n, -1, 3).transpose(0, 2, 1))
    if device == "cpu" and CPU_KERNELS:
        # OpenCV's table lookup reads the uint8 index directly and is several times faster than
        # numpy's or torch's gathers, which first widen the index to int64.
        rows = channel_first.reshape(n * 3, -1)
        return torch.from_numpy(cv2.LUT(rows, table.astype(np.float32)).reshape(n, 3, -1))
    lut = torch.tensor(table, dtype=torch.float32, device=device)
    return lut[torch.as_tensor(channel_first, device=device).long()]


def _od_table(io: float, offset: float) -> np.ndarray:
    """float64 (256,) optical density of each 8-bit level (see ``_optical_density``)."""
    levels = np.arange(256, dtype=np.float64)
    if offset == 0.0:
        return np.maximum(-np.log(np.maximum(levels, 1.0) / io), 1e-6)
    return -np.log((levels + offset) / io)


def _lab8(images: np.ndarray) -> np.ndarray:
    """uint8 (n, P, 3) OpenCV 8-bit Lab (L * 255 / 100, a + 128, b + 128) of uint8 RGB (n, H, W, 3).

    The patches are stacked into one tall image so that OpenCV converts the batch in one call."""
    mosaic = np.ascontiguousarray(images.reshape(-1, images.shape[2], 3))
    return cv2.cvtColor(mosaic, cv2.COLOR_RGB2LAB).reshape(len(images), -1, 3)


def _luminosity_mask(lab8: np.ndarray, threshold: float) -> np.ndarray:
    """bool (n, P): L / 255 < threshold on OpenCV 8-bit Lab (n, P, 3) (staintools' tissue mask)."""
    # L / 255 grows with L, so the test holds exactly for the levels below the first one failing it.
    passing_levels = int((np.arange(256) / 255.0 < threshold).sum())
    return lab8[..., 0] < passing_levels


def _lab_scale(lab8_levels: np.ndarray) -> np.ndarray:
    """float32 Lab as staintools scales OpenCV's 8-bit Lab (..., 3): L in [0, 100], a and b centred on 0."""
    lab = lab8_levels.astype(np.float32)
    lab[..., 0] /= 2.55
    lab[..., 1:] -= 128.0
    return lab


def _level_index(lab8: np.ndarray) -> np.ndarray:
    """uint16 (n, P, 3): (patch * 3 + channel) * 256 + level of 8-bit Lab (n, P, 3), n <= 85.

    One 16-bit index addresses every (patch, channel) 256-entry table of a chunk, so that OpenCV's
    16-bit table lookup and histogram treat the whole chunk in one call each."""
    n = len(lab8)
    if n * 3 * 256 > 65536:
        raise ValueError(f"_level_index takes at most {_MAX_CHUNK_PATCHES} patches, got {n}")
    channel_levels = (np.arange(256)[:, None] + 256 * np.arange(3)).astype(np.uint16)[None]  # (1, 256, 3)
    index = cv2.LUT(lab8, channel_levels)
    index += (np.arange(n, dtype=np.uint16) * 768)[:, None, None]
    return index


def _level_histogram(index: np.ndarray) -> np.ndarray:
    """float64 (n, 3, 256) pixel count of each 8-bit Lab level per patch and channel, from ``_level_index``."""
    n = len(index)
    counts = cv2.calcHist([index.reshape(-1, 3)], [0], None, [n * 768], [0, n * 768])
    return counts.astype(np.float64).reshape(n, 3, 256)


def _percentile(values: torch.Tensor, mask: torch.Tensor | None, q: float) -> torch.Tensor:
    """(U,) q-th percentile (numpy's linear rule) of values (U, L) over mask (U, L) per row.

    mask None means every value. Only the few extreme values are ordered (a partial selection, not
    a full sort); rows with an empty mask give non-finite values that callers flag."""
    length = values.shape[1]
    if mask is None:
        count = torch.full((len(values),), length, device=values.device)
    else:
        count = _count_true(mask)
    position = (count - 1).clamp(min=0).double() * (q / 100.0)
    low = position.floor().long()
    frac = (position - low).to(values.dtype)
    if q <= 50.0:
        k = min(length, int(low.max()) + 2)
        filled = values if mask is None else values.masked_fill(~mask, math.inf)
        top = _extremes(filled, k, largest=False)
        first, second = low, low + 1
    else:
        k = max(1, min(length, int((count - 1 - low).max()) + 1))
        filled = values if mask is None else values.masked_fill(~mask, -math.inf)
        top = _extremes(filled, k, largest=True)
        first, second = count - 1 - low, count - 2 - low
    a = top.gather(1, first.clamp(0, k - 1)[:, None])[:, 0]
    b = top.gather(1, second.clamp(0, k - 1)[:, None])[:, 0]
    return torch.where(frac > 0, a + frac * (b - a), a)


def _extremes(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """(U, k) the k largest (descending) or smallest (ascending) values of each row of values (U, L)."""
    if values.device.type != "cpu" or not CPU_KERNELS:
        return values.topk(k, dim=1, largest=largest).values
    # On the CPU numpy's introselect partition is ~5x faster than torch.topk; only the k-wide
    # block it isolates is then sorted.
    array = values.numpy()
    length = array.shape[1]
    if largest:
        # copy(): a reversed view keeps a negative stride even when numpy deems it contiguous (k = 1).
        block = np.sort(np.partition(array, length - k, axis=1)[:, length - k:], axis=1)[:, ::-1].copy()
    else:
        block = np.sort(np.partition(array, k - 1, axis=1)[:, :k], axis=1)
    return torch.from_numpy(block)


def _pseudo_inverse(stains: torch.Tensor) -> torch.Tensor:
    """(U, 2, 3) least-squares unmixing matrix (S S^T)^-1 S of stain rows S (U, 2, 3)."""
    gram = stains.double() @ stains.double().transpose(1, 2)
    det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
    adjugate = torch.stack([torch.stack([gram[:, 1, 1], -gram[:, 0, 1]], -1),
                            torch.stack([-gram[:, 1, 0], gram[:, 0, 0]], -1)], -2)
    return (adjugate / det[:, None, None] @ stains.double()).float()


def _second_eigen_ratio(od: torch.Tensor, tissue: torch.Tensor):
    """Eigen-decomposition of the tissue OD covariance (ddof 1) per row of od (U, 3, L).

    Returns (eigenvalues (U, 3) ascending, eigenvectors (U, 3, 3) float64, 2nd/1st eigenvalue (U,))."""
    weight = tissue.to(od.dtype)[:, None, :]
    count = _count_true(tissue).clamp(min=2).to(od.dtype)
    weighted = od * weight
    mean = weighted.sum(dim=2) / count[:, None]
    # od * w - mean * w equals (od - mean) * w for w in {0, 1}, in one pass instead of two.
    centred = torch.addcmul(weighted, mean[:, :, None], weight, value=-1.0)
    return _eigen_ratio((centred @ centred.transpose(1, 2)).double() / (count - 1).double()[:, None, None])


def _eigen_ratio(cov: torch.Tensor):
    """(eigenvalues (U, 3) ascending, eigenvectors (U, 3, 3), 2nd/1st eigenvalue (U,)) of cov (U, 3, 3)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    ratio = eigenvalues[:, 1] / eigenvalues[:, 2].clamp(min=1e-12)
    return eigenvalues, eigenvectors, ratio


def _tissue_od_covariance(images: np.ndarray, tissue: torch.Tensor) -> torch.Tensor:
    """float64 (n, 3, 3) tissue OD covariance (Io 255, offset 0) of images (n, H, W, 3), n <= 85, bit-identical
    to ``_second_eigen_ratio``'s, without a full OD array.

    Each pixel value becomes a 16-bit (patch, channel, level) index, non-tissue pixels a spare index;
    two 65,536-entry table lookups then give the masked OD and the centred masked OD directly, with the
    same float32 values (and so the same sums) as the OD route. Reinhard needs no OD otherwise."""
    n = len(images)
    channel_first = np.ascontiguousarray(images.reshape(n, -1, 3).transpose(0, 2, 1))
    index = np.add(channel_first, (np.arange(n * 3, dtype=np.uint16) * 256).reshape(n, 3, 1), dtype=np.uint16)
    np.copyto(index, 65535, where=~tissue.cpu().numpy()[:, None, :])  # n * 768 <= 65280 leaves it spare
    levels = _od_table(255.0, 0.0).astype(np.float32)
    table = np.zeros(65536, np.float32)
    table[:n * 768] = np.tile(levels, n * 3)
    masked = torch.from_numpy(cv2.LUT(index.reshape(n * 3, -1), table).reshape(n, 3, -1))
    count = _count_true(tissue.cpu()).clamp(min=2).float()
    mean = masked.sum(dim=2) / count[:, None]
    table[:n * 768] = (levels - mean.numpy()[:, :, None]).ravel()
    centred = torch.from_numpy(cv2.LUT(index.reshape(n * 3, -1), table).reshape(n, 3, -1))
    cov = (centred @ centred.transpose(1, 2)).double() / (count - 1).double()[:, None, None]
    return cov.to(tissue.device)


def _count_true(mask: torch.Tensor) -> torch.Tensor:
    """int32 (U,) True entries per row of a bool (U, L) mask; summing its bytes is ~2x faster than a bool sum."""
    return mask.view(torch.uint8).sum(dim=1, dtype=torch.int32)


def _enough_tissue(tissue: torch.Tensor, params: dict) -> torch.Tensor:
    count = _count_true(tissue)
    return (count >= 3) & (count >= params["min_tissue_fraction"] * tissue.shape[1])


def _macenko_estimate(od: torch.Tensor, tissue: torch.Tensor, params: dict):
    """Macenko stains (U, 2, 3), 99th-percentile concentrations (U, 2) and ok (U,) from od (U, 3, L)
    and its tissue mask (U, L)."""
    _, eigenvectors, ratio = _second_eigen_ratio(od, tissue)
    plane = eigenvectors[:, :, 1:3].float()  # the two largest principal axes
    projected = plane.transpose(1, 2) @ od
    angle = torch.atan2(projected[:, 1], projected[:, 0])
    angles = torch.stack([_percentile(angle, tissue, params["alpha"]),
                          _percentile(angle, tissue, 100.0 - params["alpha"])], dim=1)
    extremes = plane @ torch.stack([angles.cos(), angles.sin()], dim=1)  # (U, 3, 2): [v_min, v_max]
    # Hematoxylin absorbs more red than eosin: the vector with the larger red OD goes first.
    min_first = extremes[:, 0, 0] > extremes[:, 0, 1]
    stains = torch.where(min_first[:, None, None], extremes, extremes.flip(2)).transpose(1, 2)
    conc = _pseudo_inverse(stains) @ od
    max_conc = _percentile(conc.reshape(-1, conc.shape[2]), None, 99.0).reshape(-1, 2)
    ok = _stains_usable(stains, max_conc, ratio, tissue, params)
    return stains, max_conc, ok


def _stains_usable(stains, max_conc, ratio, tissue, params) -> torch.Tensor:
    """ok (U,): enough tissue, two distinct stains, finite and positive concentrations."""
    cosine = (stains[:, 0] * stains[:, 1]).sum(dim=1)
    return (_enough_tissue(tissue, params) & (ratio >= params["min_eigen_ratio"])
            & torch.isfinite(stains).all(dim=2).all(dim=1) & (cosine.abs() < 0.995)
            & torch.isfinite(max_conc).all(dim=1) & (max_conc > 1e-6).all(dim=1))


def _nonneg_lasso(stains: torch.Tensor, od: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact per-pixel argmin_c>=0 0.5 ||y - S^T c||^2 + lam * sum(c) for two stains.

    Args:
        stains: float32 (U, 2, 3) stain rows S.
        od: float32 (U, 3, L) pixels y.
        lam: L1 weight.

    Returns:
        float32 (U, 2, L) non-negative concentrations (SPAMS ``lasso(mode=2, pos=True)`` optimum).
    """
    gram = stains @ stains.transpose(1, 2)  # (U, 2, 2)
    corr = stains @ od - lam  # (U, 2, L): S y - lam
    g00, g01, g11 = gram[:, 0, 0, None], gram[:, 0, 1, None], gram[:, 1, 1, None]
    det = g00 * g11 - g01 * g01
    both0 = (g11 * corr[:, 0] - g01 * corr[:, 1]) / det
    both1 = (g00 * corr[:, 1] - g01 * corr[:, 0]) / det
    both_ok = (both0 >= 0) & (both1 >= 0) & (det > 1e-8 * g00 * g11)
    # Otherwise the optimum has one stain at zero: take the single-stain solution that lowers
    # the objective more (its decrease is corr^2 / (2 g)).
    only0 = corr[:, 0].clamp(min=0) / g00
    only1 = corr[:, 1].clamp(min=0) / g11
    first_better = only0 * corr[:, 0].clamp(min=0) >= only1 * corr[:, 1].clamp(min=0)
    c0 = torch.where(both_ok, both0, torch.where(first_better, only0, 0.0))
    c1 = torch.where(both_ok, both1, torch.where(first_better, 0.0, only1))
    return torch.stack([c0, c1], dim=1)


def _vahadane_estimate(od: torch.Tensor, tissue: torch.Tensor, params: dict):
    """Vahadane stains (U, 2, 3), 99th-percentile concentrations (U, 2) and ok (U,) from od (U, 3, L).

    Sparse non-negative dictionary learning (2 atoms, norm <= 1) on at most ``max_fit_pixels``
    tissue pixels, by alternating exact non-negative lasso codes and block-coordinate dictionary
    updates (Mairal et al. 2010, the algorithm behind SPAMS' trainDL), from the standard H&E
    stains; deterministic and batched over U."""
    units, _, length = od.shape
    _, _, ratio = _second_eigen_ratio(od, tissue)
    # The first k tissue pixels in a seeded random order of pixel positions form the sample; the
    # order depends only on the seed and the image size, never on the batch.
    generator = torch.Generator().manual_seed(int(params["seed"]))
    order = torch.randperm(length, generator=generator).to(od.device)
    k = min(length, int(params["max_fit_pixels"]))
    tissue_in_order = tissue[:, order]
    rank = tissue_in_order.cumsum(dim=1) - 1
    slot = torch.where(tissue_in_order & (rank < k), rank, k)  # column k collects the discarded
    picked = torch.zeros(units, k + 1, dtype=torch.long, device=od.device)
    picked.scatter_(1, slot, order.expand(units, length))
    picked = picked[:, :k]
    weight = (torch.arange(k, device=od.device) < tissue.sum(dim=1, keepdim=True)).to(od.dtype)
    sample = od.gather(2, picked[:, None, :].expand(units, 3, k))
    dictionary = torch.tensor(_RUIFROK_HE, device=od.device).float()
    dictionary = (dictionary / dictionary.norm(dim=1, keepdim=True)).expand(units, 2, 3).clone()
    # Each unit iterates until its dictionary moves less than the tolerance; converged units leave
    # the working set, so a unit's result does not depend on the rest of the batch.
    active = torch.arange(units, device=od.device)
    current = dictionary
    for _ in range(int(params["n_iterations"])):
        updated = _dictionary_step(current, sample, weight, params["dictionary_lambda"])
        moving = (updated - current).abs().amax(dim=(1, 2)) > params["tolerance"]
        dictionary[active] = updated
        if not bool(moving.all()):
            active, current = active[moving], updated[moving]
            sample, weight = sample[moving], weight[moving]
        else:
            current = updated
        if len(active) == 0:
            break
    stains = dictionary / dictionary.norm(dim=2, keepdim=True).clamp(min=1e-12)
    # Hematoxylin absorbs more red than eosin: larger red OD first (staintools' rule).
    swap = stains[:, 0, 0] < stains[:, 1, 0]
    stains = torch.where(swap[:, None, None], stains.flip(1), stains)
    conc = _nonneg_lasso(stains, od, params["concentration_lambda"])
    max_conc = _percentile(conc.reshape(-1, conc.shape[2]), None, 99.0).reshape(-1, 2)
    ok = _stains_usable(stains, max_conc, ratio, tissue, params)
    return stains, max_conc, ok


def _dictionary_step(dictionary: torch.Tensor, sample: torch.Tensor, weight: torch.Tensor,
                     lam: float) -> torch.Tensor:
    """One code update and one block-coordinate pass over the 2 atoms (Mairal et al. 2010, Alg. 2).

    Args:
        dictionary: float32 (U, 2, 3) atoms as rows, non-negative, norm <= 1.
        sample: float32 (U, 3, k) tissue optical densities.
        weight: float32 (U, k) 1 for real pixels, 0 for padding.
        lam: L1 weight of the codes.

    Returns:
        float32 (U, 2, 3) updated atoms.
    """
    codes = _nonneg_lasso(dictionary, sample, lam) * weight[:, None, :]
    code_gram = codes @ codes.transpose(1, 2)  # (U, 2, 2) = A
    data_codes = codes @ sample.transpose(1, 2)  # (U, 2, 3) = B^T
    dictionary = dictionary.clone()
    for atom in range(2):
        a_jj = code_gram[:, atom, atom, None]
        residual = data_codes[:, atom] - (code_gram[:, atom, :, None] * dictionary).sum(dim=1)
        update = (dictionary[:, atom] + residual / a_jj.clamp(min=1e-12)).clamp(min=0.0)
        update = update / update.norm(dim=1, keepdim=True).clamp(min=1.0)
        # An atom no pixel uses keeps its value instead of collapsing to zero.
        used = (a_jj > 1e-12) & (update.norm(dim=1, keepdim=True) > 1e-6)
        dictionary[:, atom] = torch.where(used, update, dictionary[:, atom])
    return dictionary


def _reinhard_estimate(index: np.ndarray, tissue: torch.Tensor, cov: torch.Tensor, histogram: torch.Tensor,
                       params: dict):
    """Reinhard Lab statistics (U, 2, 3) = [mean, std (ddof 0)], a dummy (U, 2) and ok (U,).

    Args:
        index: uint16 (U, P, 3) Lab level index (``_level_index``); unused here.
        tissue: bool (U, P) luminosity tissue mask.
        cov: float64 (U, 3, 3) tissue OD covariance, for the single-stain test.
        histogram: float64 (U, 3, 256) pixel count per patch, Lab channel and 8-bit level.
        params: the normaliser's parameters.
    """
    values = torch.as_tensor(_lab_levels().T, device=histogram.device).double()  # (3, 256)
    count = histogram.sum(dim=2)
    # Counts times float32 values add up exactly in float64, so the mean equals a per-pixel one.
    mean = (histogram * values).sum(dim=2) / count
    std = ((histogram * (values - mean[:, :, None]) ** 2).sum(dim=2) / count).sqrt()
    _, _, ratio = _eigen_ratio(cov)
    ok = _enough_tissue(tissue, params) & (std > 1e-3).all(dim=1) & (ratio >= params["min_eigen_ratio"])
    stats = torch.stack([mean, std], dim=1)
    return stats, torch.ones(len(histogram), 2, device=histogram.device), ok


def _reinhard_apply(images: np.ndarray, index: np.ndarray, stats: torch.Tensor, ok: torch.Tensor, state: dict):
    """Per-channel Lab mean/std transfer, clipped and truncated to 8 bits, back to RGB with OpenCV.

    An 8-bit Lab channel takes at most 256 values, so each patch's transfer is a 256-entry table per
    channel, computed with the per-pixel formula and applied through the level index."""
    device = stats.device
    levels = torch.as_tensor(_lab_levels(), device=device).double()  # (256, 3)
    # float64 like staintools, whose float32 Lab meets float64 statistics from cv2.meanStdDev.
    target_mean = torch.tensor(state["lab_mean"], device=device, dtype=torch.float64)
    target_std = torch.tensor(state["lab_std"], device=device, dtype=torch.float64)
    mean, std = stats[:, 0], stats[:, 1]
    gain = (target_std / std.clamp(min=1e-12))[:, None, :]
    table = (levels - mean[:, None, :]) * gain + target_mean  # (U, 256, 3)
    table[..., 0] *= 2.55
    table[..., 1:] += 128.0
    ok = ok & torch.isfinite(table).all(dim=2).all(dim=1)
    table8 = table.nan_to_num(0.0).clamp(0.0, 255.0).to(torch.uint8).transpose(1, 2).cpu().numpy()
    flat = np.zeros(65536, np.uint8)
    flat[:table8.size] = table8.ravel()  # (patch, channel, level) order, as the index counts
    shifted = cv2.LUT(index, flat)
    rgb = cv2.cvtColor(shifted.reshape(-1, images.shape[2], 3), cv2.COLOR_LAB2RGB).reshape(images.shape)
    return _keep_unusable(rgb, images, ok)


def _lab_levels() -> np.ndarray:
    """float32 (256, 3): staintools' Lab value of each 8-bit OpenCV Lab level, per channel."""
    return _lab_scale(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))


def _keep_unusable(out: np.ndarray, images: np.ndarray, ok: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Copy the unusable patches of images (n, H, W, 3) back into out in place; returns (out, ok (n,) on CPU)."""
    ok = ok.cpu()
    unusable = ~ok.numpy()
    out[unusable] = images[unusable]
    return out, ok
