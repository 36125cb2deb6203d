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
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

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


def roc_curves(path: Path, curves: dict, title: str, class_counts: dict[str, int]) -> Path:
    """ROC curves from {name: {"fpr": [...], "tpr": [...], "auc": float}}; with no curve (a test split
    holding one class) a labelled "not defined" panel instead of empty axes.

    class_counts: test patches per class, {name: n}, shown in the "not defined" panel.
    """
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.set(xlabel="false positive rate (fraction of negatives)", ylabel="true positive rate (fraction of positives)",
           xlim=(0, 1), ylim=(0, 1))
    if not curves:
        counts = ", ".join(f"{name} {n}" for name, n in class_counts.items())
        ax.text(0.5, 0.5, f"ROC not defined:\nthe test split holds one class\n({counts})", ha="center",
                va="center", fontsize=10, transform=ax.transAxes,
                bbox={"boxstyle": "round", "facecolor": "#f0f0f0", "edgecolor": "grey"})
        ax.set_title(f"{title}: ROC not defined")
        return save_figure(fig, path)
    for name, c in curves.items():
        ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {c['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance (AUC 0.5)")
    ax.set_title(f"{title}: ROC on the test split")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def confusion(path: Path, matrix: np.ndarray, class_names: list[str], title: str) -> Path:
    """A confusion matrix (rows = true class) with counts and row percentages; colour = row fraction."""
    matrix = np.asarray(matrix)
    rate = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(class_names) + 2.8, 1.2 * len(class_names) + 1.5))
    image = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, f"{matrix[i, j]}\n{100 * rate[i, j]:.1f}%", ha="center", va="center",
                color="white" if rate[i, j] > 0.5 else "black", fontsize=9)
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xticklabels=class_names,
           yticklabels=class_names, xlabel="predicted class", ylabel="true class",
           title=f"{title}: confusion (patches, % of true class)")
    fig.colorbar(image, ax=ax, label="fraction of the true class", fraction=0.046)
    return save_figure(fig, path)


# Source and cluster need different encodings (issue: one shared palette made them look alike):
# sources are filled markers in Okabe-Ito blue / vermillion, clusters hollow shapes in black / purple.
SOURCE_STYLE = [("o", "#0072B2"), ("^", "#D55E00"), ("x", "#56B4E9")]  # per source, in order of appearance
CLUSTER_STYLE = [("s", "#000000"), ("D", "#CC79A7"), ("v", "#009E73"), ("P", "#E69F00")]


def cluster_scatter(path: Path, points: np.ndarray, source: np.ndarray, cluster: np.ndarray, title: str,
                    row: dict, chance: float) -> Path:
    """Thesis Figures 10-12: the first two PCA components by source (left), by K-means cluster (middle),
    and a density contour per source (right).

    Args:
        points: float (N, >= 2) PCA coordinates; source: str (N,); cluster: int (N,).
        row: 04's metrics of this clustering (accuracy, ari, nmi, silhouette, domain_probe), in the title.
        chance: the accuracy of a clustering that ignores the source (0.5 for equal sources).
    """
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.4))
    lo, hi = np.percentile(points[:, :2], [1, 99], axis=0)
    bins = [np.linspace(lo[0], hi[0], 31), np.linspace(lo[1], hi[1], 31)]
    handles = []
    for k, name in enumerate(source[np.sort(np.unique(source, return_index=True)[1])]):  # order of appearance
        marker, colour = SOURCE_STYLE[k % len(SOURCE_STYLE)]
        sel = source == name
        ax1.scatter(points[sel, 0], points[sel, 1], s=6, alpha=0.5, c=colour, marker=marker,
                    label=f"{name} (n = {sel.sum()})")
        if sel.sum() > 2:  # shared bins, robust to outliers, smoothed: where each source's mass lies
            hist, xe, ye = np.histogram2d(points[sel, 0], points[sel, 1], bins=bins)
            hist = gaussian_filter(hist / max(hist.sum(), 1), 1.5)
            if hist.max() > 0:
                ax3.contour((xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2, hist.T, colors=colour,
                            levels=hist.max() * np.array([0.1, 0.3, 0.6, 0.9]))
        handles.append(Line2D([], [], color=colour, label=f"{name} density"))
    for k in np.unique(cluster):
        marker, colour = CLUSTER_STYLE[int(k) % len(CLUSTER_STYLE)]
        sel = cluster == k
        ax2.scatter(points[sel, 0], points[sel, 1], s=8, alpha=0.6, facecolors="none", edgecolors=colour,
                    marker=marker, linewidths=0.6, label=f"cluster {k} (n = {sel.sum()})")
    ax1.set_title("by source")
    ax2.set_title("by K-means cluster")
    ax3.set_title("density per source (10/30/60/90 % of peak)")
    for ax in (ax1, ax2, ax3):
        ax.set(xlabel="PC 1 (feature units)", ylabel="PC 2 (feature units)")
    ax1.legend(markerscale=2, fontsize=8)
    ax2.legend(markerscale=2, fontsize=8)
    ax3.legend(handles=handles, fontsize=8)
    fig.suptitle(f"{title} — cluster accuracy {row['accuracy']:.3f} (chance {chance:.3f}), ARI {row['ari']:.3f}, "
                 f"NMI {row['nmi']:.3f}, silhouette {row['silhouette']:.3f}, domain probe {row['domain_probe']:.3f} "
                 f"(chance 0.5)", fontsize=10)
    return save_figure(fig, path)


def cam_grid(path: Path, images: np.ndarray, overlays: np.ndarray, captions: list[str], row_titles: list[str],
             ncols: int, title: str, center_px: int) -> Path:
    """Grad-CAM figure (thesis Figure 15): each patch beside its CAM overlay, the centre square outlined,
    a caption under each pair, one row of up to `ncols` pairs per row title, and a colour bar.

    Args:
        images, overlays: uint8 (R, ncols, H, W, 3) patches and their overlays (`gradcam.overlay`); rows
            with fewer pairs are padded with anything and have empty captions.
        captions: R * ncols strings (row-major; "" for padding), e.g. "true breast · pred negative 0.81".
        row_titles: R strings, one per row.
        center_px: side of the outlined centre square (PCam's label region), px.
    """
    n_rows = len(row_titles)
    height_px, width_px = images.shape[2:4]
    fig, axes = plt.subplots(n_rows, 2 * ncols, figsize=(2.2 * ncols + 1.2, 1.45 * n_rows + 0.8), squeeze=False)
    top, left = (height_px - center_px) // 2, (width_px - center_px) // 2
    for r, c in np.ndindex(n_rows, ncols):
        caption = captions[r * ncols + c]
        for k, picture in enumerate((images[r, c], overlays[r, c])):
            ax = axes[r, 2 * c + k]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if not caption:  # padding: no background either, so a row title can run across it
                ax.set_axis_off()
                continue
            ax.imshow(picture)
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), center_px, center_px, fill=False,
                                   edgecolor="white", linewidth=0.8, linestyle="--"))
        if caption:
            axes[r, 2 * c].set_xlabel(caption, fontsize=6, loc="left")
    for r, row_title in enumerate(row_titles):
        axes[r, 0].set_title(row_title, fontsize=8, loc="left")
    mappable = ScalarMappable(Normalize(0, 1), cmap="jet")
    fig.colorbar(mappable, ax=axes, fraction=0.02, pad=0.01, label="Grad-CAM (scaled per patch, 0-1)")
    fig.suptitle(f"{title}: patch | Grad-CAM overlay; dashed square = centre {center_px}x{center_px} px "
                 f"(PCam's label region); patches {width_px}x{height_px} px", fontsize=9)
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
