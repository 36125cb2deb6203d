"""Stain normalisation of H&E patches: one fit/transform API for every method, batched in torch.

The thesis mixes PatchCamelyon and DLBCL-Morph; their stain colours differ so much that a feature
clustering can tell the datasets apart. Stain normalisation maps every patch onto the colours of one
reference. One class per method, each readable on its own:

- ``none`` (``Identity``): patches unchanged.
- ``macenko`` (``common.stain_macenko.Macenko``): Macenko et al., ISBI 2009; torchstain 1.4.1's conventions.
- ``vahadane`` (``common.stain_vahadane.Vahadane``): Vahadane et al., IEEE TMI 2016; staintools 2.1.2's
  conventions, solved without SPAMS.
- ``reinhard`` (``common.stain_reinhard.Reinhard``): Reinhard et al., IEEE CG&A 2001, in OpenCV's 8-bit
  Lab as staintools 2.1.2 and tiatoolbox do.

Every method has ``fit(reference)``, ``transform(patches, groups=None)``, ``to_json()`` and
``from_json()``; the shared pieces (optical density, percentiles, tissue masks, chunked batching, the
CPU/device kernels) are plain functions in ``common.stain_ops``.

Inputs: uint8 RGB patches ``(N, H, W, 3)``; a reference image ``(H, W, 3)`` or batch.
Outputs: uint8 patches of the same shape; the fitted state as JSON.

Patches with too little tissue to estimate their stains (white or black glass, a flat colour, a
single stain) are returned unchanged and counted in ``n_unchanged``; a transform never produces NaN or
Inf and never raises on such patches.

Usage::

    normalizer = make_normalizer("macenko", fit_scope="group", beta=0.15)
    normalizer.fit(reference_rgb)
    out = normalizer.transform(patches, groups=patient_ids)
    state = normalizer.to_json()          # from_json(state) gives identical output
"""

from __future__ import annotations

import numpy as np

from common.stain_macenko import Macenko
from common.stain_ops import FIT_SCOPES, StainError, StainNormalizer, check_rgb, parse_saved
from common.stain_reinhard import Reinhard
from common.stain_vahadane import Vahadane

__all__ = ["FIT_SCOPES", "METHODS", "Identity", "Macenko", "Reinhard", "StainError", "Vahadane", "from_json",
           "make_normalizer"]


class Identity(StainNormalizer):
    """The ``none`` method: every patch unchanged (a copy); fit records nothing."""

    method = "none"
    changes_pixels = False

    def fit(self, reference: np.ndarray | None = None) -> Identity:
        self.state = {}
        return self

    def transform(self, images: np.ndarray, groups: np.ndarray | None = None, device: str = "cpu",
                  workers: int = 1) -> np.ndarray:
        """A copy of uint8 RGB (N, H, W, 3) images (the same arguments as every method)."""
        self.n_unchanged = 0
        return check_rgb(images, "images", allow_single=False).copy()


_CLASSES = {cls.method: cls for cls in (Identity, Macenko, Vahadane, Reinhard)}
METHODS = tuple(_CLASSES)


def make_normalizer(method: str, **params) -> StainNormalizer:
    """Build an unfitted normaliser by name; the one place that chooses a class from a method name.

    Args:
        method: one of ``METHODS``.
        **params: overrides of ``stain_ops.COMMON_PARAMS`` and the method's ``defaults``,
            e.g. ``fit_scope="group"``, ``io=240.0``.

    Returns:
        The method's normaliser; call ``fit`` before ``transform``.

    Raises:
        StainError: unknown method, unknown parameter or bad parameter value.
    """
    if method not in _CLASSES:
        raise StainError(f"unknown stain method {method!r}; expected one of {METHODS}")
    return _CLASSES[method](**params)


def from_json(text: str) -> StainNormalizer:
    """Rebuild any saved normaliser (``to_json`` output); its transforms are bit-identical.

    Raises:
        StainError: text that is not a saved normaliser.
    """
    method, _, _ = parse_saved(text)
    if method not in _CLASSES:
        raise StainError(f"saved stain normaliser has unknown method {method!r}")
    return _CLASSES[method].from_json(text)
