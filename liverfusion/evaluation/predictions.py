"""The predictions container every evaluation step passes around, and the per-batch inference that fills it.

A :class:`PredictionSet` holds one model's (or one ensemble's) per-case probabilities, and, where the network
produced them, the log-probabilities that temperature scaling needs (a softmax rounded to probabilities loses the
logits of confident cases), the fused and encoder features and the probabilities with each modality dropped.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from liverfusion.errors import DataError
from liverfusion.metrics import UndefinedMetricWarning, classification_metrics
from liverfusion.models.classifier_net import EncodedModalities, FusionClassifierNet


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
    log_probs: np.ndarray | None = None
    """log-softmax of the (ensemble) output; None when read back from a CSV (``probs`` only)."""

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
        log_probs = gather("log_probs")
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
            log_probs=None if log_probs is None else log_probs.astype(np.float64),
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

    def logits(self) -> np.ndarray:
        """Logits up to a per-case constant (what a temperature divides): the stored log-probabilities, else the
        log of the probabilities (clipped, for a set read back from a CSV)."""
        if self.log_probs is not None:
            return np.asarray(self.log_probs, dtype=np.float64)
        return np.log(np.clip(np.asarray(self.probs, dtype=np.float64), 1e-12, None))

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
            log_probs=None if self.log_probs is None else self.log_probs[idx],
        )

    def with_temperature(self, temperature: float) -> PredictionSet:
        """A copy with every probability (the dropped-modality ones too) softened by ``temperature``; the arg-max
        of every case is unchanged because one positive temperature divides all of its logits."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        scaled = _log_softmax(self.logits() / temperature)
        dropped = {
            m: np.exp(_log_softmax(np.log(np.clip(p, 1e-12, None)) / temperature))
            for m, p in self.dropped.items()
        }
        return replace(self, probs=np.exp(scaled), log_probs=scaled, dropped=dropped)

    def point_metrics(self, threshold: float = 0.5) -> dict[str, float]:
        """Point estimates on the labelled cases (empty without labels)."""
        if not self.has_labels:
            return {}
        sub = self.subset(self.labelled)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            return classification_metrics(sub.probs, sub.labels, self.class_names, threshold=threshold)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def normalised(probs: np.ndarray) -> np.ndarray:
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
    """Probabilities, log-probabilities, fused and encoder features of one batch; with ``robustness`` also the
    probabilities with each modality dropped in turn. The shared topology encodes once and re-fuses with edited
    masks."""
    x, present = batch["image"], batch["present"]
    enc = encoded if encoded is not None else net.encode(x, present)
    maps = enc.maps if net.fusion.consumes == "map" else None
    out = net.fusion(maps, enc.pooled, enc.mask)
    logits = out.logits.float()
    record: dict[str, Any] = {
        "case_id": list(batch["case_id"]),
        "patient_id": list(batch["patient_id"]),
        "label": torch.as_tensor(batch["label"]).cpu().numpy(),
        "probs": logits.softmax(dim=1).cpu().numpy(),
        "log_probs": logits.log_softmax(dim=1).cpu().numpy(),
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
                dropped = net(x, mask).logits
            else:
                dropped = net.fusion(maps, enc.pooled, mask).logits
            record["dropped"][m] = dropped.float().softmax(dim=1).cpu().numpy()
    return record
