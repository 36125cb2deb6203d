"""Reinhard colour transfer in OpenCV's 8-bit Lab, batched (shared pieces in ``common.stain_ops``).

Speed (CPU): each pixel's Lab level becomes a 16-bit (patch, channel, level) index, so that a whole
chunk's statistics are one OpenCV histogram and its transfer one OpenCV table lookup; the results
equal the per-pixel formulas bit for bit.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from common.stain_ops import (
    MAX_CHUNK_PATCHES,
    StainNormalizer,
    count_true,
    eigen_ratio,
    enough_tissue,
    keep_unusable,
    lab8,
    luminosity_mask,
    od_table,
    reference_id,
)


class Reinhard(StainNormalizer):
    """Reinhard et al., "Color transfer between images", IEEE CG&A 2001, in OpenCV's 8-bit Lab as
    staintools 2.1.2 and tiatoolbox do.

    Per patch (or group): the mean and standard deviation (ddof 0) of each Lab channel over all pixels;
    each channel shifted and scaled to the reference's, clipped to 0..255 and truncated to 8 bits,
    back to RGB with OpenCV. Reinhard needs no stains, but the patches every method skips (too little
    tissue by the luminosity mask, or a single stain by the tissue OD covariance) are skipped too.

    Usage::

        out = Reinhard().fit(reference_rgb).transform(patches)
    """

    method = "reinhard"
    defaults = {"luminosity_threshold": 0.8}  # Lab L / 255 below this is tissue (staintools)

    def fit(self, reference: np.ndarray) -> Reinhard:
        """Lab statistics of uint8 RGB (H, W, 3), or of patches (N, H, W, 3); returns self.

        A batch's target is what a single patch should be mapped to: the mean of the usable patches'
        means and the root-mean-square of their within-patch standard deviations. The standard deviation
        of the pooled pixels would add the spread *between* patches and stretch every patch's contrast.

        Raises:
            StainError: bad array, or a reference with too little tissue / a single stain.
        """
        reference, (stats, _, _), per_patch = self._reference_estimates(reference)
        mean, std = stats[0, 0], stats[0, 1]
        if per_patch is not None:
            mean, std = per_patch[0][:, 0].mean(dim=0), per_patch[0][:, 1].square().mean(dim=0).sqrt()
        self.state = {**reference_id(reference), "lab_mean": mean.tolist(), "lab_std": std.tolist()}
        return self

    def _features(self, images: np.ndarray, device: str):
        """(Lab level index uint16 (U, P, 3), tissue bool (U, P), tissue OD covariance float64 (U, 3, 3),
        Lab level histogram float64 (U, 3, 256)) of images (U, H, W, 3)."""
        lab = lab8(images)
        tissue = torch.as_tensor(luminosity_mask(lab, self.params["luminosity_threshold"]), device=device)
        index = level_index(lab)
        return (index, tissue, tissue_od_covariance(images, tissue),
                torch.as_tensor(level_histogram(index), device=device))

    def _estimate(self, features):
        """(Lab statistics (U, 2, 3) = [mean, std (ddof 0)], an unused (U, 2), ok (U,))."""
        _, tissue, cov, histogram = features
        values = torch.as_tensor(lab_levels().T, device=histogram.device).double()  # (3, 256)
        count = histogram.sum(dim=2)
        # Counts times float32 values add up exactly in float64, so the mean equals a per-pixel one.
        mean = (histogram * values).sum(dim=2) / count
        std = ((histogram * (values - mean[:, :, None]) ** 2).sum(dim=2) / count).sqrt()
        _, _, ratio = eigen_ratio(cov)
        ok = enough_tissue(tissue, self.params) & (std > 1e-3).all(dim=1) & (ratio >= self.params["min_eigen_ratio"])
        return torch.stack([mean, std], dim=1), torch.ones(len(histogram), 2, device=histogram.device), ok

    def _apply(self, images: np.ndarray, features, source) -> tuple[np.ndarray, torch.Tensor]:
        """Per-channel Lab transfer, clipped and truncated to 8 bits, back to RGB with OpenCV.

        An 8-bit Lab channel takes at most 256 values, so each patch's transfer is a 256-entry table per
        channel, computed with the per-pixel formula and applied through the level index."""
        index = features[0]
        stats, _, ok = source
        device = stats.device
        levels = torch.as_tensor(lab_levels(), device=device).double()  # (256, 3)
        # float64 like staintools, whose float32 Lab meets float64 statistics from cv2.meanStdDev.
        target_mean = torch.tensor(self.state["lab_mean"], device=device, dtype=torch.float64)
        target_std = torch.tensor(self.state["lab_std"], device=device, dtype=torch.float64)
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
        return keep_unusable(rgb, images, ok)


def lab_scale(lab8_levels: np.ndarray) -> np.ndarray:
    """float32 Lab as staintools scales OpenCV's 8-bit Lab (..., 3): L in [0, 100], a and b centred on 0."""
    lab = lab8_levels.astype(np.float32)
    lab[..., 0] /= 2.55
    lab[..., 1:] -= 128.0
    return lab


def lab_levels() -> np.ndarray:
    """float32 (256, 3): staintools' Lab value of each 8-bit OpenCV Lab level, per channel."""
    return lab_scale(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))


def level_index(lab: np.ndarray) -> np.ndarray:
    """uint16 (n, P, 3): (patch * 3 + channel) * 256 + level of 8-bit Lab (n, P, 3), n <= 85.

    One 16-bit index addresses every (patch, channel) 256-entry table of a chunk, so that OpenCV's
    16-bit table lookup and histogram treat the whole chunk in one call each."""
    n = len(lab)
    if n * 3 * 256 > 65536:
        raise ValueError(f"level_index takes at most {MAX_CHUNK_PATCHES} patches, got {n}")
    channel_levels = (np.arange(256)[:, None] + 256 * np.arange(3)).astype(np.uint16)[None]  # (1, 256, 3)
    index = cv2.LUT(lab, channel_levels)
    index += (np.arange(n, dtype=np.uint16) * 768)[:, None, None]
    return index


def level_histogram(index: np.ndarray) -> np.ndarray:
    """float64 (n, 3, 256) pixel count of each 8-bit Lab level per patch and channel, from ``level_index``."""
    n = len(index)
    counts = cv2.calcHist([index.reshape(-1, 3)], [0], None, [n * 768], [0, n * 768])
    return counts.astype(np.float64).reshape(n, 3, 256)


def tissue_od_covariance(images: np.ndarray, tissue: torch.Tensor) -> torch.Tensor:
    """float64 (n, 3, 3) tissue OD covariance (io 255, offset 0) of images (n, H, W, 3), n <= 85,
    bit-identical to ``stain_ops.tissue_od_eigen``'s, without a full OD array.

    Each pixel value becomes a 16-bit (patch, channel, level) index, non-tissue pixels a spare index;
    two 65,536-entry table lookups then give the masked OD and the centred masked OD directly, with the
    same float32 values (and so the same sums) as the OD route."""
    n = len(images)
    channel_first = np.ascontiguousarray(images.reshape(n, -1, 3).transpose(0, 2, 1))
    index = np.add(channel_first, (np.arange(n * 3, dtype=np.uint16) * 256).reshape(n, 3, 1), dtype=np.uint16)
    np.copyto(index, 65535, where=~tissue.cpu().numpy()[:, None, :])  # n * 768 <= 65280 leaves it spare
    levels = od_table(255.0, 0.0).astype(np.float32)
    table = np.zeros(65536, np.float32)
    table[:n * 768] = np.tile(levels, n * 3)
    masked = torch.from_numpy(cv2.LUT(index.reshape(n * 3, -1), table).reshape(n, 3, -1))
    count = count_true(tissue.cpu()).clamp(min=2).float()
    mean = masked.sum(dim=2) / count[:, None]
    table[:n * 768] = (levels - mean.numpy()[:, :, None]).ravel()
    centred = torch.from_numpy(cv2.LUT(index.reshape(n * 3, -1), table).reshape(n, 3, -1))
    cov = (centred @ centred.transpose(1, 2)).double() / (count - 1).double()[:, None, None]
    return cov.to(tissue.device)
