"""Calibration: temperature scaling fitted on validation logits, stored with the model, and the scores that say
whether probabilities can be read as probabilities (ECE, MCE, Brier, NLL, reliability diagram) and whether the
confidence ranks cases well enough to defer the doubtful ones (risk-coverage curve, AURC, macro-F1 at 80 % coverage).

One positive temperature divides every logit of a case, so it never changes a prediction: accuracy, F1 and kappa
stay as they are while over- or under-confidence is corrected (Guo et al., 2017). A fold ensemble gets one
temperature, fitted on the out-of-fold validation logits of its members (each case scored by the member that did
not train on it) and applied to the ensemble's output (the log of its mean probability), so the ensemble's arg-max
is unchanged too.

The fitted temperature is stored as ``calibration.json`` in the run (or multirun) folder, or beside a single
``.ckpt`` as ``<name>.calibration.json``; it lists the content digests of the checkpoints it was fitted for, so a
calibration is only ever applied to the very weights it belongs to.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics.functional.classification as tmf
from scipy.optimize import minimize_scalar

from liverfusion.errors import CheckpointError, DataError
from liverfusion.evaluation.predictions import PredictionSet, _log_softmax
from liverfusion.utils.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "liverfusion-calibration/1"
CALIBRATION_FILE = "calibration.json"
N_BINS = 15
COVERAGE = 0.8
TEMPERATURE_BOUNDS = (0.05, 20.0)


# ---------------------------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------------------------
def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    lp = _log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-lp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of labelled validation cases (bounded search on log T)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    keep = labels >= 0
    if keep.sum() < 2:
        raise DataError(f"temperature scaling needs labelled validation cases; got {int(keep.sum())}")
    z, y = logits[keep], labels[keep]
    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    res = minimize_scalar(lambda t: nll(z, y, float(np.exp(t))), bounds=(lo, hi), method="bounded")
    temperature = float(np.exp(res.x))
    if temperature > 0.98 * TEMPERATURE_BOUNDS[1] or temperature < 1.02 * TEMPERATURE_BOUNDS[0]:
        log.warning(
            "fitted temperature %.3g lies at the search bound %s: the validation logits carry little signal",
            temperature,
            TEMPERATURE_BOUNDS,
        )
    return temperature


def pooled_validation(sets: Sequence[PredictionSet]) -> PredictionSet:
    """The members' validation predictions as one set (each case scored by a member that did not train on it)."""
    if not sets:
        raise DataError("no validation predictions to calibrate on")
    return PredictionSet(
        case_ids=[c for s in sets for c in s.case_ids],
        patient_ids=[p for s in sets for p in s.patient_ids],
        probs=np.concatenate([s.probs for s in sets]),
        labels=np.concatenate([s.labels for s in sets]),
        class_names=sets[0].class_names,
        modalities=sets[0].modalities,
        log_probs=np.concatenate([s.logits() for s in sets]),
    )


# ---------------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------------
def _labelled(preds: PredictionSet) -> tuple[np.ndarray, np.ndarray]:
    keep = preds.labelled
    if not keep.any():
        raise DataError("calibration scores need labelled cases")
    p = np.asarray(preds.probs[keep], dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True), preds.labels[keep]


def calibration_scores(preds: PredictionSet, n_bins: int = N_BINS) -> dict[str, float]:
    """ECE and MCE (top-label, ``n_bins`` equal-width bins, torchmetrics), multiclass Brier score and NLL."""
    p, y = _labelled(preds)
    k = p.shape[1]
    pt, yt = torch.as_tensor(p), torch.as_tensor(y)
    onehot = np.eye(k)[y]
    return {
        "ece": tmf.multiclass_calibration_error(pt, yt, num_classes=k, n_bins=n_bins, norm="l1").item(),
        "mce": tmf.multiclass_calibration_error(pt, yt, num_classes=k, n_bins=n_bins, norm="max").item(),
        "brier": float(((p - onehot) ** 2).sum(axis=1).mean()),
        "nll": float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()),
        "n_cases": float(len(y)),
    }


def reliability_bins(preds: PredictionSet, n_bins: int = N_BINS) -> list[dict[str, float]]:
    """Per confidence bin: its range, case count, mean confidence and accuracy (the reliability diagram)."""
    p, y = _labelled(preds)
    conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # torchmetrics' binning: a confidence on an edge belongs to the bin below it
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = idx == b
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": float(sel.sum()),
                "confidence": float(conf[sel].mean()) if sel.any() else float("nan"),
                "accuracy": float(hit[sel].mean()) if sel.any() else float("nan"),
            }
        )
    return rows


def risk_coverage(preds: PredictionSet) -> dict[str, Any]:
    """Selective prediction: cases ranked by confidence, the error rate among the ``i`` most confident for each
    coverage ``i / n``; AURC (mean risk over all coverages, lower is better), the risk and macro-F1 of the most
    confident 80 %, and the AURC of an oracle ranking (errors last) for scale."""
    p, y = _labelled(preds)
    n, k = p.shape
    conf = p.max(axis=1)
    order = np.argsort(-conf, kind="stable")
    errors = (p.argmax(axis=1) != y)[order].astype(float)
    counts = np.arange(1, n + 1)
    risk = np.cumsum(errors) / counts
    oracle = np.cumsum(np.sort(errors)) / counts
    keep = order[: max(1, int(np.ceil(COVERAGE * n)))]
    f1_at = tmf.multiclass_f1_score(
        torch.as_tensor(p[keep]), torch.as_tensor(y[keep]), num_classes=k, average="macro"
    ).item()
    f1_all = tmf.multiclass_f1_score(
        torch.as_tensor(p), torch.as_tensor(y), num_classes=k, average="macro"
    ).item()
    return {
        "coverage": (counts / n).tolist(),
        "risk": risk.tolist(),
        "threshold": conf[order].tolist(),
        "aurc": float(risk.mean()),
        "aurc_oracle": float(oracle.mean()),
        "risk_at_80": float(risk[len(keep) - 1]),
        "macro_f1_at_80": float(f1_at),
        "macro_f1_at_100": float(f1_all),
        "confidence_at_80": float(conf[order][len(keep) - 1]),
    }


# ---------------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path, dpi: int = 120) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def plot_reliability(
    sets: Mapping[str, PredictionSet], path: str | Path, n_bins: int = N_BINS, title: str = "Reliability"
) -> Path:
    """Reliability diagram (accuracy against confidence per bin) of each named set, e.g. before / after."""
    fig = _figure(4.2 * len(sets), 4.4)
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    for ax, (name, preds) in zip(axes, sets.items()):
        bins = reliability_bins(preds, n_bins)
        ece = calibration_scores(preds, n_bins)["ece"]
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        acc = [0.0 if b["count"] == 0 else b["accuracy"] for b in bins]
        ax.bar(
            centres, acc, width=1.0 / n_bins, edgecolor="black", color="#4c72b0", alpha=0.8, label="accuracy"
        )
        gap_bottom = [min(a, c) if b["count"] else 0 for a, c, b in zip(acc, centres, bins)]
        gap = [abs(c - a) if b["count"] else 0 for a, c, b in zip(acc, centres, bins)]
        ax.bar(centres, gap, bottom=gap_bottom, width=1.0 / n_bins, color="#dd8452", alpha=0.4, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: {name}\nECE {ece:.3f} ({n_bins} bins)")
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, Path(path))


def plot_risk_coverage(curves: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Risk (error rate among the retained cases) against coverage, one line per named curve."""
    fig = _figure(4.8, 4.0)
    ax = fig.subplots()
    for name, c in curves.items():
        ax.plot(c["coverage"], c["risk"], label=f"{name} (AURC {c['aurc']:.3f})")
    ax.axvline(COVERAGE, color="grey", ls=":", lw=1)
    ax.set_xlabel("coverage (share of cases answered)")
    ax.set_ylabel("risk (error rate of the answered cases)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Selective prediction")
    return _save(fig, Path(path))


# ---------------------------------------------------------------------------------------------------------------
# stored with the model
# ---------------------------------------------------------------------------------------------------------------
def calibration_file(ckpt_path: str | Path) -> Path:
    """Where the calibration of ``ckpt_path`` lives: in the run / multirun folder, or beside a ``.ckpt``."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        return path / CALIBRATION_FILE
    return path.with_name(f"{path.stem}.{CALIBRATION_FILE}")


def member_digests(paths: Sequence[Path]) -> list[str]:
    from liverfusion.data.io import file_digest

    return sorted(file_digest(p) for p in paths)


def _candidates(ckpt_path: Path) -> list[Path]:
    out = [calibration_file(ckpt_path)]
    if (
        ckpt_path.is_file()
    ):  # a run's own checkpoint: the run folder's calibration applies if it was fitted for it
        run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
        out.append(run / CALIBRATION_FILE)
    return out


def stored_calibration(ckpt_path: str | Path, members: Sequence[Path]) -> dict[str, Any] | None:
    """The stored calibration fitted for exactly these checkpoint files, or None. A file fitted for other weights
    (retrained, or for another set of fold models) is ignored with a warning, never applied."""
    import json

    digests = None
    for candidate in _candidates(Path(ckpt_path).expanduser()):
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{candidate}: unreadable calibration file ({err})", fix="delete it and refit"
            ) from None
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise CheckpointError(
                f"{candidate}: not a liverfusion calibration file", fix="delete it and refit"
            )
        t = data.get("temperature")
        if not isinstance(t, int | float) or not t > 0:
            raise CheckpointError(f"{candidate}: temperature {t!r} is not a positive number", fix="refit it")
        digests = digests or member_digests(members)
        if sorted(data.get("digests") or []) != digests:
            log.warning("%s was fitted for other checkpoints: not applied", candidate)
            continue
        return {**data, "path": str(candidate)}
    return None


def write_calibration(
    ckpt_path: str | Path,
    members: Sequence[Path],
    temperature: float,
    validation: PredictionSet,
    tta: str = "none",
) -> Path:
    """Store ``temperature`` with the model (see ``calibration_file``), with what it was fitted on and the NLL /
    ECE it gives there."""
    import json

    target = calibration_file(ckpt_path)
    before = calibration_scores(validation)
    after = calibration_scores(validation.with_temperature(temperature))
    payload = {
        "format": CALIBRATION_FORMAT,
        "method": "temperature",
        "temperature": float(temperature),
        "fitted_on": "validation split of each member (out-of-fold for a fold ensemble)",
        "n_cases": len(validation.case_ids),
        "tta": tta,
        "members": [str(p) for p in members],
        "digests": member_digests(members),
        "validation_before": before,
        "validation_after": after,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(target, json.dumps(payload, indent=1))
    return target


def calibration_markdown(
    before: Mapping[str, float], after: Mapping[str, float] | None, selective: Mapping
) -> str:
    """The calibration section of ``metrics.md`` / ``calibration.md``."""
    lines = ["| score | uncalibrated | calibrated |", "|---|---:|---:|"]
    for key, label in (("ece", f"ECE ({N_BINS} bins)"), ("mce", "MCE"), ("brier", "Brier"), ("nll", "NLL")):
        b = f"{before[key]:.4f}"
        a = f"{after[key]:.4f}" if after else "n/a"
        lines.append(f"| {label} | {b} | {a} |")
    sel = selective
    lines += [
        "",
        f"Selective prediction: AURC {sel['aurc']:.4f} (oracle {sel['aurc_oracle']:.4f}); answering the "
        f"{int(COVERAGE * 100)} % most confident cases (confidence >= {sel['confidence_at_80']:.3f}): risk "
        f"{sel['risk_at_80']:.3f}, macro-F1 {sel['macro_f1_at_80']:.3f} (all cases: {sel['macro_f1_at_100']:.3f}).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the evaluation report
# ---------------------------------------------------------------------------------------------------------------
def write_calibration_report(
    raw: PredictionSet, temperature: float | None, out_dir: str | Path
) -> dict[str, Any]:
    """``calibration.json`` / ``.md``, ``reliability.png``, ``risk_coverage.csv`` / ``.png`` of a labelled
    evaluation, before and (with a ``temperature``) after calibration; the section is appended to ``metrics.md``."""
    import csv
    import io
    import json

    out = Path(out_dir)
    sets = {"uncalibrated": raw}
    if temperature is not None:
        sets[f"calibrated (T = {temperature:.3f})"] = raw.with_temperature(temperature)
    scores = {name: calibration_scores(p) for name, p in sets.items()}
    curves = {name: risk_coverage(p) for name, p in sets.items()}
    before = scores["uncalibrated"]
    after = scores[list(scores)[-1]] if temperature is not None else None
    selective = curves[list(curves)[-1]]
    payload = {
        "temperature": temperature,
        "n_bins": N_BINS,
        "coverage_target": COVERAGE,
        "before": before,
        "after": after,
        "selective": {k: v for k, v in selective.items() if not isinstance(v, list)},
        "selective_uncalibrated": {
            k: v for k, v in curves["uncalibrated"].items() if not isinstance(v, list)
        },
        "reliability": {name: reliability_bins(p) for name, p in sets.items()},
    }
    atomic_write_text(out / "calibration.json", json.dumps(payload, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["coverage", "risk", "confidence_threshold"])
    for c, r, t in zip(selective["coverage"], selective["risk"], selective["threshold"]):
        w.writerow([f"{c:.6f}", f"{r:.6f}", f"{t:.6f}"])
    atomic_write_text(out / "risk_coverage.csv", buf.getvalue())
    plot_reliability(sets, out / "reliability.png")
    plot_risk_coverage(curves, out / "risk_coverage.png")
    text = calibration_markdown(before, after, selective)
    note = (
        f"Temperature {temperature:.4f} (stored with the model) applied to every probability above."
        if temperature is not None
        else "No calibration is stored with this model (evaluate calibrate=true fits one on its validation split)."
    )
    section = f"\n## Calibration and selective prediction\n\n{note}\n\n{text}\n"
    atomic_write_text(out / "calibration.md", section.lstrip("\n"))
    metrics_md = out / "metrics.md"
    if metrics_md.is_file():
        atomic_write_text(metrics_md, metrics_md.read_text() + section)
    return {
        "temperature": temperature,
        "before": before,
        "after": after,
        "aurc": selective["aurc"],
        "macro_f1_at_80": selective["macro_f1_at_80"],
    }
