"""Result figures are written atomically as real, non-blank images."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from liverfusion.errors import DataError
from liverfusion.metrics import confusion_matrix
from liverfusion.viz import plot_confusion_matrix, plot_embedding, plot_per_fold, plot_roc
from liverfusion.viz.plots import TSNE_MIN_POINTS, embedding_method, roc_curves

NAMES = ["hemangioma", "ICC", "abscess", "HCC"]


def _prediction_set(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.5
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), labels


def _check_png(path: Path, min_width: int = 300) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 5000
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 200 and image.shape[1] > min_width
    assert image[..., :3].std() > 0.05  # not a blank canvas
    leftovers = [p for p in path.parent.iterdir() if ".tmp" in p.name]
    assert not leftovers, leftovers
    return image


@pytest.mark.parametrize("normalize", ["true", None])
def test_confusion_matrix_plot(tmp_path, normalize):
    probs, labels = _prediction_set(80, 4, seed=0)
    cm = confusion_matrix(probs, labels)
    out = plot_confusion_matrix(cm, NAMES, tmp_path / "figs" / "cm.png", normalize=normalize)
    assert out == tmp_path / "figs" / "cm.png"
    _check_png(out)


def test_confusion_matrix_plot_with_empty_row_and_bad_shape(tmp_path):
    cm = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 4]])  # class 1 absent: its normalised row is undefined
    _check_png(plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png", normalize="true"))
    with pytest.raises(DataError, match="expected"):
        plot_confusion_matrix(cm, ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="normalize"):
        plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "bad.png", normalize="rows")


def test_roc_multiclass_binary_and_absent_class(tmp_path):
    probs, labels = _prediction_set(120, 4, seed=1)
    _check_png(plot_roc(probs, labels, NAMES, tmp_path / "roc.png"))
    p1 = probs[:, 3]
    binary = np.stack([1 - p1, p1], axis=1)
    _check_png(
        plot_roc(torch.tensor(binary), torch.tensor(labels == 3).long(), ["other", "HCC"], tmp_path / "b.png")
    )
    keep = labels != 2
    _check_png(plot_roc(probs[keep], labels[keep], NAMES, tmp_path / "absent.png"))
    with pytest.raises(DataError):
        plot_roc(probs, labels, NAMES[:3], tmp_path / "bad.png")


def test_roc_legend_carries_the_auroc_ci():
    probs, labels = _prediction_set(120, 4, seed=3)
    curves = roc_curves(probs, labels, NAMES)  # DeLong CIs when none are given
    for c in curves:
        low, high = c["ci"]
        assert low < c["auc"] < high and f"AUC {c['auc']:.3f} [{low:.3f}, {high:.3f}]" in c["label"]
    given = roc_curves(probs, labels, NAMES, ci={"ICC": (0.6, 0.9)})
    assert given[1]["label"].endswith("[0.600, 0.900]") and given[0]["ci"] == curves[0]["ci"]
    p1 = probs[:, 3]
    (binary,) = roc_curves(np.stack([1 - p1, p1], 1), (labels == 3).astype(int), ["other", "HCC"])
    assert binary["label"].startswith("HCC (positive): AUC") and "[" in binary["label"]
    keep = labels != 2
    absent = roc_curves(probs[keep], labels[keep], NAMES)
    assert absent[2]["label"] == "abscess: undefined (no positives)" and absent[2]["ci"] is None


def test_embedding_uses_pca_below_fifty_points(tmp_path, monkeypatch):
    assert embedding_method(TSNE_MIN_POINTS - 1, "tsne") == "pca"
    assert embedding_method(TSNE_MIN_POINTS, "tsne") == "tsne" and embedding_method(10, "pca") == "pca"
    import sklearn.manifold

    def no_tsne(*args, **kwargs):
        raise AssertionError("t-SNE must not run on 30 points")

    monkeypatch.setattr(sklearn.manifold, "TSNE", no_tsne)
    rng = np.random.default_rng(4)
    labels = np.arange(30) % 4
    _check_png(plot_embedding(rng.normal(size=(30, 8)), labels, NAMES, tmp_path / "e.png", method="tsne"))


def test_per_fold_plot(tmp_path):
    scores = {
        "accuracy": [0.61, 0.70, 0.66, 0.72, 0.68],
        "macro_f1": [0.52, 0.61, 0.55, 0.62, 0.58],
        "kappa": [0.41, 0.50, 0.45, 0.52, 0.48],
        "lld_score": [0.47, 0.55, 0.50, 0.57, 0.53],
    }
    _check_png(plot_per_fold(scores, tmp_path / "folds.png"))
    with pytest.raises(DataError):
        plot_per_fold({}, tmp_path / "none.png")


def test_embedding_side_by_side_panels(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 15)
    pretrained = rng.normal(size=(60, 64)) + labels[:, None] * 1.5
    scratch = rng.normal(size=(60, 64))
    out = plot_embedding(
        {"pretrained": (pretrained, labels), "scratch": (torch.tensor(scratch), torch.tensor(labels))},
        None,
        NAMES,
        tmp_path / "tsne.png",
        method="tsne",
        max_iter=250,  # the minimum sklearn allows: enough for a figure test
        n_threads=1,
    )
    two_panels = _check_png(out, min_width=900)
    single = _check_png(plot_embedding(pretrained, labels, NAMES, tmp_path / "pca.png", method="pca"))
    assert two_panels.shape[1] > single.shape[1]


def test_embedding_rejects_bad_input(tmp_path):
    x = np.zeros((10, 4))
    with pytest.raises(DataError, match="labels"):
        plot_embedding(x, np.zeros(9, dtype=int), ["a"], tmp_path / "e.png", method="pca")
    with pytest.raises(DataError, match="labels are required"):
        plot_embedding(x, None, ["a"], tmp_path / "e.png")
    with pytest.raises(ValueError, match="method"):
        plot_embedding(x + np.arange(4), np.zeros(10, dtype=int), ["a"], tmp_path / "e.png", method="umap")
