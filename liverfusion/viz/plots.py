"""Result figures: confusion matrix, ROC curves, per-fold scores and feature embeddings.

Figures are drawn on an explicit Agg canvas (no pyplot, so no global backend state and no display needed) and
saved atomically; each function returns the written path.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchmetrics.functional.classification as tmf
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from liverfusion.errors import DataError
from liverfusion.metrics.classification import ArrayLike, validate_probs_labels
from liverfusion.utils.atomic import atomic_path

_NORMALIZE_TITLES = {
    None: "counts",
    "true": "row-normalised (recall on the diagonal)",
    "pred": "column-normalised (precision on the diagonal)",
    "all": "fraction of all cases",
}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def _class_colours(k: int) -> list:
    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def plot_confusion_matrix(
    cm: ArrayLike,
    class_names: Sequence[str],
    path: str | Path,
    normalize: str | None = "true",
    title: str = "Confusion matrix",
    dpi: int = 150,
) -> Path:
    """Heat map of a count confusion matrix (rows true, columns predicted) with counts in every cell.

    ``normalize`` ("true", "pred", "all" or None) sets the colour scale and the first number of each cell;
    raw counts are always shown too, so small classes stay readable. Rows/columns without cases show "-".
    """
    counts = np.asarray(cm, dtype=np.float64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise DataError(f"confusion matrix has shape {counts.shape}, expected ({k}, {k}) for {k} class names")
    if normalize not in _NORMALIZE_TITLES:
        raise ValueError(f"normalize must be one of {list(_NORMALIZE_TITLES)}, got {normalize!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "true":
            shown = counts / counts.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            shown = counts / counts.sum(axis=0, keepdims=True)
        elif normalize == "all":
            shown = counts / counts.sum()
        else:
            shown = counts.copy()

    size = max(4.0, 0.8 * k + 2.5)
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(float(np.nanmax(shown)), 1.0)
    im = ax.imshow(np.nan_to_num(shown), cmap="Blues", vmin=0.0, vmax=vmax)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction" if normalize else "cases")
    for i in range(k):
        for j in range(k):
            value = shown[i, j]
            if np.isnan(value):
                text = "-"
            elif normalize:
                text = f"{value:.2f}\n({int(counts[i, j])})"
            else:
                text = f"{int(counts[i, j])}"
            dark = not np.isnan(value) and value > 0.6 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"{title}\n{_NORMALIZE_TITLES[normalize]}, n = {int(counts.sum())}")
    return _save(fig, path, dpi)


def roc_curves(
    probs: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str],
    ci: Mapping[str, Sequence[float]] | None = None,
    alpha: float = 0.05,
) -> list[dict]:
    """The curves of :func:`plot_roc`: per curve its class index, legend text, AUC and (1 - ``alpha``) CI, and the
    ROC points (None when undefined). ``ci`` maps a class name to a (low, high) interval computed elsewhere (the
    report's patient-level bootstrap); a class without one gets DeLong's CI."""
    from liverfusion.metrics import delong_ci

    p, y = validate_probs_labels(probs, labels, num_classes=len(class_names))
    k = p.shape[1]
    out = []
    for c in [1] if k == 2 else list(range(k)):
        target = (y == c).long()
        n_pos = int(target.sum())
        name = f"{class_names[c]} (positive)" if k == 2 else str(class_names[c])
        if n_pos == 0 or n_pos == len(target):
            what = "positives" if n_pos == 0 else "negatives"
            out.append(
                {"class": c, "label": f"{name}: undefined (no {what})", "auc": None, "ci": None, "roc": None}
            )
            continue
        fpr, tpr, _ = tmf.binary_roc(p[:, c], target)
        auc = float(tmf.binary_auroc(p[:, c], target))
        given = (ci or {}).get(str(class_names[c]))
        if given is not None:
            low, high = float(given[0]), float(given[1])
        else:
            try:
                d = delong_ci(p[:, c].numpy(), target.numpy(), alpha=alpha)
                low, high = float(d.low), float(d.high)
            except DataError:
                low = high = float("nan")
        interval = f" [{low:.3f}, {high:.3f}]" if np.isfinite(low) and np.isfinite(high) else ""
        out.append(
            {
                "class": c,
                "label": f"{name}: AUC {auc:.3f}{interval}",
                "auc": auc,
                "ci": (low, high),
                "roc": (fpr.numpy(), tpr.numpy()),
            }
        )
    return out


def plot_roc(
    probs: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "ROC",
    dpi: int = 150,
    ci: Mapping[str, Sequence[float]] | None = None,
    ci_method: str | None = None,
) -> Path:
    """ROC curves with AUC and its 95 % CI in the legend: one-vs-rest per class for K > 2, one curve for K == 2
    (column 1 positive). ``ci`` (class name -> (low, high)) gives the intervals, e.g. the report's patient-level
    bootstrap (``ci_method`` names it in the title); without it each is DeLong's.

    Classes without positives or negatives in ``labels`` have no ROC; they are listed in the legend as undefined.
    """
    curves = roc_curves(probs, labels, class_names, ci)
    k = len(class_names)
    colours = _class_colours(k)
    fig = _new_figure(6.0, 5.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    aucs = []
    for curve in curves:
        colour = colours[curve["class"]]
        if curve["roc"] is None:
            ax.plot([], [], color=colour, label=curve["label"])
            continue
        aucs.append(curve["auc"])
        ax.plot(*curve["roc"], color=colour, linewidth=1.8, label=curve["label"])
    if k > 2 and aucs:
        title = f"{title} (one-vs-rest), macro AUC {np.mean(aucs):.3f}"
    n = len(np.asarray(labels))
    how = ci_method or ("DeLong" if not ci else "given")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(f"{title}, n = {n}\nlegend: AUC [95 % CI, {how}]", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi)


def plot_per_fold(
    scores: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "Cross-validation scores",
    ylabel: str = "score",
    dpi: int = 150,
) -> Path:
    """Per-fold scores of several metrics: one dot per fold (same colour per fold), mean +- std bar per metric."""
    if not scores:
        raise DataError("no scores to plot")
    names = list(scores)
    values = [np.asarray(scores[m], dtype=np.float64) for m in names]
    if any(v.ndim != 1 or v.size == 0 for v in values):
        raise DataError("every metric needs a non-empty list of per-fold scores")
    n_folds = max(v.size for v in values)
    fold_colours = _class_colours(n_folds)
    fig = _new_figure(max(4.5, 1.3 * len(names) + 2.0), 4.5)
    ax = fig.add_subplot()
    offsets = np.linspace(-0.15, 0.15, n_folds) if n_folds > 1 else np.zeros(1)
    for i, v in enumerate(values):
        for f, score in enumerate(v):
            ax.scatter(
                i + offsets[f],
                score,
                color=fold_colours[f],
                s=28,
                zorder=3,
                label=f"fold {f}" if i == 0 else None,
            )
        mean = float(np.nanmean(v))
        std = float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0
        ax.errorbar(i + 0.3, mean, yerr=std, fmt="s", color="black", capsize=5, zorder=4)
        ax.annotate(f"{mean:.3f}\n± {std:.3f}", (i + 0.38, mean), fontsize=8, va="center")
    ax.set_xticks(
        range(len(names)),
        labels=names,
        rotation=30 if len(names) > 4 else 0,
        ha="right" if len(names) > 4 else "center",
    )
    ax.set_xlim(-0.5, len(names) - 0.2)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({n_folds} folds; squares: mean ± sample std)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncols=min(n_folds, 5))
    return _save(fig, path, dpi)


TSNE_MIN_POINTS = 50
"""Below this many points t-SNE (perplexity capped at (n - 1) / 3) draws clusters out of noise: PCA instead."""


def embedding_method(n_points: int, method: str) -> str:
    """The projection actually used for ``n_points``: ``tsne`` falls back to ``pca`` below ``TSNE_MIN_POINTS``."""
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    return "pca" if method == "tsne" and n_points < TSNE_MIN_POINTS else method


def _project(
    features: np.ndarray, method: str, seed: int, perplexity: float, pca_dims: int, max_iter: int
) -> np.ndarray:
    """2-D projection; t-SNE runs on the first ``pca_dims`` principal components (the usual denoising step)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n, d = features.shape
    if n < 3:
        raise DataError(f"an embedding plot needs at least 3 samples, got {n}")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(features)
    if method != "tsne":
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    if d > pca_dims and n > pca_dims:
        features = PCA(n_components=pca_dims, random_state=seed).fit_transform(features)
    perp = min(perplexity, (n - 1) / 3)  # sklearn requires perplexity < n_samples
    tsne = TSNE(
        n_components=2,
        perplexity=perp,
        init="pca",
        random_state=seed,
        learning_rate="auto",
        max_iter=max_iter,
    )
    return tsne.fit_transform(features)


def plot_embedding(
    features: ArrayLike | Mapping[str, tuple[ArrayLike, ArrayLike]],
    labels: ArrayLike | None,
    class_names: Sequence[str],
    path: str | Path,
    method: str = "tsne",
    seed: int = 0,
    perplexity: float = 30.0,
    pca_dims: int = 50,
    max_iter: int = 1000,
    n_threads: int | None = None,
    title: str = "Feature embedding",
    dpi: int = 150,
) -> Path:
    """2-D t-SNE (or PCA) scatter of features coloured by class; a dict name -> (features, labels) gives one panel
    per entry side by side (e.g. pretrained vs scratch encoders), each projected independently. With fewer than
    ``TSNE_MIN_POINTS`` points in a panel, t-SNE gives way to PCA (said so in the title).
    ``perplexity`` is capped at (n - 1) / 3; ``max_iter`` (t-SNE optimisation steps, >= 250) trades time for
    convergence. ``n_threads`` caps the BLAS/OpenMP threads of the projection (1 is fastest for a few hundred
    points on a busy machine, where idle OpenMP threads spin); None keeps the library defaults.
    """
    if isinstance(features, Mapping):
        panels = {str(name): fl for name, fl in features.items()}
        if not panels:
            raise DataError("no feature sets to plot")
    else:
        if labels is None:
            raise DataError("labels are required when features is a single array")
        panels = {"": (features, labels)}
    colours = _class_colours(len(class_names))
    requested = method
    method = embedding_method(min(len(fl[0]) for fl in panels.values()), method)
    axis_name = "t-SNE" if method == "tsne" else "PC"
    fig = _new_figure(4.6 * len(panels) + 1.6, 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, (feats, labs)) in zip(axes, panels.items()):
        x = (
            torch.as_tensor(feats).detach().cpu().numpy()
            if isinstance(feats, torch.Tensor)
            else np.asarray(feats)
        )
        y = (
            torch.as_tensor(labs).detach().cpu().numpy()
            if isinstance(labs, torch.Tensor)
            else np.asarray(labs)
        )
        x = x.reshape(x.shape[0], -1).astype(np.float64)
        if y.shape != (x.shape[0],):
            raise DataError(f"panel {name!r}: {x.shape[0]} feature rows but labels of shape {y.shape}")
        if not np.isfinite(x).all():
            raise DataError(f"panel {name!r}: features contain NaN or inf")
        if ((y < 0) | (y >= len(class_names))).any():
            raise DataError(f"panel {name!r}: labels must lie in [0, {len(class_names) - 1}]")
        with warnings.catch_warnings(), threadpool_limits(limits=n_threads):
            warnings.simplefilter("ignore", FutureWarning)
            xy = _project(x, method, seed, perplexity, pca_dims, max_iter)
        for c, cname in enumerate(class_names):
            sel = y == c
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=colours[c], label=str(cname), alpha=0.8)
        ax.set_title(f"{name} (n = {x.shape[0]})" if name else f"n = {x.shape[0]}")
        ax.set_xlabel(f"{axis_name} 1")
        ax.set_ylabel(f"{axis_name} 2")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, leg_labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in leg_labels:
                handles.append(h)
                leg_labels.append(lab)
    fig.legend(handles, leg_labels, loc="outside right center", title="class", fontsize=8)
    shown = "t-SNE" if method == "tsne" else "PCA"
    if method != requested:
        shown += f": fewer than {TSNE_MIN_POINTS} points, too few for t-SNE"
    fig.suptitle(f"{title} ({shown})")
    return _save(fig, path, dpi)
