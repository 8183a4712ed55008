"""The report's figures: per arm a confusion matrix, ROC with bootstrap CIs and per-run scores; a t-SNE / PCA of
the test features of every arm's first run. matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from liverfusion.evaluation import PredictionSet
from liverfusion.reporting.runs import Arm, file_slug


def report_figures(
    arms: Sequence[Arm],
    pooled_sets: Mapping[str, PredictionSet],
    pooled: Mapping[str, tuple[Mapping[str, Mapping[str, float]], str]],
    out: Path,
    metrics: Sequence[str],
    class_names: Sequence[str],
    embedding: str,
    seed: int,
) -> dict[str, Path]:
    from liverfusion.metrics import confusion_matrix
    from liverfusion.viz.plots import plot_confusion_matrix, plot_embedding, plot_per_fold, plot_roc

    figs: dict[str, Path] = {}
    for a in arms:
        s = file_slug(a.name)
        preds = pooled_sets[a.name].subset(pooled_sets[a.name].labelled)
        probs = preds.probs / preds.probs.sum(axis=1, keepdims=True)
        cm = confusion_matrix(probs, preds.labels)
        figs[f"confusion {a.name}"] = plot_confusion_matrix(
            cm, preds.class_names, out / f"confusion_{s}.png", title=f"Confusion matrix: {a.name}"
        )
        ci = pooled[a.name][0]
        intervals = {}
        for c in preds.class_names:
            m = ci.get(f"auroc/{c}")
            if m is not None and np.isfinite(m["low"]) and np.isfinite(m["high"]):
                intervals[c] = (m["low"], m["high"])
        figs[f"roc {a.name}"] = plot_roc(
            probs,
            preds.labels,
            preds.class_names,
            out / f"roc_{s}.png",
            title=f"ROC: {a.name}",
            ci=intervals,
            ci_method="bootstrap over patients",
        )
        per_fold = {m: [float(r.metrics[m]) for r in a.runs if m in r.metrics] for m in metrics if m != "ece"}
        per_fold = {m: v for m, v in per_fold.items() if v}
        figs[f"per-fold {a.name}"] = plot_per_fold(
            per_fold, out / f"per_fold_{s}.png", title=f"Per-run test scores: {a.name}"
        )
    if embedding != "none":
        panels = {}
        for a in arms:
            feats = a.runs[0].features()
            if feats is not None and feats[0].shape[0] >= 3:
                init = a.runs[0].summary.get("init", "")
                panels[f"{a.name} ({init})" if init and init not in a.name else a.name] = feats
        if panels:
            figs["embedding"] = plot_embedding(
                panels,
                None,
                list(class_names),
                out / "embedding.png",
                method=embedding,
                seed=seed,
                n_threads=1,
                max_iter=500,
                title="Test-set encoder features (first run of each arm)",
            )
    return figs
