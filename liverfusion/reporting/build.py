"""``make_report``: aggregate the runs under some folders into one report folder (tables, figures, model card)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from liverfusion.errors import DataError
from liverfusion.evaluation import (
    PredictionSet,
    lldmmri_style,
    metrics_with_ci,
    rows_csv,
    shown_metrics,
    write_json,
)
from liverfusion.reporting.calibration import arm_calibration
from liverfusion.reporting.markdown import results_markdown
from liverfusion.reporting.model_card import fill_model_card
from liverfusion.reporting.plots import report_figures
from liverfusion.reporting.runs import Arm, family_name, find_runs, group_runs, unique_labels
from liverfusion.reporting.tables import (
    HEADLINE,
    comparison_rows,
    fold_table,
    pooled_predictions,
    summary_rows,
)
from liverfusion.reporting.wandb_upload import to_wandb
from liverfusion.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


def make_report(
    dirs: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    metric: str | None = None,
    n_boot: int | None = None,
    seed: int | None = None,
    embedding: str = "tsne",
    plots: bool = True,
    card_template: str | Path | None = None,
    wandb_mode: str = "off",
) -> dict[str, Any]:
    """Aggregate the runs under ``dirs`` into ``out_dir``; return the summary rows and comparisons.

    ``metric`` (of the paired comparisons): None picks ``lld_score`` for LLD-MMRI-style data, else ``macro_f1``
    (``lld_score`` asked of other data falls back to ``macro_f1`` too: it is the LLD-MMRI challenge's score).
    ``n_boot`` / ``seed`` left None are the evaluation group's (``conf/evaluation/default.yaml``)."""
    from liverfusion.utils.evaluation_settings import scoring

    s = scoring(n_boot=n_boot, seed=seed)
    n_boot, seed = s["n_boot"], s["seed"]
    out = Path(out_dir)
    if names is not None and len(names) != len(dirs):
        raise DataError(f"{len(names)} names for {len(dirs)} folders")
    found = []
    for d in dirs:
        runs = find_runs(d)
        if not runs:
            raise DataError("no run with test metrics (test/summary.json) found", path=d)
        found.append(runs)
    if names:
        labels = [str(n) for n in names]
    elif len(dirs) > 1:
        labels = unique_labels([family_name(d, runs) for d, runs in zip(dirs, found)], dirs)
    else:
        labels = [""]
    arms: list[Arm] = []
    for label, runs in zip(labels, found):
        arms.extend(group_runs(runs, label))
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to report
    class_names = arms[0].runs[0].summary.get("class_names") or []
    available = [m for m in HEADLINE if any(m in r.metrics for a in arms for r in a.runs)]
    metrics = shown_metrics(available, class_names)
    lld = lldmmri_style(class_names)
    if metric is None or (metric == "lld_score" and not lld):
        if metric == "lld_score":
            log.info("lld_score is the LLD-MMRI challenge's score: these classes are compared by macro_f1")
        metric = "lld_score" if lld and "lld_score" in metrics else "macro_f1"
    if metric not in available:
        raise DataError(f"metric {metric!r} was not reported by these runs; have {metrics}")

    pooled: dict[str, tuple[dict[str, dict[str, float]], str]] = {}
    pooled_sets: dict[str, PredictionSet] = {}
    rows, folds = [], []
    for a in arms:
        preds, kind = pooled_predictions(a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = metrics_with_ci(preds, n_boot=n_boot, seed=seed)
        pooled[a.name] = (ci, kind)
        pooled_sets[a.name] = preds
        rows += summary_rows(a, metrics, ci)
        folds += fold_table(a, metrics)
    atomic_write_text(out / "results.csv", rows_csv(rows))
    atomic_write_text(out / "folds.csv", rows_csv(folds))

    comparisons = comparison_rows(arms, pooled_sets, metric, n_boot, seed)
    if comparisons:
        keys = list(dict.fromkeys(k for c in comparisons for k in c))
        comparisons = [{k: c.get(k, float("nan")) for k in keys} for c in comparisons]
        atomic_write_text(out / "comparisons.csv", rows_csv(comparisons))

    calibration = {}
    for a in arms:
        found_cal = arm_calibration(a, pooled_sets[a.name], out if plots else None)
        if found_cal is not None:
            calibration[a.name] = found_cal

    figures: dict[str, Path] = {}
    if plots:
        figures = report_figures(arms, pooled_sets, pooled, out, metrics, class_names, embedding, seed)
        for name, cal in calibration.items():
            if cal.get("figure"):
                figures[f"reliability {name}"] = out / cal["figure"]

    md = results_markdown(arms, rows, pooled, comparisons, figures, metrics, metric, dirs, out, calibration)
    atomic_write_text(out / "results.md", md)
    write_json(
        out / "results.json",
        {
            "summary": rows,
            "comparisons": comparisons,
            "comparison_metric": metric,
            "pooled": {k: {"kind": v[1], "metrics": v[0]} for k, v in pooled.items()},
            "calibration": calibration,
        },
    )
    card = fill_model_card(arms[0], pooled[arms[0].name], rows, card_template, calibration.get(arms[0].name))
    if card is not None:
        atomic_write_text(out / "model_card.md", card)
    if wandb_mode != "off":
        # a run trained with privacy on (clinical data): no image of it leaves the machine through W&B
        private = any(bool(r.config.get("privacy")) for a in arms for r in a.runs)
        to_wandb(out, rows, comparisons, figures, wandb_mode, privacy=private)
    return {
        "summary": rows,
        "comparisons": comparisons,
        "arms": [a.name for a in arms],
        "calibration": calibration,
    }
