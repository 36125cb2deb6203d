"""Figures for people: contact sheets, training curves, ROC and confusion matrices, cluster plots.

Every function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np
from scipy.ndimage import gaussian_filter

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from common.steps import atomic_path  # noqa: E402


def mosaic(images: np.ndarray, ncols: int = 16, pad_px: int = 2) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one uint8 image, white padding, row-major."""
    n, h, w, c = images.shape
    nrows = max(1, -(-n // ncols))
    full = np.full((nrows * ncols, h + pad_px, w + pad_px, c), 255, np.uint8)
    full[:n, :h, :w] = images
    grid = full.reshape(nrows, ncols, h + pad_px, w + pad_px, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape(nrows * (h + pad_px), ncols * (w + pad_px), c)


def _save_png(path: Path, rgb: np.ndarray) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"cannot encode {path}")
        Path(tmp).write_bytes(buf.tobytes())
    return path


def contact_sheet(path: Path, images: np.ndarray, ncols: int = 16) -> Path:
    """A PNG grid of uint8 (N, H, W, 3) RGB patches (an empty input writes a blank tile)."""
    if len(images) == 0:
        images = np.full((1, 96, 96, 3), 255, np.uint8)
    return _save_png(path, mosaic(images, min(ncols, len(images))))


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def labelled_rows(path: Path, rows: list[tuple[str, np.ndarray]], ncols: int = 8) -> Path:
    """A figure of image rows, each titled (e.g. "pcam · macenko"); images uint8 (K, H, W, 3)."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(ncols * 1.1, 1.35 * len(rows)), squeeze=False)
    for ax, (title, images) in zip(axes[:, 0], rows, strict=True):
        ax.imshow(mosaic(images[:ncols], ncols) if len(images) else np.full((8, 8, 3), 255, np.uint8))
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    return save_figure(fig, path)


def training_curves(path: Path, log: list[dict]) -> Path:
    """Loss and accuracy per epoch (train and valid) from the JSON-lines log records."""
    epochs = [r["epoch"] for r in log]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, style in (("train_loss", "-"), ("valid_loss", "--")):
        ax1.plot(epochs, [r[key] for r in log], style, label=key)
    for key, style in (("train_acc", "-"), ("valid_acc", "--")):
        ax2.plot(epochs, [r[key] for r in log], style, label=key)
    ax1.set(xlabel="epoch", ylabel="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def roc_curves(path: Path, curves: dict, title: str) -> Path:
    """ROC curves from {name: {"fpr": [...], "tpr": [...], "auc": float}}."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, c in curves.items():
        ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {c['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def confusion(path: Path, matrix: np.ndarray, class_names: list[str], title: str) -> Path:
    """A confusion matrix (rows = true class) with counts and row percentages."""
    matrix = np.asarray(matrix)
    rate = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, f"{matrix[i, j]}\n{100 * rate[i, j]:.1f}%", ha="center", va="center",
                color="white" if rate[i, j] > 0.5 else "black", fontsize=9)
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xticklabels=class_names,
           yticklabels=class_names, xlabel="predicted", ylabel="true", title=title)
    return save_figure(fig, path)


def cluster_scatter(path: Path, points: np.ndarray, source: np.ndarray, cluster: np.ndarray, title: str) -> Path:
    """Thesis Figures 10-12: the first two PCA components coloured by source (left) and by K-means
    cluster (right), with a density contour per source."""
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4))
    # shared bins, robust to outliers, smoothed: contours of where each source's mass lies
    lo, hi = np.percentile(points[:, :2], [1, 99], axis=0)
    bins = [np.linspace(lo[0], hi[0], 31), np.linspace(lo[1], hi[1], 31)]
    for name, colour in (("pcam", "tab:blue"), ("dlbcl", "tab:orange")):
        sel = source == name
        ax1.scatter(points[sel, 0], points[sel, 1], s=4, alpha=0.5, c=colour, label=name)
        if sel.sum() > 2:
            hist, xe, ye = np.histogram2d(points[sel, 0], points[sel, 1], bins=bins)
            hist = gaussian_filter(hist / hist.sum(), 1.5)
            ax3.contour((xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2, hist.T, colors=colour,
                        levels=hist.max() * np.array([0.1, 0.3, 0.6, 0.9]))
    for k in np.unique(cluster):
        sel = cluster == k
        ax2.scatter(points[sel, 0], points[sel, 1], s=4, alpha=0.5, label=f"cluster {k}")
    ax1.set_title(f"{title}: source")
    ax2.set_title("K-means clusters")
    ax3.set_title("density per source")
    for ax in (ax1, ax2, ax3):
        ax.set(xlabel="PC 1", ylabel="PC 2")
    ax1.legend(markerscale=3)
    ax2.legend(markerscale=3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- 01: what the quality filter did


def _blank_if_empty(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    return images if images.ndim == 4 and len(images) else np.full((1, 96, 96, 3), 255, np.uint8)


def example_rows(path: Path, title: str, rows: list[tuple[str, np.ndarray]], ncols: int = 8) -> Path:
    """A titled figure of patch rows, one per group (e.g. per rejection reason, its count in the label).

    Args:
        path: the PNG to write.
        title: what the figure shows, above all rows.
        rows: (label, uint8 (K, H, W, 3) RGB patches) per row; the first ncols patches are shown, an
            empty row as a white tile.
        ncols: patches per row.
    """
    fig, axes = plt.subplots(len(rows), 1, figsize=(ncols * 1.1, 0.5 + 1.35 * len(rows)), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows, strict=True):
        images = _blank_if_empty(images)[:ncols]
        ax.imshow(mosaic(images, ncols))
        ax.set_title(label, fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    return save_figure(fig, path)


def threshold_sheet(path: Path, title: str, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> Path:
    """Patches either side of a threshold, one row per candidate value, for choosing it by eye.

    Args:
        path: the PNG to write.
        title: the threshold swept and the sample.
        rows: (label, outside, inside) per candidate value: uint8 (K, H, W, 3) RGB patches just outside
            (rejected) and just inside (kept), nearest to the threshold first. Each row reads
            rejected ... | ... kept, the nearest patches meeting at the red line.
    """
    k = max([1, *(max(len(o), len(i)) for _, o, i in rows)])
    shape = next((a.shape[1:] for _, o, i in rows for a in (o, i) if len(a)), (96, 96, 3))
    fig, axes = plt.subplots(len(rows), 1, figsize=(2 * k * 1.0 + 0.4, 0.5 + 1.25 * len(rows)), squeeze=False)
    for ax, (label, outside, inside) in zip(axes[:, 0], rows, strict=True):
        side = np.full((2 * k, *shape), 255, np.uint8)
        if len(outside):
            side[k - len(outside):k] = outside[::-1]  # farthest left, nearest at the line
        if len(inside):
            side[k:k + len(inside)] = inside
        image = mosaic(side, 2 * k)
        ax.imshow(image)
        ax.axvline(image.shape[1] / 2 - 1, color="red", linewidth=2)
        ax.set_title(f"{label}   (left: just rejected {len(outside)} | right: just kept {len(inside)})",
                     fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    return save_figure(fig, path)
