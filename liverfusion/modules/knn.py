"""Weighted cosine kNN classifier (the solo-learn / InstDisc monitor) for frozen-feature evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> torch.Tensor:
    """Class scores (Nq, K) of each query from its k most cosine-similar bank features, weighted exp(sim/T)."""
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    k = min(k, bank.shape[0])
    sim = query @ bank.T
    top_sim, top_idx = sim.topk(k, dim=1)
    weights = (top_sim / temperature).exp()
    one_hot = F.one_hot(bank_labels[top_idx], num_classes).float()
    return (one_hot * weights.unsqueeze(-1)).sum(dim=1)
