"""The report's numbers: per-arm pooled predictions, per-run and per-arm metric rows, paired comparisons."""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from liverfusion.errors import DataError
from liverfusion.evaluation import PredictionSet, compare_predictions
from liverfusion.reporting.runs import Arm

log = logging.getLogger(__name__)

HEADLINE = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "kappa",
    "lld_score",
    "auroc",
    "ece",
    "binary/auroc",
    "binary/sensitivity",
    "binary/specificity",
)


def pooled_predictions(arm: Arm) -> tuple[PredictionSet, str]:
    """Out-of-fold pooling for disjoint test sets; the mean over runs (fold ensemble) when cases repeat."""
    sets = [r.predictions() for r in arm.runs]
    ids = [set(s.case_ids) for s in sets]
    total = sum(len(i) for i in ids)
    union = set().union(*ids)
    kind = "out-of-fold (pooled)" if total == len(union) else "fold ensemble (mean probabilities)"
    if len(sets) == 1:
        kind = "single run"
    by_case: dict[str, list[tuple[int, int]]] = {}
    for si, s in enumerate(sets):
        for ci, c in enumerate(s.case_ids):
            by_case.setdefault(c, []).append((si, ci))
    cases = sorted(by_case)
    first = sets[0]
    probs = np.stack([np.mean([sets[si].probs[ci] for si, ci in by_case[c]], axis=0) for c in cases])
    labels = np.asarray([sets[by_case[c][0][0]].labels[by_case[c][0][1]] for c in cases], dtype=np.int64)
    patients = [sets[by_case[c][0][0]].patient_ids[by_case[c][0][1]] for c in cases]
    for s in sets[1:]:
        if s.class_names != first.class_names:
            raise DataError(f"runs of arm {arm.name!r} disagree on class names")
    return PredictionSet(cases, patients, probs, labels, first.class_names), kind


def fold_table(arm: Arm, metrics: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for r in arm.runs:
        row: dict[str, Any] = {"arm": arm.name, "run": str(r.path), "fold": r.fold}
        row.update({m: float(r.metrics[m]) for m in metrics if m in r.metrics})
        rows.append(row)
    return rows


def summary_rows(arm: Arm, metrics: Sequence[str], pooled: Mapping[str, Mapping[str, float]]) -> list[dict]:
    rows = []
    for m in metrics:
        vals = np.asarray([float(r.metrics[m]) for r in arm.runs if m in r.metrics], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            continue
        p = pooled.get(m, {})
        rows.append(
            {
                "arm": arm.name,
                "metric": m,
                "mean": float(vals.mean()),
                "std": float(vals.std(ddof=1)) if vals.size > 1 else float("nan"),
                "n_runs": int(vals.size),
                "pooled": float(p.get("point", float("nan"))),
                "pooled_low": float(p.get("low", float("nan"))),
                "pooled_high": float(p.get("high", float("nan"))),
            }
        )
    return rows


def comparison_rows(
    arms: Sequence[Arm], pooled_sets: Mapping[str, PredictionSet], metric: str, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """Paired comparisons of the arms' pooled predictions on their common cases (paired bootstrap; DeLong for binary
    AUROC): every pair, or each arm against the first when there are more than five. A pair that cannot be
    compared (a ``DataError``, e.g. no common cases) is left out with a warning."""
    comparisons: list[dict[str, Any]] = []
    pairs = list(itertools.combinations(arms, 2))
    if len(arms) > 5:  # many arms: compare each with the first (the reference)
        pairs = [(arms[0], b) for b in arms[1:]]
    for a, b in pairs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = compare_predictions(
                    pooled_sets[a.name], pooled_sets[b.name], metric=metric, n_boot=n_boot, seed=seed
                )
        except DataError as err:
            log.warning("no comparison %s vs %s: %s", a.name, b.name, err)
            continue
        row = {
            "a": a.name,
            "b": b.name,
            "metric": metric,
            "n_cases": c["n_cases"],
            "a_value": c["metric_a"],
            "b_value": c["metric_b"],
            "delta": c["delta"],
            "low": c["low"],
            "high": c["high"],
            "p_value": c["p_value"],
        }
        if "delong" in c and "p_value" in c["delong"]:
            row["delong_auroc_p"] = c["delong"]["p_value"]
        comparisons.append(row)
    return comparisons
