"""Vahadane stain normalisation, batched in torch without SPAMS (shared pieces in ``common.stain_ops``)."""

from __future__ import annotations

import numpy as np
import torch

from common.stain_ops import (
    RUIFROK_HE,
    TwoStainNormalizer,
    h_then_e,
    keep_unusable,
    lab8,
    luminosity_mask,
    max_concentrations,
    optical_density,
    stains_usable,
    tissue_od_eigen,
)


class Vahadane(TwoStainNormalizer):
    """Vahadane et al., "Structure-preserving color normalization and sparse stain separation for
    histological images", IEEE TMI 2016, with the conventions of staintools 2.1.2.

    Per patch (or group): tissue = luminosity mask (Lab L / 255 < luminosity_threshold); optical density
    OD = -log(I / 255); a sparse non-negative dictionary of 2 stains (norm <= 1) learned on at most
    max_fit_pixels tissue pixels by alternating exact non-negative lasso codes and block-coordinate
    dictionary updates (Mairal et al. 2010, the algorithm behind SPAMS' trainDL), started from the
    standard H&E stains, so deterministic and batched; hematoxylin first (the assignment closest to
    Ruifrok-Johnston's H and E); concentrations by the exact
    non-negative lasso, scaled so that each stain's 99th percentile matches the reference's; remixed
    with the reference's stains.

    Usage::

        out = Vahadane().fit(reference_rgb).transform(patches)
    """

    method = "vahadane"
    defaults = {
        "luminosity_threshold": 0.8,  # Lab L / 255 below this is tissue (staintools)
        "dictionary_lambda": 0.1,  # L1 weight of the sparse codes while learning the stain matrix
        "concentration_lambda": 0.01,  # L1 weight of the final concentrations
        "n_iterations": 100,  # most alternating code / dictionary updates
        "tolerance": 1e-4,  # stop once no stain OD component moves more than this in one update
        "max_fit_pixels": 1024,  # tissue pixels per estimate used to learn the dictionary
        "seed": 0,  # fixes which tissue pixels are subsampled
        "keep_residual": False,  # as Macenko's: True adds back the OD the two stains cannot represent
    }

    def _features(self, images: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(od float32 (U, 3, P), tissue bool (U, P)) of images (U, H, W, 3)."""
        tissue = luminosity_mask(lab8(images), self.params["luminosity_threshold"])
        return optical_density(images, 255.0, 0.0, device), torch.as_tensor(tissue, device=device)

    def _estimate(self, features: tuple[torch.Tensor, torch.Tensor]):
        """(stains (U, 2, 3), 99th-percentile concentrations (U, 2), ok (U,))."""
        od, tissue = features
        units, _, length = od.shape
        _, _, ratio = tissue_od_eigen(od, tissue)
        # The first k tissue pixels in a seeded random order of pixel positions form the sample; the
        # order depends only on the seed and the image size, never on the batch.
        generator = torch.Generator().manual_seed(int(self.params["seed"]))
        order = torch.randperm(length, generator=generator).to(od.device)
        k = min(length, int(self.params["max_fit_pixels"]))
        tissue_in_order = tissue[:, order]
        rank = tissue_in_order.cumsum(dim=1) - 1
        slot = torch.where(tissue_in_order & (rank < k), rank, k)  # column k collects the discarded
        picked = torch.zeros(units, k + 1, dtype=torch.long, device=od.device)
        picked.scatter_(1, slot, order.expand(units, length))
        picked = picked[:, :k]
        weight = (torch.arange(k, device=od.device) < tissue.sum(dim=1, keepdim=True)).to(od.dtype)
        sample = od.gather(2, picked[:, None, :].expand(units, 3, k))
        dictionary = torch.tensor(RUIFROK_HE, device=od.device).float()
        dictionary = (dictionary / dictionary.norm(dim=1, keepdim=True)).expand(units, 2, 3).clone()
        # Each unit iterates until its dictionary moves less than the tolerance; converged units leave
        # the working set, so a unit's result does not depend on the rest of the batch.
        active = torch.arange(units, device=od.device)
        current = dictionary
        for _ in range(int(self.params["n_iterations"])):
            updated = dictionary_step(current, sample, weight, self.params["dictionary_lambda"])
            moving = (updated - current).abs().amax(dim=(1, 2)) > self.params["tolerance"]
            dictionary[active] = updated
            if not bool(moving.all()):
                active, current = active[moving], updated[moving]
                sample, weight = sample[moving], weight[moving]
            else:
                current = updated
            if len(active) == 0:
                break
        stains = dictionary / dictionary.norm(dim=2, keepdim=True).clamp(min=1e-12)
        stains = h_then_e(stains)  # not staintools' "larger red OD first", which swaps PCam references
        max_conc = max_concentrations(nonneg_lasso(stains, od, self.params["concentration_lambda"]))
        return stains, max_conc, stains_usable(stains, max_conc, ratio, tissue, self.params)

    def _apply(self, images: np.ndarray, features, source) -> tuple[np.ndarray, torch.Tensor]:
        """uint8 (n, H, W, 3) remixed with the reference stains, and ok (n,); unusable patches copied."""
        od = features[0]
        stains, max_conc, ok = source
        target_stains, scale = self._target(max_conc, od.device)
        # Unusable patches get identity stains and zero factors, so that no NaN is ever cast to uint8.
        ok = ok & torch.isfinite(stains).all(dim=2).all(dim=1) & torch.isfinite(scale).all(dim=1)
        stains = torch.where(ok[:, None, None], stains, torch.eye(2, 3, device=od.device))
        scale = torch.where(ok[:, None], scale, 0.0)
        conc = nonneg_lasso(stains, od, self.params["concentration_lambda"])
        mixed = target_stains.T @ (conc * scale[:, :, None])
        if self.params["keep_residual"]:
            mixed = mixed + od - stains.transpose(1, 2) @ conc
        rgb = 255.0 * torch.exp(-mixed)
        rgb = rgb.round().clamp(0.0, 255.0) if self.params["keep_residual"] else rgb
        n, height, width, _ = images.shape
        out = rgb.to(torch.uint8).permute(0, 2, 1).reshape(n, height, width, 3).cpu().numpy()
        return keep_unusable(out, images, ok)


def nonneg_lasso(stains: torch.Tensor, od: torch.Tensor, lam: float) -> torch.Tensor:
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


def dictionary_step(dictionary: torch.Tensor, sample: torch.Tensor, weight: torch.Tensor,
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
    codes = nonneg_lasso(dictionary, sample, lam) * weight[:, None, :]
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
