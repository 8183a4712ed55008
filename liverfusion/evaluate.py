"""``python -m liverfusion.evaluate ckpt_path=... data=...``: run a trained classifier (or the ensemble of a CV's fold
models) on a data set in any supported layout and write what a clinician, a challenge and a paper need.

Outputs (in the run dir, ``logs/evaluate/runs/<time>/`` by default):
- ``predictions.csv``: case, patient, one probability column per class, prediction, label (when known);
- ``submission.json``: the LLD-MMRI format ``[{"image_id", "prediction", "score": [all class probabilities]}]``;
- with labels: ``metrics.json`` / ``metrics.md`` (every metric with a patient-level bootstrap 95 % CI; DeLong CI for
  binary AUROC), ``robustness.csv`` / ``.md`` (each modality dropped in turn: metric loss), optional per-patient
  aggregation (``aggregate=mean|max``), optional paired comparison with another ``predictions.csv``
  (``compare_to=...``: paired bootstrap, DeLong for binary AUROC).

Modalities (names and order), class names, preprocessing and the evaluation crop come from the checkpoint, never
from the command line, so a model is always fed what it was trained on.
The same writer serves the classifier's own test step (``FusionClassifier.on_test_epoch_end``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from liverfusion.errors import CheckpointError, ConfigError, DataError
from liverfusion.metrics import (
    UndefinedMetricWarning,
    bootstrap_ci,
    classification_metrics,
    delong_ci,
    delong_test,
    paired_bootstrap,
)
from liverfusion.models.classifier_net import EncodedModalities, FusionClassifierNet
from liverfusion.models.encoder_base import plain
from liverfusion.utils.atomic import atomic_write_bytes, atomic_write_text
from liverfusion.utils.cli import cli_errors

log = logging.getLogger(__name__)

ROBUSTNESS_METRICS = ("macro_f1", "balanced_accuracy", "auroc", "lld_score")
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "kappa", "lld_score", "auroc", "ece")


# ---------------------------------------------------------------------------------------------------------------
# predictions
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PredictionSet:
    """Per-case outputs of one model (or an ensemble). ``labels`` are -1 where unknown."""

    case_ids: list[str]
    patient_ids: list[str]
    probs: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    modalities: list[str] = field(default_factory=list)
    features: np.ndarray | None = None
    encoder_features: np.ndarray | None = None
    dropped: dict[str, np.ndarray] = field(default_factory=dict)
    present: np.ndarray | None = None

    @classmethod
    def from_records(
        cls, records: Sequence[Mapping[str, Any]], class_names: Sequence[str], modalities: Sequence[str]
    ) -> PredictionSet:
        """Concatenate ``batch_predictions`` records; a case seen twice (DDP padding) is kept once."""
        if not records:
            raise DataError("no predictions: the evaluated split is empty")
        seen: dict[str, int] = {}
        rows: list[tuple[int, int]] = []
        for r_i, rec in enumerate(records):
            for j, case in enumerate(rec["case_id"]):
                if case not in seen:
                    seen[case] = len(rows)
                    rows.append((r_i, j))

        def gather(key: str) -> np.ndarray | None:
            if any(rec.get(key) is None for rec in records):
                return None
            return np.stack([np.asarray(records[r][key][j]) for r, j in rows])

        dropped = {}
        for m in modalities:
            if all(m in rec.get("dropped", {}) for rec in records):
                dropped[m] = np.stack([np.asarray(records[r]["dropped"][m][j]) for r, j in rows])
        return cls(
            case_ids=[records[r]["case_id"][j] for r, j in rows],
            patient_ids=[records[r]["patient_id"][j] for r, j in rows],
            probs=gather("probs").astype(np.float64),
            labels=gather("label").astype(np.int64),
            class_names=list(class_names),
            modalities=list(modalities),
            features=gather("features"),
            encoder_features=gather("encoder_features"),
            dropped=dropped,
            present=gather("present"),
        )

    @property
    def labelled(self) -> np.ndarray:
        return self.labels >= 0

    @property
    def has_labels(self) -> bool:
        return bool(self.labelled.any())

    @property
    def predictions(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def subset(self, keep: np.ndarray) -> PredictionSet:
        idx = np.flatnonzero(keep)
        return PredictionSet(
            case_ids=[self.case_ids[i] for i in idx],
            patient_ids=[self.patient_ids[i] for i in idx],
            probs=self.probs[idx],
            labels=self.labels[idx],
            class_names=self.class_names,
            modalities=self.modalities,
            features=None if self.features is None else self.features[idx],
            encoder_features=None if self.encoder_features is None else self.encoder_features[idx],
            dropped={m: p[idx] for m, p in self.dropped.items()},
            present=None if self.present is None else self.present[idx],
        )

    def point_metrics(self, threshold: float = 0.5) -> dict[str, float]:
        """Point estimates on the labelled cases (empty without labels)."""
        if not self.has_labels:
            return {}
        sub = self.subset(self.labelled)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            return classification_metrics(sub.probs, sub.labels, self.class_names, threshold=threshold)


def _normalised(probs: np.ndarray) -> np.ndarray:
    """Float64 rows renormalised to sum 1 (softmax output in float32 sums to 1 only up to ~1e-7)."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs / probs.sum(axis=1, keepdims=True)


@torch.no_grad()
def batch_predictions(
    net: FusionClassifierNet,
    batch: Mapping[str, Any],
    robustness: bool = True,
    encoded: EncodedModalities | None = None,
) -> dict[str, Any]:
    """Probabilities, fused and encoder features of one batch; with ``robustness`` also the probabilities with
    each modality dropped in turn. The shared topology encodes once and re-fuses with edited masks."""
    x, present = batch["image"], batch["present"]
    enc = encoded if encoded is not None else net.encode(x, present)
    maps = enc.maps if net.fusion.consumes == "map" else None
    out = net.fusion(maps, enc.pooled, enc.mask)
    record: dict[str, Any] = {
        "case_id": list(batch["case_id"]),
        "patient_id": list(batch["patient_id"]),
        "label": torch.as_tensor(batch["label"]).cpu().numpy(),
        "probs": out.logits.float().softmax(dim=1).cpu().numpy(),
        "features": out.features.float().cpu().numpy(),
        "encoder_features": enc.pooled.flatten(1).float().cpu().numpy(),
        "present": present.cpu().numpy(),
        "dropped": {},
    }
    if robustness and len(net.modalities) > 1:
        for i, m in enumerate(net.modalities):
            mask = present.clone()
            mask[:, i] = False
            if net.mode == "early":
                logits = net(x, mask).logits
            else:
                logits = net.fusion(maps, enc.pooled, mask).logits
            record["dropped"][m] = logits.float().softmax(dim=1).cpu().numpy()
    return record


# ---------------------------------------------------------------------------------------------------------------
# metrics, robustness, aggregation
# ---------------------------------------------------------------------------------------------------------------
def metrics_with_ci(
    preds: PredictionSet,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, dict[str, float]]:
    """Every metric of ``classification_metrics`` with a percentile bootstrap CI resampling whole patients.

    Binary tasks also get the DeLong CI of the AUROC (``binary/auroc_delong``).
    """
    sub = preds.subset(preds.labelled)
    if not sub.case_ids:
        raise DataError("no labelled cases: metrics need labels")
    probs = _normalised(sub.probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        cis = bootstrap_ci(
            probs,
            sub.labels,
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
            groups=np.asarray(sub.patient_ids),
            class_names=sub.class_names,
            threshold=threshold,
        )
    out = {k: {"point": v.point, "low": v.low, "high": v.high} for k, v in cis.items()}
    if len(sub.class_names) == 2:
        try:
            d = delong_ci(probs[:, 1], sub.labels, alpha=alpha)
            out["binary/auroc_delong"] = {"point": d.auc, "low": d.low, "high": d.high}
        except DataError as err:  # too few positives or negatives
            log.warning("DeLong CI not computed: %s", err)
    out["n_cases"] = {"point": float(len(sub.case_ids)), "low": float("nan"), "high": float("nan")}
    out["n_patients"] = {"point": float(len(set(sub.patient_ids))), "low": float("nan"), "high": float("nan")}
    return out


def robustness_table(
    preds: PredictionSet, metrics: Sequence[str] = ROBUSTNESS_METRICS, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One row per dropped modality (plus ``none``): metrics without it and the loss against all present."""
    sub = preds.subset(preds.labelled)
    if not sub.case_ids or not sub.dropped:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        base = classification_metrics(
            _normalised(sub.probs), sub.labels, sub.class_names, threshold=threshold
        )
        first: dict[str, Any] = {"dropped": "none", "cases_affected": 0}
        for m in metrics:
            first[m] = base[m]
            first[f"delta_{m}"] = 0.0
        rows = [first]
        for i, modality in enumerate(sub.modalities):
            if modality not in sub.dropped:
                continue
            vals = classification_metrics(
                _normalised(sub.dropped[modality]), sub.labels, sub.class_names, threshold=threshold
            )
            affected = int(sub.present[:, i].sum()) if sub.present is not None else len(sub.case_ids)
            row: dict[str, Any] = {"dropped": modality, "cases_affected": affected}
            for m in metrics:
                row[m] = vals[m]
                row[f"delta_{m}"] = vals[m] - base[m]
            rows.append(row)
    return rows


def aggregate_by_patient(preds: PredictionSet, how: str = "mean") -> tuple[PredictionSet, int]:
    """Per-patient predictions: mean (or max, renormalised) of the lesion probabilities.

    A patient's label is its most frequent lesion label (ties -> lowest class), as in the patient-level splits.
    Returns the set and the number of patients whose lesions disagree (their patient label is a simplification).
    """
    if how not in ("mean", "max"):
        raise ConfigError(f"aggregate={how!r}: choose mean or max (or null for per-lesion only)")
    order: dict[str, list[int]] = {}
    for i, p in enumerate(preds.patient_ids):
        order.setdefault(p, []).append(i)
    probs, labels, disagree = [], [], 0
    for idx in order.values():
        block = preds.probs[idx]
        agg = block.mean(axis=0) if how == "mean" else block.max(axis=0)
        probs.append(agg / agg.sum())
        known = [int(v) for v in preds.labels[idx] if v >= 0]
        if len(set(known)) > 1:
            disagree += 1
        labels.append(min(Counter(known).most_common(), key=lambda kv: (-kv[1], kv[0]))[0] if known else -1)
    patients = list(order)
    return (
        PredictionSet(
            case_ids=patients,
            patient_ids=patients,
            probs=np.asarray(probs),
            labels=np.asarray(labels, dtype=np.int64),
            class_names=preds.class_names,
            modalities=preds.modalities,
        ),
        disagree,
    )


def compare_predictions(
    a: PredictionSet,
    b: PredictionSet,
    metric: str = "lld_score",
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Paired comparison of two models on their common labelled cases (patient-level paired bootstrap; DeLong
    for the AUROC of binary tasks)."""
    if a.class_names != b.class_names:
        raise DataError(f"cannot compare models with different classes: {a.class_names} vs {b.class_names}")
    index_b = {c: i for i, c in enumerate(b.case_ids)}
    common = [i for i, c in enumerate(a.case_ids) if c in index_b and a.labels[i] >= 0]
    if len(common) < 2:
        raise DataError(f"only {len(common)} labelled cases in common: nothing to compare")
    ib = [index_b[a.case_ids[i]] for i in common]
    pa, pb = _normalised(a.probs[common]), _normalised(b.probs[ib])
    y = a.labels[common]
    groups = np.asarray([a.patient_ids[i] for i in common])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        out: dict[str, Any] = {
            "n_cases": len(common),
            "metric": metric,
            **paired_bootstrap(
                pa,
                pb,
                y,
                metric=metric,
                n_boot=n_boot,
                seed=seed,
                groups=groups,
                class_names=a.class_names,
                threshold=threshold,
            ),
        }
    if len(a.class_names) == 2:
        try:
            t = delong_test(pa[:, 1], pb[:, 1], y)
            out["delong"] = {"auc_a": t.auc_a, "auc_b": t.auc_b, "z": t.z, "p_value": t.p_value}
        except DataError as err:
            out["delong"] = {"error": str(err)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------------------------
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


def metrics_markdown(metrics: Mapping[str, Mapping[str, float]], keys: Sequence[str] | None = None) -> str:
    keys = list(keys) if keys is not None else [k for k in metrics if not k.startswith("n_")]
    lines = ["| metric | value | 95 % CI |", "|---|---:|---|"]
    for k in keys:
        if k not in metrics:
            continue
        m = metrics[k]
        lines.append(f"| {k} | {_fmt(m['point'])} | [{_fmt(m['low'])}, {_fmt(m['high'])}] |")
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
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float = 0.5,
    aggregate: str | None = None,
    save_features: bool = True,
    compare_to: PredictionSet | None = None,
    compare_metric: str = "lld_score",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write predictions, submission, metrics with CIs, robustness and (optionally) per-patient results."""
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
        text = "# Metrics (per lesion)\n\n" + metrics_markdown(metrics) + "\n"
        summary["metrics"] = {k: v["point"] for k, v in metrics.items()}
        rob = robustness_table(preds, threshold=threshold)
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
            text += (
                f"\n## Per patient ({aggregate} of lesion probabilities)\n\n" + metrics_markdown(pm) + "\n"
            )
            if disagree:
                text += f"\n{disagree} patient(s) have lesions of different classes (majority label used).\n"
        if compare_to is not None:
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


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedClassifier:
    net: FusionClassifierNet
    meta: dict[str, Any]
    path: Path


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Rebuild the network of a classifier checkpoint from its own metadata and load its weights."""
    from liverfusion.models.encoder_factory import build_encoder
    from liverfusion.models.fusion import build_fusion
    from liverfusion.modules.encoder_loading import safe_load

    path = Path(path).expanduser()
    ckpt = safe_load(path)
    meta = plain(ckpt.get("liverfusion")) if isinstance(ckpt, Mapping) else None
    if not meta or not str(meta.get("format", "")).startswith("liverfusion-classifier"):
        raise CheckpointError(
            f"{path}: not a liverfusion classifier checkpoint (no 'liverfusion' metadata); an encoder.pt or an SSL "
            "checkpoint is loaded by fine-tuning (model.pretrained.path), not evaluated"
        )
    try:
        encoder = build_encoder(**meta["encoder_config"])
        fusion = build_fusion(**meta["fusion_config"])
        net = FusionClassifierNet(encoder, fusion, meta["modalities"], len(meta["class_names"]), meta["mode"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: classifier metadata is incomplete ({exc})") from None
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the recorded architecture: {exc}") from None
    net.eval()
    return LoadedClassifier(net, meta, path)


def _best_in_run(run: Path) -> Path | None:
    """The selected checkpoint of one training run: recorded in test/summary.json, else the non-last .ckpt."""
    from liverfusion.utils.run_folder import file_in_run

    summary = run / "test" / "summary.json"
    if (
        summary.is_file()
    ):  # the recorded path is looked up inside this run only (a copy never reads the original)
        best = file_in_run(run, json.loads(summary.read_text()).get("best_checkpoint"))
        if best is not None:
            return best
    ckpts = sorted(p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    if len(ckpts) == 1:
        return ckpts[0]
    last = run / "checkpoints" / "last.ckpt"
    if not ckpts and last.is_file():
        return last
    if ckpts:
        raise CheckpointError(f"{run}: several checkpoints {[p.name for p in ckpts]}; pass one as ckpt_path")
    return None


def find_checkpoints(path: str | Path) -> list[Path]:
    """A .ckpt file, one run dir, or a multirun dir (every run under it: the ensemble of its fold models)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"ckpt_path {path}: no such file or folder")
    runs = sorted({p.parent for p in path.rglob("config_resolved.yaml")})
    found = [c for c in (_best_in_run(r) for r in runs) if c is not None]
    if not found:
        raise CheckpointError(
            f"ckpt_path {path}: no classifier checkpoint found in {len(runs)} run folder(s)"
        )
    return found


def check_ensemble(models: Sequence[LoadedClassifier]) -> dict[str, Any]:
    """All members must agree on modalities, classes, preprocessing and crop; return the shared metadata."""
    from liverfusion.data.preprocess import PreprocessConfig

    def comparable(
        meta: Mapping[str, Any], key: str
    ) -> Any:  # a member without `orientation` reads as `none`
        value = meta.get(key)
        if key == "preprocess" and isinstance(value, Mapping):
            return PreprocessConfig.from_dict(value, key="checkpoint preprocess").as_dict()
        return value

    first = models[0].meta
    for m in models[1:]:
        for key in ("modalities", "class_names", "preprocess", "eval_crop"):
            if comparable(m.meta, key) != comparable(first, key):
                raise CheckpointError(
                    f"ensemble members disagree on {key}: {models[0].path} has {first.get(key)!r}, {m.path} has "
                    f"{m.meta.get(key)!r}"
                )
    return first


@torch.no_grad()
def predict(
    models: Sequence[LoadedClassifier], loader: Any, robustness: bool = True, device: str = "cpu"
) -> PredictionSet:
    """Mean probabilities of the models (one model = itself) over a loader; features of the first model."""
    meta = check_ensemble(models)
    records: list[dict[str, Any]] = []
    for m in models:
        m.net.to(device).eval()
    for batch in loader:
        batch = {**batch, "image": batch["image"].to(device), "present": batch["present"].to(device)}
        recs = [batch_predictions(m.net, batch, robustness=robustness) for m in models]
        rec = recs[0]
        if len(recs) > 1:
            rec["probs"] = np.mean([r["probs"] for r in recs], axis=0)
            for mod in rec["dropped"]:
                rec["dropped"][mod] = np.mean([r["dropped"][mod] for r in recs], axis=0)
        records.append(rec)
    return PredictionSet.from_records(records, meta["class_names"], meta["modalities"])


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def _apply_checkpoint_data(cfg: Any, meta: Mapping[str, Any], single: bool) -> None:
    """Modalities, classes, preprocessing and crop from the checkpoint into the data config (in place); on the
    data set the model was trained on, also its split settings and (for one model) its fold, so ``split=test``
    is that model's own test split."""
    from omegaconf import OmegaConf

    with open_dict(cfg):
        layout = cfg.data.layout
        if "modalities" in layout or "patterns" not in layout:
            layout.modalities = list(meta["modalities"])
        if "class_names" in layout and layout.class_names:
            ours, theirs = list(layout.class_names), list(meta["class_names"])
            if ours != theirs:
                if not cfg.get("override_class_names", False):
                    raise ConfigError(
                        f"data.layout.class_names: the data set's classes {ours} differ from the model's {theirs}: "
                        "its labels would be scored as the model's classes",
                        fix="evaluate on data with the model's classes, or pass override_class_names=true to "
                        "score with the model's names anyway",
                    )
                log.warning("override_class_names: the data set's classes %s are scored as %s", ours, theirs)
            layout.class_names = theirs
        cfg.data.preprocess = OmegaConf.create(meta["preprocess"])
        cfg.data.eval_crop = meta.get("eval_crop")
        if meta.get("split") and meta.get("dataset") == layout.get("name"):
            for key, value in meta["split"].items():
                cfg.data.split[key] = value
            if single and meta.get("fold") is not None:
                cfg.data.fold = int(meta["fold"])
            log.info("split settings of the training run: %s, fold %s", meta["split"], cfg.data.fold)


def evaluate(cfg: Any) -> dict[str, Any]:
    """The body of the CLI (also callable with a composed config)."""
    from hydra.utils import instantiate

    from liverfusion.utils.hydra_utils import apply_extras, save_resolved_config

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    apply_extras(cfg)
    if cfg.get("ckpt_path") in (None, "", "???"):
        raise ConfigError("ckpt_path=... is required: a classifier .ckpt, a run folder or a multirun folder")
    paths = find_checkpoints(cfg.ckpt_path)
    models = [load_classifier(p) for p in paths]
    meta = check_ensemble(models)
    log.info("evaluating %d model(s): %s", len(models), [str(p) for p in paths])
    if cfg.get("use_checkpoint_data", True):
        _apply_checkpoint_data(cfg, meta, single=len(models) == 1)
    split = str(cfg.get("split", "test"))
    with open_dict(cfg):
        cfg.data.predict_part = split
        cfg.data.eval_batch_size = int(cfg.get("batch_size", 16))
        cfg.data.train_transform = None
    save_resolved_config(cfg, out_dir)
    dm = instantiate(cfg.data)
    dm.setup("predict")
    if dm.modalities != list(meta["modalities"]):
        raise ConfigError(
            f"the data set's modalities {dm.modalities} differ from the model's {meta['modalities']} (names and "
            "order must match; set the layout's modality names)"
        )
    if len(models) > 1 and split != "all" and getattr(dm.splits, "nested", False):
        raise ConfigError(
            "the fold models of a nested CV each trained on the other folds' test patients: evaluate their "
            "ensemble only on a separate cohort (split=all), or one fold model on its own test fold"
        )
    preds = predict(models, dm.predict_dataloader(), robustness=bool(cfg.get("robustness", True)))
    compare = read_predictions_csv(cfg.compare_to) if cfg.get("compare_to") else None
    summary = write_evaluation(
        preds,
        out_dir,
        n_boot=int(cfg.get("n_boot", 1000)),
        alpha=float(cfg.get("alpha", 0.05)),
        seed=int(cfg.get("seed", 0)),
        threshold=float(cfg.get("threshold", 0.5)),
        aggregate=cfg.get("aggregate"),
        save_features=bool(cfg.get("save_features", False)),
        compare_to=compare,
        compare_metric=str(cfg.get("compare_metric", "lld_score")),
        extra={"checkpoints": [str(p) for p in paths], "split": split, "dataset": dm.layout.name},
    )
    if (out_dir / "metrics.md").is_file():
        print((out_dir / "metrics.md").read_text())
    print(f"predictions: {out_dir / 'predictions.csv'}\nsubmission:  {out_dir / 'submission.json'}")
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@cli_errors
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    evaluate(cfg)


if __name__ == "__main__":
    main()
