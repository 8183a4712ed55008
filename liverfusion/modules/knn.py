"""Weighted cosine kNN classifier (the solo-learn / InstDisc monitor) for frozen-feature evaluation, and the
case-feature extraction the monitor and ``benchmarks/pretrain_knn.py`` share."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


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


@torch.no_grad()
def case_features(
    encoder: torch.nn.Module, image: torch.Tensor, present: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """(N, M * F): pooled features of each modality of each case, l2-normalised per modality, concatenated.

    The cosine of two such vectors is the mean of their per-phase cosines; missing modalities are zeros.
    """
    n, m = image.shape[:2]
    x = image.reshape(n * m, 1, *image.shape[2:])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    pooled = encoder(x).pooled.reshape(n, m, -1) * present.unsqueeze(-1).to(image.dtype)
    return F.normalize(pooled.float(), dim=-1).flatten(1)


@torch.no_grad()
def encode_loader(
    encoder: torch.nn.Module, batches: Iterable[dict], channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Case features and labels of every batch of a case loader (``image``, ``present``, ``label``)."""
    feats, labels = [], []
    was_training = encoder.training
    encoder.eval()
    try:
        for batch in batches:
            feats.append(case_features(encoder, batch["image"], batch["present"], channels_last))
            labels.append(torch.as_tensor(batch["label"]))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
