"""Macenko stain normalisation, batched in torch (shared pieces in ``common.stain_ops``)."""

from __future__ import annotations

import numpy as np
import torch

from common.stain_ops import (
    TwoStainNormalizer,
    h_then_e,
    keep_unusable,
    max_concentrations,
    optical_density,
    percentile,
    pseudo_inverse,
    stains_usable,
    tissue_od_eigen,
)


class Macenko(TwoStainNormalizer):
    """Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009,
    with the conventions of torchstain 1.4.1's numpy ``MacenkoNormalizer``.

    Per patch (or group): optical density OD = -log((I + 1) / io); tissue = pixels whose every OD
    channel is >= beta; the plane of the two largest eigenvectors of the tissue OD covariance; the
    alpha-th and (100 - alpha)-th percentiles of the tissue pixels' angles in that plane give the two
    stain vectors, hematoxylin first (the assignment closest to Ruifrok-Johnston's H and E, where
    torchstain puts the larger red OD first); concentrations by least squares over all pixels, scaled
    so that each stain's 99th percentile matches the reference's; remixed with the reference's stains.

    Usage::

        out = Macenko(beta=0.15).fit(reference_rgb).transform(patches)
    """

    method = "macenko"
    defaults = {
        "io": 240.0,  # 8-bit level of the unattenuated light
        "alpha": 1.0,  # percentile (%) of the stain-plane angles taken as the stain directions
        "beta": 0.15,  # OD; pixels with any channel below it are background
        # False (torchstain) rebuilds each patch from its two stains alone, losing the optical density
        # they cannot represent; True adds that residual back and inverts the OD exactly.
        "keep_residual": False,
    }

    def _features(self, images: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(od float32 (U, 3, P), tissue bool (U, P)) of images (U, H, W, 3)."""
        od = optical_density(images, self.params["io"], 1.0, device)
        # OD falls as intensity rises, so "every channel >= beta" is "the smallest OD >= beta".
        tissue = torch.minimum(torch.minimum(od[:, 0], od[:, 1]), od[:, 2]) >= self.params["beta"]
        return od, tissue

    def _estimate(self, features: tuple[torch.Tensor, torch.Tensor]):
        """(stains (U, 2, 3), 99th-percentile concentrations (U, 2), ok (U,))."""
        od, tissue = features
        _, eigenvectors, ratio = tissue_od_eigen(od, tissue)
        plane = eigenvectors[:, :, 1:3].float()  # the two largest principal axes
        projected = plane.transpose(1, 2) @ od
        angle = torch.atan2(projected[:, 1], projected[:, 0])
        alpha = self.params["alpha"]
        angles = torch.stack([percentile(angle, tissue, alpha), percentile(angle, tissue, 100.0 - alpha)], dim=1)
        extremes = plane @ torch.stack([angles.cos(), angles.sin()], dim=1)  # (U, 3, 2): [v_min, v_max]
        stains = h_then_e(extremes.transpose(1, 2))
        max_conc = max_concentrations(pseudo_inverse(stains) @ od)
        return stains, max_conc, stains_usable(stains, max_conc, ratio, tissue, self.params)

    def _apply(self, images: np.ndarray, features, source) -> tuple[np.ndarray, torch.Tensor]:
        """uint8 (n, H, W, 3) remixed with the reference stains, and ok (n,); unusable patches copied."""
        od = features[0]
        stains, max_conc, ok = source
        target_stains, scale = self._target(max_conc, od.device)
        # Unmix, rescale and remix fold into one 3x3 matrix per patch; so does keeping the residual.
        # A non-finite output can only come from non-finite per-patch factors (the optical densities
        # are finite table values; exp overflows only to +inf, which the clamp turns into 255), so the
        # per-patch matrices are checked instead of every output value, and unusable patches get zero
        # factors so that no NaN is ever cast to uint8.
        unmix = pseudo_inverse(stains)
        mixing = target_stains.T @ (scale[:, :, None] * unmix)
        if self.params["keep_residual"]:
            mixing = mixing + torch.eye(3, device=od.device) - stains.transpose(1, 2) @ unmix
        ok = ok & torch.isfinite(mixing).all(dim=2).all(dim=1)
        mixing = torch.where(ok[:, None, None], mixing, 0.0)
        rgb = float(self.params["io"]) * torch.exp(-(mixing @ od))
        # torchstain truncates io * exp(-od) = I + 1; the exact inverse of od = -log((I + 1) / io) is
        # io * exp(-od) - 1, rounded.
        rgb = (rgb - 1.0).round().clamp(0.0, 255.0) if self.params["keep_residual"] else rgb.clamp(max=255.0)
        n, height, width, _ = images.shape
        out = rgb.to(torch.uint8).permute(0, 2, 1).reshape(n, height, width, 3).cpu().numpy()
        return keep_unusable(out, images, ok)
