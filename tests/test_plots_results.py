"""The figures of 04, 06 and 07 (common/plots.py), each rendered on tiny data: written as a PNG, and
holding the title, axis labels, legend or colour bar and the marks a reader needs."""

import cv2
import numpy as np
import pytest

from common import gradcam, plots


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions save, kept open for inspection."""
    saved = []

    def keep(fig, path):
        saved.append(fig)
        fig.savefig(path, format="png", dpi=40)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    yield saved
    for fig in saved:
        plots.plt.close(fig)


def texts(fig) -> str:
    """Every string on a figure: suptitle, titles, axis labels, texts, legend entries, tick labels."""
    out = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_title("left"), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.texts]
        out += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        if ax.get_legend():
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    return "\n".join(out)


def test_roc_curves_and_the_not_defined_panel(tmp_path, figures):
    curves = {"metastasis": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 1.0, 1.0], "auc": 0.75}}
    assert plots.roc_curves(tmp_path / "roc.png", curves, "pcam_resnet18", {"negative": 3, "metastasis": 3}).is_file()
    text = texts(figures[0])
    assert "metastasis (AUC 0.750)" in text and "chance (AUC 0.5)" in text and "false positive rate" in text
    # A test split of one class: no curve can be drawn, and the panel says why instead of empty axes.
    assert plots.roc_curves(tmp_path / "roc1.png", {}, "dlbcl_resnet18", {"negative": 0, "lymphoma": 12}).is_file()
    text = texts(figures[1])
    assert "ROC not defined" in text and "lymphoma 12" in text and not figures[1].axes[0].lines


def test_confusion_shows_counts_and_row_percentages(tmp_path, figures):
    matrix = np.array([[3, 1], [0, 4]])
    assert plots.confusion(tmp_path / "c.png", matrix, ["negative", "lymphoma"], "dlbcl_resnet18").is_file()
    cells = [t.get_text() for t in figures[0].axes[0].texts]
    assert cells == ["3\n75.0%", "1\n25.0%", "0\n0.0%", "4\n100.0%"]
    assert len(figures[0].axes) == 2  # the matrix and its colour bar
    assert "predicted class" in texts(figures[0]) and "true class" in texts(figures[0])


def test_cluster_scatter_separates_source_from_cluster(tmp_path, figures):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(40, 2))
    source = np.array(["pcam", "dlbcl"] * 20)
    cluster = np.array([0] * 10 + [1] * 30)
    row = {"accuracy": 0.55, "ari": 0.01, "nmi": 0.02, "silhouette": 0.3, "domain_probe": 0.61}
    assert plots.cluster_scatter(tmp_path / "s.png", points, source, cluster, "pixels · none", row, 0.5).is_file()
    fig = figures[0]
    title = fig._suptitle.get_text()
    assert "accuracy 0.550 (chance 0.500)" in title and "domain probe 0.610" in title
    by_source, by_cluster = fig.axes[0].collections, fig.axes[1].collections
    source_colours = {tuple(c.get_facecolor()[0][:3]) for c in by_source}
    cluster_colours = {tuple(c.get_edgecolor()[0][:3]) for c in by_cluster}
    assert len(source_colours) == 2 and len(cluster_colours) == 2 and not source_colours & cluster_colours
    assert all(len(c.get_facecolor()) == 0 or c.get_facecolor()[0][3] == 0 for c in by_cluster)  # hollow
    text = texts(fig)
    assert "pcam (n = 20)" in text and "cluster 1 (n = 30)" in text and "PC 1 (feature units)" in text


def test_cam_grid_pairs_patch_and_overlay(tmp_path, figures):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 2, 96, 96, 3), dtype=np.uint8)
    cams = gradcam.upsample(rng.random((4, 3, 3)), (96, 96))
    overlays = gradcam.overlay(x.reshape(4, 96, 96, 3), cams).reshape(x.shape)
    captions = ["true breast · pred breast (p 0.91)", "true breast · pred breast (p 0.85)",
                "true negative · pred breast (p 0.66)", ""]  # the second row holds one patch
    path = plots.cam_grid(tmp_path / "g.png", x, overlays, captions,
                          ["true breast → predicted breast", "true negative → predicted breast"], 2, "mixed", 32)
    assert cv2.imread(str(path)) is not None
    fig = figures[0]
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 6  # 3 patches and their overlays; the padding cell stays empty
    # Row-major pairs: each patch, then its overlay, in the next column.
    np.testing.assert_array_equal(image_axes[0].images[0].get_array(), x[0, 0])
    np.testing.assert_array_equal(image_axes[1].images[0].get_array(), overlays[0, 0])
    for ax in image_axes:  # the centre 32x32 square outlined on every picture
        (square,) = ax.patches
        assert (square.get_x(), square.get_y(), square.get_width(), square.get_height()) == (31.5, 31.5, 32, 32)
    text = texts(fig)
    assert "true negative · pred breast (p 0.66)" in text and "Grad-CAM (scaled per patch, 0-1)" in text
    assert "centre 32x32 px" in text
