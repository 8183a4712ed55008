"""SimSiam loss: negative cosine similarity with a stop-gradient on the target branch (REFERENCE section 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def negative_cosine_similarity(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean of -cos(p, stopgrad(z)) over the batch; z is detached here so callers cannot forget it."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


class NegativeCosineSimilarity(nn.Module):
    """Module form of :func:`negative_cosine_similarity` (z never receives a gradient)."""

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return negative_cosine_similarity(p, z)


class SimSiamLoss(nn.Module):
    """Symmetric SimSiam loss L = -(cos(p1, z2.detach()) + cos(p2, z1.detach())) / 2; minimum -1."""

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return 0.5 * (negative_cosine_similarity(p1, z2) + negative_cosine_similarity(p2, z1))
