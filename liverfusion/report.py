"""``python -m liverfusion.report DIR [DIR ...]``: aggregate cross-validation runs (one multirun, or several for
ablations) into ``results.md``, CSV tables and figures.

A run is a folder with ``test/summary.json`` (written by the classifier's test step). Runs are grouped into arms:
by the Hydra overrides that vary between them (``.hydra/overrides.yaml``, leaving out ``data.fold`` and ``seed``,
which are replicates), else by fusion / init / fine-tune mode / label fraction. Each DIR given is its own arm family.

Per arm: mean +- sample std over runs of every headline metric; the pooled predictions with bootstrap 95 % CIs
(out-of-fold when the runs' test cases are disjoint, as in nested CV; the fold-model ensemble when they share one
fixed test split); confusion matrix, ROC, per-fold scores. Across arms: paired comparisons on common cases (paired
bootstrap; DeLong for binary AUROC) and a t-SNE of the test features (e.g. pretrained vs scratch encoder).
A model card (``docs/model_card_template.md``) is filled for the first arm. ``--wandb offline|online`` logs the
tables and figures to W&B too.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import logging
import string
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from liverfusion.errors import CheckpointError, DataError
from liverfusion.evaluation import (
    PredictionSet,
    compare_predictions,
    lldmmri_style,
    metrics_markdown,
    metrics_with_ci,
    read_predictions_csv,
    rows_csv,
    shown_metrics,
    table_markdown,
    write_json,
)
from liverfusion.utils.atomic import atomic_write_text
from liverfusion.utils.cli import cli_errors

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
REPLICATE_KEYS = ("data.fold", "seed")
GENERIC_FOLDERS = {"runs", "run", "multiruns", "multirun", "train", "logs", "report", "finetune", "outputs"}
"""Folder names that say nothing about an arm: never used as its name."""
TEMPLATE = Path(__file__).resolve().parents[1] / "docs" / "model_card_template.md"


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    metrics: dict[str, float]
    overrides: list[str] | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def fold(self) -> int | None:
        return self.summary.get("fold")

    def predictions(self) -> PredictionSet:
        return read_predictions_csv(self.path / "test" / "predictions.csv")

    def features(self) -> tuple[np.ndarray, np.ndarray] | None:
        f = self.path / "test" / "features.npz"
        if not f.is_file():
            return None
        with np.load(f, allow_pickle=False) as z:
            feats = z["encoder_features"] if z["encoder_features"].size else z["features"]
            return feats, z["labels"]


@dataclass
class Arm:
    name: str
    runs: list[Run]


def _read_overrides(run: Path) -> list[str] | None:
    f = run / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None
    import yaml

    values = yaml.safe_load(f.read_text()) or []
    return [str(v) for v in values]


def _read_config(run: Path) -> dict[str, Any]:
    f = run / "config_resolved.yaml"
    if not f.is_file():
        return {}
    import yaml

    return yaml.safe_load(f.read_text()) or {}


def find_runs(root: str | Path) -> list[Run]:
    """Every run under ``root`` (or ``root`` itself) that has test outputs."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("report folder does not exist", path=root)
    runs = []
    for summary in sorted(root.rglob("test/summary.json")):
        path = summary.parent.parent
        data = json.loads(summary.read_text())
        metrics = data.get("metrics") or {}
        if not metrics:
            log.warning("%s has no labelled test metrics: left out", path)
            continue
        runs.append(Run(path, data, metrics, _read_overrides(path), _read_config(path)))
    return runs


def _is_replicate(override: str) -> bool:
    return _key(override) in REPLICATE_KEYS


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _fold_bound_keys(runs: Sequence[Run]) -> set[str]:
    """Override keys whose value is fixed by the fold (e.g. a per-fold encoder path): replicates, not arms."""
    values: dict[str, dict[Any, set[str]]] = {}
    for r in runs:
        for o in r.overrides or []:
            values.setdefault(_key(o), {}).setdefault(r.fold, set()).add(o)
    bound = set()
    for key, by_fold in values.items():
        varies = len(set().union(*by_fold.values())) > 1
        if varies and None not in by_fold and all(len(v) == 1 for v in by_fold.values()):
            bound.add(key)
    return bound


def _descriptor(run: Run) -> str:
    s = run.summary
    parts = [str(s.get("fusion", "?")), str(s.get("init", "?")), str(s.get("finetune_mode", "?"))]
    lf = s.get("label_fraction")
    if lf is not None and float(lf) < 1.0:
        parts.append(f"labels={float(lf):g}")
    return "-".join(parts)


def experiment_name(runs: Sequence[Run]) -> str | None:
    """The experiment all ``runs`` share (``+experiment=NAME``, else the run's ``task_name``), or None."""
    names = set()
    for r in runs:
        name = None
        for o in r.overrides or []:
            if _key(o) == "experiment":
                name = o.split("=", 1)[1]
        task = r.config.get("task_name") if isinstance(r.config, dict) else None
        names.add(name or (str(task) if task and task != "train" else None))
    return next(iter(names)) if len(names) == 1 and None not in names else None


def _generic_folder(name: str) -> bool:
    """``runs``, ``multiruns``, ... or a Hydra time stamp (``2026-01-01_00-00-00``, ``12-30-59``)."""
    import re

    return name.lower() in GENERIC_FOLDERS or bool(re.fullmatch(r"[\d_.:-]+", name))


def family_name(folder: str | Path, runs: Sequence[Run]) -> str:
    """What a folder's runs are called when no ``--names`` are given: their experiment, else the folder's name
    unless it is a generic one (``runs``, a time stamp), else what the runs are (fusion-init-fine-tune mode)."""
    exp = experiment_name(runs)
    if exp:
        return exp
    name = Path(folder).expanduser().resolve().name
    return _descriptor(runs[0]) if _generic_folder(name) else name


def _unique(labels: Sequence[str], folders: Sequence[str | Path]) -> list[str]:
    """Labels made unique (two folders of one experiment): the folder's name, else a number, appended."""
    out = list(labels)
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            name = Path(folders[i]).expanduser().resolve().name
            out[i] = f"{lab} [{name}]" if not _generic_folder(name) else f"{lab} [{i + 1}]"
    if len(set(out)) < len(out):
        out = [f"{lab} [{i + 1}]" for i, lab in enumerate(labels)]
    return out


def group_runs(runs: Sequence[Run], label: str) -> list[Arm]:
    """Group the runs of one folder into arms (see the module docstring)."""
    if not runs:
        return []
    keys: list[tuple[str, ...]] = []
    if all(r.overrides is not None for r in runs):
        fold_bound = _fold_bound_keys(runs)
        sets = [
            tuple(o for o in r.overrides if not _is_replicate(o) and _key(o) not in fold_bound) for r in runs
        ]
        common = set(sets[0]).intersection(*map(set, sets[1:]))
        keys = [tuple(o for o in s if o not in common) for s in sets]
    else:
        keys = [(_descriptor(r),) for r in runs]
    if len({_descriptor(r) for r in runs}) > 1 and len(set(keys)) == 1:
        keys = [(_descriptor(r),) for r in runs]
    if len(set(keys)) == 1:  # one arm: named by its family (label, experiment), not by what its runs share
        keys = [()] * len(runs)
    arms: dict[tuple[str, ...], list[Run]] = {}
    for k, r in zip(keys, runs):
        arms.setdefault(k, []).append(r)
    out = []
    for k, members in arms.items():
        k = tuple(part for part in k if part != label)  # the descriptor already named the family
        name = label if not k else (f"{label}: {', '.join(k)}" if label else ", ".join(k))
        name = name or experiment_name(members) or _descriptor(members[0])
        out.append(Arm(name, sorted(members, key=lambda r: (r.fold is None, r.fold or 0, str(r.path)))))
    return out


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


def _fmt(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def file_slug(name: str) -> str:
    """An arm name as it appears in the report's file names (``confusion_<slug>.png``, ...)."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return out.strip("_")[:80] or "arm"


def _wide_table(rows: Sequence[Mapping[str, Any]], arms: Sequence[Arm], metrics: Sequence[str]) -> str:
    """Markdown: one row per arm, one column per metric, ``mean +- std`` (pooled [CI])."""
    by = {(r["arm"], r["metric"]): r for r in rows}
    shown = [m for m in metrics if any((a.name, m) in by for a in arms)]
    lines = ["| arm | runs | " + " | ".join(shown) + " |", "|---|---:|" + "---|" * len(shown)]
    for a in arms:
        cells = []
        for m in shown:
            r = by.get((a.name, m))
            if r is None:
                cells.append("")
                continue
            std = f" ± {r['std']:.3f}" if np.isfinite(r["std"]) else ""
            cells.append(f"{r['mean']:.3f}{std}")
        lines.append(f"| {a.name} | {len(a.runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pooled_table(
    pooled: Mapping[str, tuple[Mapping[str, Mapping[str, float]], str]], metrics: Sequence[str]
) -> str:
    shown = [m for m in metrics if any(m in p for p, _ in pooled.values())]
    lines = [
        "| arm | pooled as | cases | " + " | ".join(shown) + " |",
        "|---|---|---:|" + "---|" * len(shown),
    ]
    for name, (p, kind) in pooled.items():
        cells = [
            f"{_fmt(p[m]['point'])} [{_fmt(p[m]['low'])}, {_fmt(p[m]['high'])}]" if m in p else ""
            for m in shown
        ]
        n = int(p["n_cases"]["point"]) if "n_cases" in p else ""
        lines.append(f"| {name} | {kind} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_report(
    dirs: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    metric: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    embedding: str = "tsne",
    plots: bool = True,
    card_template: str | Path | None = None,
    wandb_mode: str = "off",
) -> dict[str, Any]:
    """Aggregate the runs under ``dirs`` into ``out_dir``; return the summary rows and comparisons.

    ``metric`` (of the paired comparisons): None picks ``lld_score`` for LLD-MMRI-style data, else ``macro_f1``
    (``lld_score`` asked of other data falls back to ``macro_f1`` too: it is the LLD-MMRI challenge's score)."""
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
        labels = _unique([family_name(d, runs) for d, runs in zip(dirs, found)], dirs)
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

    comparisons = []
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
        figures = _plots(arms, pooled_sets, pooled, out, metrics, class_names, embedding, seed)
        for name, cal in calibration.items():
            if cal.get("figure"):
                figures[f"reliability {name}"] = out / cal["figure"]

    md = _markdown(arms, rows, pooled, comparisons, figures, metrics, metric, dirs, out, calibration)
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
        _to_wandb(out, rows, comparisons, figures, wandb_mode, privacy=private)
    return {
        "summary": rows,
        "comparisons": comparisons,
        "arms": [a.name for a in arms],
        "calibration": calibration,
    }


def arm_calibration(arm: Arm, preds: PredictionSet, out: Path | None) -> dict[str, Any] | None:
    """The temperature stored with the arm's models (``evaluate calibrate=true``: ``calibration.json`` in the
    multirun or run folder, fitted for exactly these checkpoints) and what it does to the pooled test predictions:
    ECE, MCE, Brier and NLL before / after, and a reliability diagram (``reliability_<arm>.png``) when ``out``."""
    import os

    from liverfusion.evaluation.calibration import (
        calibration_scores,
        plot_reliability,
        stored_calibration,
    )
    from liverfusion.evaluation.loading import best_in_run

    try:
        members = [best_in_run(r.path) for r in arm.runs]
    except CheckpointError:
        return None
    if not members or any(m is None for m in members):
        return None
    paths = [r.path for r in arm.runs]
    root = paths[0] if len(paths) == 1 else Path(os.path.commonpath([str(p) for p in paths]))
    try:
        stored = stored_calibration(root, members)  # type: ignore[arg-type]
    except CheckpointError as err:
        log.warning("%s: calibration not shown: %s", arm.name, err)
        return None
    if stored is None:
        return None
    temperature = float(stored["temperature"])
    labelled = preds.subset(preds.labelled)
    if not labelled.case_ids:
        return None
    calibrated = labelled.with_temperature(temperature)
    result: dict[str, Any] = {
        "temperature": temperature,
        "file": stored.get("path"),
        "fitted_on": stored.get("fitted_on"),
        "n_fitted": stored.get("n_cases"),
        "before": calibration_scores(labelled),
        "after": calibration_scores(calibrated),
    }
    if out is not None:
        name = f"reliability_{file_slug(arm.name)}.png"
        plot_reliability(
            {"uncalibrated": labelled, f"calibrated (T = {temperature:.3f})": calibrated},
            out / name,
            title="Reliability",
        )
        result["figure"] = name
    return result


def _calibration_markdown(calibration: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| arm | temperature | ECE before | ECE after | MCE before | MCE after | Brier before | Brier after | "
        "NLL before | NLL after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in calibration.items():
        b, a = c["before"], c["after"]
        cells = [f"{b[k]:.3f} | {a[k]:.3f}" for k in ("ece", "mce", "brier", "nll")]
        lines.append(f"| {name} | {c['temperature']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(
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


def _markdown(
    arms, rows, pooled, comparisons, figures, metrics, metric, dirs, out: Path, calibration=None
) -> str:
    lines = [
        "# Results",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `python -m liverfusion.report "
        + " ".join(str(d) for d in dirs)
        + "`.",
        "",
        "## Per-run test scores: mean ± sample std over runs (folds / seeds)",
        "",
        _wide_table(rows, arms, metrics),
        "",
        "## Pooled predictions with patient-level bootstrap 95 % CIs",
        "",
        _pooled_table(pooled, metrics),
        "",
    ]
    if comparisons:
        lines += [f"## Paired comparisons on common cases ({metric}; paired bootstrap over patients)", ""]
        lines += [table_markdown(comparisons), ""]
    if calibration:
        lines += [
            "## Calibration: the temperature stored with the model, on the pooled test predictions",
            "",
            "ECE over 15 confidence bins (top label), MCE its worst bin, multiclass Brier score and NLL, before and "
            "after dividing the logits by the temperature that `evaluate calibrate=true` fitted on the validation "
            "split (predictions, hence accuracy and F1, are unchanged).",
            "",
            _calibration_markdown(calibration),
            "",
        ]
    lines += ["## Runs", ""]
    for a in arms:
        lines.append(f"- **{a.name}**: " + ", ".join(f"fold {r.fold}: `{r.path}`" for r in a.runs))
    if figures:
        lines += ["", "## Figures", ""]
        for name, path in figures.items():
            lines.append(f"![{name}]({Path(path).relative_to(out)})")
    for a in arms:
        rob = a.runs[0].path / "test" / "robustness.md"
        if rob.is_file():
            lines += [
                "",
                f"## Robustness, first run of {a.name} (each modality dropped in turn)",
                "",
                rob.read_text().strip(),
            ]
    return "\n".join(lines) + "\n"


CARD_NEUTRAL = (
    (
        r"- Lesion crops are assumed to be centred on the lesion \(the LLD-MMRI convention\); the model does not "
        r"detect\s+lesions\.",
        "- Inputs are assumed to be cropped and centred as the training data were; the model does not localise "
        "findings.",
    ),
    (r"each lesion \(case\)", "each case"),
    (r"phase timing", "acquisition timing"),
    (r"\blesions\b", "cases"),
    (r"\blesion\b", "case"),
)
"""Liver-lesion wording of the model card template made neutral for other data (LGG, prostate, ...)."""


def neutral_card(text: str) -> str:
    """``text`` without the LLD-MMRI / lesion wording (for a model trained on other data)."""
    import re

    for pattern, repl in CARD_NEUTRAL:
        text = re.sub(pattern, repl, text)
    return text


def fill_model_card(
    arm: Arm,
    pooled: tuple[Mapping[str, Mapping[str, float]], str],
    rows: Sequence[Mapping[str, Any]],
    template: str | Path | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> str | None:
    """The model card template filled with the facts of ``arm`` (None when no template is found); the lesion
    wording only for LLD-MMRI-style data, and the calibration when one is stored with the model."""
    path = Path(template) if template else TEMPLATE
    if not path.is_file():
        log.warning("model card template %s not found: no model card written", path)
        return None
    run = arm.runs[0]
    cfg = run.config
    data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    layout = data.get("layout", {}) if isinstance(data, dict) else {}
    model = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    pre = run.summary.get("pretrained") or {}
    ci, kind = pooled
    class_names = run.summary.get("class_names") or []
    lld = lldmmri_style(class_names)
    arm_rows = [r for r in rows if r["arm"] == arm.name]
    cv = "\n".join(
        f"| {r['metric']} | {r['mean']:.3f} ± {_fmt(r['std'])} | {r['n_runs']} |" for r in arm_rows
    )
    split_rows = []
    for part, info in (run.summary.get("splits") or {}).items():
        per_class = ", ".join(f"{k} {v}" for k, v in (info.get("per_class") or {}).items())
        split_rows.append(
            f"| {part} | {info.get('cases')} | {info.get('patients')} | {info.get('unlabelled')} | {per_class} |"
        )
    data_table = (
        "| split (first run) | cases | patients | labels withheld | per class |\n|---|---:|---:|---:|---|\n"
        + "\n".join(split_rows)
        if split_rows
        else "(split sizes not recorded)"
    )
    values = {
        "data_table": data_table,
        "title": arm.name or "liverfusion classifier",
        "date": dt.date.today().isoformat(),
        "dataset": str(layout.get("name", "?")),
        "data_root": str(layout.get("root", "?")),
        "modalities": ", ".join(run.summary.get("modalities") or []),
        "classes": ", ".join(class_names),
        "preprocess": json.dumps(data.get("preprocess", {})),
        "fusion": str(run.summary.get("fusion")),
        "encoder": str((model.get("encoder") or {}).get("arch", "?")),
        "init": str(run.summary.get("init")),
        "finetune": str(run.summary.get("finetune_mode")),
        "pretrained_from": str(pre.get("path", "none (random initialisation)")),
        "pretrained_on": json.dumps((pre.get("source") or {}).get("dataset")),
        "n_runs": str(len(arm.runs)),
        "split": json.dumps(data.get("split", {})),
        "selection": f"{run.summary.get('selection_metric')} on the validation fold",
        "pooled_kind": kind,
        "metrics_table": metrics_markdown(ci, [m for m in HEADLINE if m in ci], class_names=class_names),
        "cv_table": "| metric | mean ± std | runs |\n|---|---|---:|\n" + cv,
        "n_cases": str(int(ci["n_cases"]["point"])) if "n_cases" in ci else "?",
        "n_patients": str(int(ci["n_patients"]["point"])) if "n_patients" in ci else "?",
        "unit": "lesion" if lld else "case",
        "units": "lesions" if lld else "cases",
    }
    text = path.read_text()
    if not lld:
        text = neutral_card(text)
    card = string.Template(text).safe_substitute(values)
    if calibration:
        b, a = calibration["before"], calibration["after"]
        card = card.rstrip("\n") + (
            "\n\n## Calibration\n"
            f"Temperature {calibration['temperature']:.3f} (stored with the model, fitted on "
            f"{calibration.get('fitted_on') or 'the validation split'}); on the pooled test predictions: ECE "
            f"{b['ece']:.3f} -> {a['ece']:.3f}, MCE {b['mce']:.3f} -> {a['mce']:.3f}, Brier {b['brier']:.3f} -> "
            f"{a['brier']:.3f}, NLL {b['nll']:.3f} -> {a['nll']:.3f}. `liverfusion.predict` applies it.\n"
        )
    return card


def _to_wandb(
    out: Path, rows, comparisons, figures: Mapping[str, Path], mode: str, privacy: bool = False
) -> None:
    """The tables (per-arm metrics, comparisons: no case ids) and, unless ``privacy``, the figures."""
    import wandb

    run = wandb.init(
        project="liverfusion",
        job_type="report",
        group=out.name,
        name=f"report-{out.name}",
        mode=mode,
        dir=str(out),
    )
    try:
        if rows:
            run.log({"results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        if comparisons:
            cols = list(comparisons[0])
            run.log(
                {
                    "comparisons": wandb.Table(
                        columns=cols, data=[[c.get(k) for k in cols] for c in comparisons]
                    )
                }
            )
        if privacy:
            log.info("privacy: report figures not logged to W&B (they stay in %s)", out)
        else:
            run.log({name: wandb.Image(str(p)) for name, p in figures.items()})
    finally:
        wandb.finish()


def format_console(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = ("macro_f1", "lld_score", "auroc", "balanced_accuracy"),
) -> str:
    """A compact text table for terminals (the demo prints it)."""
    buf = io.StringIO()
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    shown = [m for m in metrics if any(r["metric"] == m for r in rows)]
    buf.write(f"{'arm':<28}" + "".join(f"{m:>26}" for m in shown) + "\n")
    for a in arms:
        buf.write(f"{a[:27]:<28}")
        for m in shown:
            r = next((r for r in rows if r["arm"] == a and r["metric"] == m), None)
            cell = "" if r is None else f"{r['pooled']:.3f} [{r['pooled_low']:.3f},{r['pooled_high']:.3f}]"
            buf.write(f"{cell:>26}")
        buf.write("\n")
    return buf.getvalue()


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a problem ends it with one line and exit status 2 (``liverfusion.utils.cli``)."""
    # the parser and its --help page live in liverfusion.help (answered there without importing torch)
    from liverfusion.help import build_parser
    from liverfusion.utils.console import quiet_third_party

    args = build_parser("report").parse_args(argv)
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for d in args.dirs:  # before anything is written (the default output folder lies inside the first DIR)
        if not Path(d).is_dir():
            raise DataError("no such folder: pass a multirun or run folder", path=d)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    res = make_report(
        args.dirs,
        out,
        names=args.names,
        metric=args.metric,
        n_boot=args.n_boot,
        seed=args.seed,
        embedding=args.embedding,
        plots=not args.no_plots,
        card_template=args.card_template,
        wandb_mode=args.wandb,
    )
    print(format_console(res["summary"]))
    print(f"report: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
