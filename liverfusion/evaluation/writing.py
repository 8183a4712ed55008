"""What an evaluation writes: ``predictions.csv`` (and its reader), the LLD-MMRI ``submission.json``, metrics and
robustness tables as JSON / Markdown / CSV, all through atomic writes (a killed run leaves no half file)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from liverfusion.errors import DataError
from liverfusion.evaluation.predictions import PredictionSet
from liverfusion.evaluation.scoring import (
    ROBUSTNESS_METRICS,
    aggregate_by_patient,
    compare_predictions,
    lldmmri_style,
    metrics_with_ci,
    robustness_table,
    shown_metrics,
)
from liverfusion.utils.atomic import atomic_write_bytes, atomic_write_text


def predictions_csv(preds: PredictionSet) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "case_id",
            "patient_id",
            *[f"prob_{c}" for c in preds.class_names],
            "prediction",
            "prediction_name",
            "label",
            "label_name",
        ]
    )
    pred = preds.predictions
    for i, case in enumerate(preds.case_ids):
        y = int(preds.labels[i])
        w.writerow(
            [
                case,
                preds.patient_ids[i],
                *[f"{p:.6f}" for p in preds.probs[i]],
                int(pred[i]),
                preds.class_names[int(pred[i])],
                y if y >= 0 else "",
                preds.class_names[y] if y >= 0 else "",
            ]
        )
    return buf.getvalue()


def read_predictions_csv(path: str | Path) -> PredictionSet:
    """Read a ``predictions.csv`` back (for comparisons and reports)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("predictions file is missing", path=path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError("predictions file has no rows", path=path)
    prob_cols = [c for c in rows[0] if c.startswith("prob_")]
    if not prob_cols or "case_id" not in rows[0]:
        raise DataError(
            "not a liverfusion predictions.csv (needs case_id and prob_<class> columns)", path=path
        )
    return PredictionSet(
        case_ids=[r["case_id"] for r in rows],
        patient_ids=[r.get("patient_id") or r["case_id"] for r in rows],
        probs=np.asarray([[float(r[c]) for c in prob_cols] for r in rows]),
        labels=np.asarray(
            [int(r["label"]) if r.get("label", "") != "" else -1 for r in rows], dtype=np.int64
        ),
        class_names=[c[len("prob_") :] for c in prob_cols],
    )


def submission_json(preds: PredictionSet) -> str:
    """LLD-MMRI submission: one entry per case with the arg-max class and all class probabilities."""
    entries = [
        {"image_id": case, "prediction": int(p.argmax()), "score": [round(float(v), 6) for v in p]}
        for case, p in zip(preds.case_ids, preds.probs)
    ]
    return json.dumps(entries, indent=1)


def _fmt(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def metrics_markdown(
    metrics: Mapping[str, Mapping[str, float]],
    keys: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> str:
    """One row per metric with its 95 % CI; with ``class_names`` only what ``shown_metrics`` lists for that task
    (a binary task's AUROC once, with its DeLong CI beside the bootstrap one)."""
    keys = list(keys) if keys is not None else [k for k in metrics if not k.startswith("n_")]
    delong = metrics.get("binary/auroc_delong") if class_names is not None and len(class_names) == 2 else None
    if class_names is not None:
        keys = shown_metrics(keys, class_names)
    lines = ["| metric | value | 95 % CI |", "|---|---:|---|"]
    for k in keys:
        if k not in metrics:
            continue
        m = metrics[k]
        ci = f"[{_fmt(m['low'])}, {_fmt(m['high'])}]"
        if k == "auroc" and delong is not None:
            ci += f" (DeLong [{_fmt(delong['low'])}, {_fmt(delong['high'])}])"
        lines.append(f"| {k} | {_fmt(m['point'])} | {ci} |")
    return "\n".join(lines)


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            "| " + " | ".join(_fmt(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
        )
    return "\n".join(lines)


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path, payload: Any) -> Path:
    text = json.dumps(payload, indent=1, default=_json_default, allow_nan=True)
    return atomic_write_text(path, text)


def write_evaluation(
    preds: PredictionSet,
    out_dir: str | Path,
    n_boot: int | None = None,
    alpha: float | None = None,
    seed: int | None = None,
    threshold: float | None = None,
    aggregate: str | None = None,
    save_features: bool = True,
    compare_to: PredictionSet | None = None,
    compare_metric: str = "lld_score",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write predictions, submission, metrics with CIs, robustness and (optionally) per-patient results.

    A scoring setting left None is the evaluation group's (``conf/evaluation/default.yaml``)."""
    from liverfusion.utils.evaluation_settings import scoring

    s = scoring(n_boot=n_boot, alpha=alpha, seed=seed, threshold=threshold, aggregate=aggregate)
    n_boot, alpha, seed, threshold, aggregate = (
        s[k] for k in ("n_boot", "alpha", "seed", "threshold", "aggregate")
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.csv", predictions_csv(preds))
    atomic_write_text(out / "submission.json", submission_json(preds))
    summary: dict[str, Any] = {
        "n_cases": len(preds.case_ids),
        "n_labelled": int(preds.labelled.sum()),
        "class_names": preds.class_names,
        "modalities": preds.modalities,
        **dict(extra or {}),
    }
    if save_features and preds.features is not None:
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            case_ids=np.asarray(preds.case_ids),
            patient_ids=np.asarray(preds.patient_ids),
            labels=preds.labels,
            features=preds.features,
            encoder_features=preds.encoder_features if preds.encoder_features is not None else np.zeros(0),
        )
        atomic_write_bytes(out / "features.npz", buf.getvalue())
    if preds.has_labels:
        metrics = metrics_with_ci(preds, n_boot=n_boot, alpha=alpha, seed=seed, threshold=threshold)
        write_json(out / "metrics.json", metrics)
        unit = "per lesion" if lldmmri_style(preds.class_names) else "per case"
        text = f"# Metrics ({unit})\n\n" + metrics_markdown(metrics, class_names=preds.class_names) + "\n"
        summary["metrics"] = {k: v["point"] for k, v in metrics.items()}
        rob = robustness_table(
            preds, metrics=shown_metrics(ROBUSTNESS_METRICS, preds.class_names), threshold=threshold
        )
        if rob:
            atomic_write_text(out / "robustness.csv", rows_csv(rob))
            atomic_write_text(out / "robustness.md", table_markdown(rob) + "\n")
            text += "\n## Robustness: each modality dropped in turn\n\n" + table_markdown(rob) + "\n"
        if aggregate:
            patients, disagree = aggregate_by_patient(preds, aggregate)
            atomic_write_text(out / "patient_predictions.csv", predictions_csv(patients))
            pm = metrics_with_ci(patients, n_boot=n_boot, alpha=alpha, seed=seed, threshold=threshold)
            write_json(out / "patient_metrics.json", pm)
            summary["patient_metrics"] = {k: v["point"] for k, v in pm.items()}
            summary["patients_with_disagreeing_lesions"] = disagree
            what = "lesion" if lldmmri_style(preds.class_names) else "case"
            text += (
                f"\n## Per patient ({aggregate} of {what} probabilities)\n\n"
                + metrics_markdown(pm, class_names=preds.class_names)
                + "\n"
            )
            if disagree:
                text += f"\n{disagree} patient(s) have {what}s of different classes (majority label used).\n"
        if compare_to is not None:
            if compare_metric == "lld_score" and not lldmmri_style(preds.class_names):
                compare_metric = "macro_f1"  # the LLD-MMRI default means nothing for other classes
            cmp = compare_predictions(preds, compare_to, metric=compare_metric, n_boot=n_boot, seed=seed)
            write_json(out / "comparison.json", cmp)
            summary["comparison"] = cmp
            text += (
                f"\n## Paired comparison ({cmp['n_cases']} common cases)\n\n"
                f"{compare_metric}: this {cmp['metric_a']:.3f} vs other {cmp['metric_b']:.3f}, delta "
                f"{cmp['delta']:+.3f} [{cmp['low']:+.3f}, {cmp['high']:+.3f}], paired bootstrap p = "
                f"{cmp['p_value']:.3g}\n"
            )
            if "delong" in cmp and "p_value" in cmp["delong"]:
                text += f"DeLong AUROC test: p = {cmp['delong']['p_value']:.3g}\n"
        atomic_write_text(out / "metrics.md", text)
    else:
        summary["metrics"] = None
    write_json(out / "summary.json", summary)
    return summary
