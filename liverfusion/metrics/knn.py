"""Weighted cosine kNN classifier (the solo-learn / InstDisc monitor) on case vectors, and the one case-vector
formula that the SSL monitor, the frozen-feature diagnostics and ``benchmarks/pretrain_knn.py`` share.

A case vector is each modality's feature l2-normalised, then concatenated (zeros for a missing modality): the
cosine of two such vectors is the mean of their per-modality cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

__all__ = ["case_vectors", "knn_predict", "knn_scores"]


def case_vectors(
    features: torch.Tensor, present: torch.Tensor | None = None, normalise: bool = True
) -> torch.Tensor:
    """(N, M * F): each case's modality features (N, M, F) concatenated, zeros where ``present`` (N, M) is False
    (all present when None); with ``normalise`` each modality's feature is l2-normalised first. Computed in the
    features' dtype."""
    x = F.normalize(features, dim=-1) if normalise else features
    if present is not None:
        x = x * present.unsqueeze(-1).to(x.dtype)
    return x.flatten(1)


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Class scores (Nq, K) of each query from its k most cosine-similar bank features, weighted exp(sim/T)."""
    if bank.shape[0] == 0:
        raise ValueError("knn_predict needs a non-empty memory bank")
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    k = min(int(k), bank.shape[0])
    sim = query @ bank.T
    top_sim, top_idx = sim.topk(k, dim=1)
    weights = (top_sim / temperature).exp()
    one_hot = F.one_hot(bank_labels[top_idx].long(), num_classes).float()
    return (one_hot * weights.unsqueeze(-1)).sum(dim=1)


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Macro-F1 and accuracy of the kNN classifier on labelled queries."""
    scores = knn_predict(bank, bank_labels, query, num_classes, k, temperature)
    target = query_labels.long()
    return {
        "f1": float(multiclass_f1_score(scores, target, num_classes, average="macro")),
        "acc": float(multiclass_accuracy(scores, target, num_classes, average="micro")),
    }
