"""What a frozen SSL encoder keeps: class, phase identity, case identity across phases, and feature spread.

Pure functions on feature arrays (no encoder, no data module, nothing cached): ``features`` (N, M, F) are the
pooled encoder features of modality m of case n, ``present`` (N, M) marks real modalities (missing ones are
ignored), ``labels`` (N,) the class (-1 = unlabelled) and ``groups`` the patient of each case.

Every fitted probe is fitted on *training* cases only and scored on *held-out* cases (other patients), so no case
and no patient is both fitted and scored; :func:`ssl_diagnostics` refuses a train / held-out pair that shares a
patient. The probes' L2 strength is chosen by patient-grouped cross-validation inside the training cases, never
on the held-out ones.

- class kNN macro-F1: the weighted cosine kNN of :mod:`liverfusion.metrics.knn` (the SSL monitor's) on case
  vectors (:func:`~liverfusion.metrics.knn.case_vectors`: each modality's feature l2-normalised, concatenated);
- class linear probe macro-F1: a multinomial logistic regression (L-BFGS, standardised features, classes
  weighted to balance: macro-F1 weighs every class alike) on the concatenated raw features;
- phase-ID accuracy: the same probe on one modality's feature -> its modality index (chance 1/M): whether the
  encoder still tells the phases apart (cross-phase SSL is taught to forget it);
- retrieval top-1: each (case, phase) feature queries every other-phase feature of the held-out cases; a hit is
  the query's own case (``retrieval_top1``) or patient (``retrieval_top1_patient``): whether the phases of one
  case share a representation (anatomy);
- collapse: ``sqrt(F) * std`` of the l2-normalised features (:mod:`liverfusion.models.collapse`): about 1 for
  features spread like random unit vectors, 0 for a constant (collapsed) encoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_f1_score

from liverfusion.errors import DataError
from liverfusion.metrics.knn import case_vectors, knn_scores
from liverfusion.models.collapse import std_of_l2_normalized

# L2 strengths tried by the probes' grouped cross-validation (penalty l2 * ||W||^2 on a mean cross-entropy of
# standardised features); the largest of equally good values wins (the simpler probe).
L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)

ArrayLike = Tensor | np.ndarray | Sequence


def _tensor(x: ArrayLike, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(dtype)


def as_features(features: ArrayLike, present: ArrayLike | None = None) -> tuple[Tensor, Tensor]:
    """``features`` (N, M, F) as float32 and ``present`` (N, M) as bool (all present when None), checked."""
    x = _tensor(features, torch.float32)
    if x.ndim != 3:
        raise DataError(f"features must have shape (cases, modalities, features), got {tuple(x.shape)}")
    mask = torch.ones(x.shape[:2], dtype=torch.bool) if present is None else _tensor(present, torch.bool)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise DataError(
            f"present must have shape {tuple(x.shape[:2])} (cases, modalities), got {tuple(mask.shape)}"
        )
    if not torch.isfinite(x[mask]).all():
        raise DataError("features hold NaN or inf values; the encoder diverged or the input is corrupt")
    return x, mask


@dataclass(frozen=True)
class FeatureSet:
    """Frozen features of a set of cases with what the metrics need to know about each case."""

    features: Tensor  # (N, M, F) float32, zeros where a modality is missing
    present: Tensor  # (N, M) bool
    labels: Tensor  # (N,) int64, -1 = unlabelled
    case_ids: list[str]
    patient_ids: list[str]

    def __post_init__(self) -> None:
        x, mask = as_features(self.features, self.present)
        labels = _tensor(self.labels, torch.int64).reshape(-1)
        n = x.shape[0]
        if labels.shape[0] != n or len(self.case_ids) != n or len(self.patient_ids) != n:
            raise DataError(
                f"FeatureSet: {n} feature rows but {labels.shape[0]} labels, {len(self.case_ids)} case ids and "
                f"{len(self.patient_ids)} patient ids; give one of each per case"
            )
        object.__setattr__(self, "features", x * mask.unsqueeze(-1))
        object.__setattr__(self, "present", mask)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "case_ids", [str(c) for c in self.case_ids])
        object.__setattr__(self, "patient_ids", [str(p) for p in self.patient_ids])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, index: Tensor | Sequence[int]) -> FeatureSet:
        idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        return FeatureSet(
            self.features[idx],
            self.present[idx],
            self.labels[idx],
            [self.case_ids[i] for i in idx.tolist()],
            [self.patient_ids[i] for i in idx.tolist()],
        )

    def labelled(self) -> FeatureSet:
        """The cases with a class label."""
        return self.subset(torch.nonzero(self.labels >= 0).flatten())

    @staticmethod
    def concat(sets: Sequence[FeatureSet]) -> FeatureSet:
        if not sets:
            raise DataError("FeatureSet.concat needs at least one set")
        return FeatureSet(
            torch.cat([s.features for s in sets]),
            torch.cat([s.present for s in sets]),
            torch.cat([s.labels for s in sets]),
            [c for s in sets for c in s.case_ids],
            [p for s in sets for p in s.patient_ids],
        )


# ---- feature views ----


def modality_samples(features: ArrayLike, present: ArrayLike | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The present (case, modality) features as rows: (features (P, F), case index (P,), modality index (P,))."""
    x, mask = as_features(features, present)
    case_idx, mod_idx = torch.nonzero(mask, as_tuple=True)
    return x[case_idx, mod_idx], case_idx, mod_idx


# ---- linear probe ----


@dataclass
class LinearProbe:
    """A multinomial logistic regression on standardised features (statistics of its training set)."""

    mean: Tensor
    scale: Tensor
    weight: Tensor  # (K, D)
    bias: Tensor  # (K,)
    l2: float

    def logits(self, x: ArrayLike) -> Tensor:
        z = (_tensor(x, torch.float64) - self.mean) / self.scale
        return z @ self.weight.T + self.bias

    def predict(self, x: ArrayLike) -> Tensor:
        return self.logits(x).argmax(dim=1)


def fit_linear_probe(
    x: ArrayLike,
    y: ArrayLike,
    num_classes: int,
    l2: float = 1e-2,
    balanced: bool = True,
    max_iter: int = 300,
) -> LinearProbe:
    """Fit a logistic regression with L-BFGS (convex, started at zero, so deterministic).

    ``balanced`` weighs each class by N / (classes present * its count), like scikit-learn's
    ``class_weight="balanced"``: the probe is scored by macro-F1, which weighs every class alike.
    """
    xs, ys = _tensor(x, torch.float64), _tensor(y, torch.int64).reshape(-1)
    if xs.ndim != 2 or xs.shape[0] != ys.shape[0] or xs.shape[0] == 0:
        raise DataError(
            f"linear probe: x {tuple(xs.shape)} and y {tuple(ys.shape)} must be (N, D) and (N,), N >= 1"
        )
    if ys.min() < 0 or ys.max() >= num_classes:
        raise DataError(f"linear probe: labels must lie in [0, {num_classes}), got {ys.min()}..{ys.max()}")
    mean = xs.mean(dim=0)
    std = xs.std(dim=0, unbiased=False) if xs.shape[0] > 1 else torch.ones_like(mean)
    scale = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant feature stays 0, not inf
    z = (xs - mean) / scale
    counts = torch.bincount(ys, minlength=num_classes).to(torch.float64)
    weight = None
    if balanced:
        k_present = int((counts > 0).sum())
        weight = torch.where(
            counts > 0, ys.shape[0] / (k_present * counts.clamp_min(1)), torch.ones_like(counts)
        )
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, ys, weight=weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, scale, w.detach(), b.detach(), float(l2))


def _group_folds(groups: Sequence[Any], folds: int, seed: int = 0) -> list[int]:
    """Fold index of each sample; all samples of a group share a fold (a patient is never on both sides)."""
    unique = sorted({str(g) for g in groups})
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {unique[j]: rank % folds for rank, j in enumerate(order)}
    return [fold_of[str(g)] for g in groups]


def _score(pred: Tensor, y: Tensor, num_classes: int, metric: str) -> float:
    if metric == "accuracy":
        return float((pred == y).double().mean())
    return float(multiclass_f1_score(pred, y, num_classes, average="macro"))


def select_l2(
    x: ArrayLike,
    y: ArrayLike,
    num_classes: int,
    grid: Sequence[float] = L2_GRID,
    groups: Sequence[Any] | None = None,
    folds: int = 3,
    metric: str = "macro_f1",
    balanced: bool = True,
) -> float:
    """The L2 strength of ``grid`` with the best mean ``metric`` over group-wise folds of the *training* data.

    Fewer than two groups (or a one-value grid) leave nothing to cross-validate: the grid's middle value.
    """
    if metric not in ("macro_f1", "accuracy"):
        raise ValueError(f"select_l2: metric must be 'macro_f1' or 'accuracy', got {metric!r}")
    grid = sorted(float(v) for v in grid)
    if not grid:
        raise ValueError("select_l2: empty l2 grid")
    xs, ys = _tensor(x, torch.float64), _tensor(y, torch.int64).reshape(-1)
    groups = list(range(len(ys))) if groups is None else list(groups)
    n_folds = min(int(folds), len({str(g) for g in groups}))
    if len(grid) == 1 or n_folds < 2:
        return grid[len(grid) // 2]
    fold = torch.tensor(_group_folds(groups, n_folds))
    best, best_score = grid[-1], -math.inf
    for l2 in reversed(grid):  # strongest first: a tie keeps the more regularised probe
        scores = []
        for f in range(n_folds):
            tr, va = fold != f, fold == f
            probe = fit_linear_probe(xs[tr], ys[tr], num_classes, l2, balanced)
            scores.append(_score(probe.predict(xs[va]), ys[va], num_classes, metric))
        mean = sum(scores) / len(scores)
        if mean > best_score + 1e-12:
            best, best_score = l2, mean
    return best


def linear_probe_macro_f1(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    num_classes: int,
    l2: float | Sequence[float] = L2_GRID,
    train_groups: Sequence[Any] | None = None,
    balanced: bool = True,
) -> tuple[float, float]:
    """(macro-F1 on the held-out cases, the L2 used) of a probe fitted on the training cases only; a grid of
    ``l2`` values is cross-validated inside the training cases (grouped by ``train_groups``)."""
    if not isinstance(l2, int | float):
        l2 = select_l2(train_x, train_y, num_classes, l2, train_groups, metric="macro_f1", balanced=balanced)
    probe = fit_linear_probe(train_x, train_y, num_classes, float(l2), balanced)
    target = _tensor(test_y, torch.int64).reshape(-1)
    return _score(probe.predict(test_x), target, num_classes, "macro_f1"), float(l2)


# ---- the diagnostics ----


def knn_macro_f1(
    train_features: ArrayLike,
    train_present: ArrayLike | None,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_present: ArrayLike | None,
    test_labels: ArrayLike,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """kNN macro-F1 and accuracy: the labelled training cases are the bank, the held-out cases the queries."""
    bank = case_vectors(*as_features(train_features, train_present))
    query = case_vectors(*as_features(test_features, test_present))
    scores = knn_scores(
        bank,
        _tensor(train_labels, torch.int64),
        query,
        _tensor(test_labels, torch.int64),
        num_classes,
        k,
        temperature,
    )
    return {"macro_f1": scores["f1"], "accuracy": scores["acc"]}


def phase_id_accuracy(
    train_features: ArrayLike,
    train_present: ArrayLike | None,
    test_features: ArrayLike,
    test_present: ArrayLike | None,
    l2: float | Sequence[float] = L2_GRID,
    train_groups: Sequence[Any] | None = None,
) -> tuple[float, float]:
    """(accuracy, L2 used) of an M-way probe feature -> modality index, fitted on the training cases' features
    and scored on the held-out cases' (other cases, so it reads phase identity, not a memorised case).

    ``train_groups`` (one per training case, e.g. patient ids) keeps a patient's phases in one CV fold.
    """
    x_tr, case_tr, y_tr = modality_samples(train_features, train_present)
    x_te, _, y_te = modality_samples(test_features, test_present)
    m = as_features(train_features, train_present)[0].shape[1]
    if m < 2:
        raise DataError(f"phase-ID probe needs at least two modalities, the features have {m}")
    if x_tr.shape[0] == 0 or x_te.shape[0] == 0:
        raise DataError("phase-ID probe needs present modalities in both the training and the held-out cases")
    groups = None if train_groups is None else [list(train_groups)[i] for i in case_tr.tolist()]
    if not isinstance(l2, int | float):
        l2 = select_l2(x_tr, y_tr, m, l2, groups, metric="accuracy", balanced=False)
    probe = fit_linear_probe(x_tr, y_tr, m, float(l2), balanced=False)
    return _score(probe.predict(x_te), y_te, m, "accuracy"), float(l2)


def retrieval_top1(
    features: ArrayLike,
    present: ArrayLike | None = None,
    groups: Sequence[Any] | None = None,
    center: ArrayLike | None = None,
) -> float:
    """Share of (case, modality a) queries whose most cosine-similar feature among all features of *other*
    modalities (of every case given, its own included) belongs to the same group (default: the same case).

    ``center`` (F,), e.g. the mean l2-normalised feature of the training cases, is subtracted from the
    l2-normalised features before the cosine: ReLU features share a large common component. Queries of cases with
    no other present modality are skipped (they cannot hit their own case).
    """
    x, case_idx, mod_idx = modality_samples(features, present)
    n = as_features(features, present)[0].shape[0]
    keys = list(range(n)) if groups is None else [str(g) for g in groups]
    if len(keys) != n:
        raise DataError(f"retrieval: {len(keys)} groups for {n} cases")
    u = F.normalize(x, dim=-1)
    if center is not None:
        u = F.normalize(u - _tensor(center, torch.float32).reshape(1, -1), dim=-1)
    sim = u @ u.T
    sim[mod_idx.unsqueeze(0) == mod_idx.unsqueeze(1)] = -math.inf  # same modality (itself included) excluded
    per_case = torch.bincount(case_idx, minlength=n)
    usable = per_case[case_idx] >= 2
    if not bool(usable.any()):
        raise DataError("retrieval needs cases with at least two present modalities")
    top = sim.argmax(dim=1)
    hits = [
        keys[int(case_idx[top[q]])] == keys[int(case_idx[q])]
        for q in torch.nonzero(usable).flatten().tolist()
    ]
    return sum(hits) / len(hits)


def collapse_std(features: ArrayLike, present: ArrayLike | None = None) -> float:
    """sqrt(F) * per-dimension std of the l2-normalised present features: ~1 spread, 0 collapsed (constant)."""
    x, _, _ = modality_samples(features, present)
    return float(std_of_l2_normalized(x)) * math.sqrt(x.shape[1])


def ssl_diagnostics(
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    l2: float | Sequence[float] = L2_GRID,
    center_retrieval: bool = True,
) -> dict[str, Any]:
    """All diagnostics of one encoder: probes fitted on ``train`` (its labelled cases for the class, all of its
    cases for the phase), scored on ``test``; retrieval among ``test``; collapse over both.

    Raises DataError when the two sets share a patient (the held-out score would be a training score).
    """
    shared = sorted(set(train.patient_ids) & set(test.patient_ids))
    if shared:
        raise DataError(
            f"ssl_diagnostics: {len(shared)} patient(s) both in the training and the held-out cases "
            f"({shared[:5]}); give cases of disjoint patients (train vs val/test of one fold)"
        )
    lab_tr, lab_te = train.labelled(), test.labelled()
    if len(lab_tr) == 0 or len(lab_te) == 0:
        raise DataError(
            f"ssl_diagnostics: {len(lab_tr)} labelled training and {len(lab_te)} labelled held-out cases; "
            "both need at least one"
        )
    knn = knn_macro_f1(
        lab_tr.features,
        lab_tr.present,
        lab_tr.labels,
        lab_te.features,
        lab_te.present,
        lab_te.labels,
        num_classes,
        k,
        temperature,
    )
    probe_f1, probe_l2 = linear_probe_macro_f1(
        case_vectors(lab_tr.features, lab_tr.present, normalise=False),
        lab_tr.labels,
        case_vectors(lab_te.features, lab_te.present, normalise=False),
        lab_te.labels,
        num_classes,
        l2,
        train_groups=lab_tr.patient_ids,
    )
    m, dim = int(train.features.shape[1]), int(train.features.shape[2])
    out: dict[str, Any] = {
        "knn_macro_f1": knn["macro_f1"],
        "knn_accuracy": knn["accuracy"],
        "linear_probe_macro_f1": probe_f1,
        "linear_probe_l2": probe_l2,
        "phase_id_accuracy": None,
        "phase_id_l2": None,
        "phase_id_chance": 1.0 / m,
        "retrieval_top1": None,
        "retrieval_top1_patient": None,
        "retrieval_chance": 1.0 / len(test),
    }
    if m >= 2:
        out["phase_id_accuracy"], out["phase_id_l2"] = phase_id_accuracy(
            train.features, train.present, test.features, test.present, l2, train_groups=train.patient_ids
        )
        center = None
        if center_retrieval:
            u, _, _ = modality_samples(F.normalize(train.features, dim=-1), train.present)
            center = u.mean(dim=0)
        out["retrieval_top1"] = retrieval_top1(test.features, test.present, None, center)
        out["retrieval_top1_patient"] = retrieval_top1(test.features, test.present, test.patient_ids, center)
    both = FeatureSet.concat([train, test])
    spread = collapse_std(both.features, both.present)
    out.update(
        {
            "collapse_std": spread,
            "collapse_level": 1.0 - spread,
            "n_train_cases": len(train),
            "n_train_labelled": len(lab_tr),
            "n_test_cases": len(test),
            "n_test_labelled": len(lab_te),
            "n_modalities": m,
            "feature_dim": dim,
        }
    )
    return out
