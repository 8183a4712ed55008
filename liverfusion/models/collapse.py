"""Collapse monitor for SimSiam: per-dimension std of l2-normalised projector outputs z.

For healthy outputs spread over the sphere the std is about 1/sqrt(d); a collapsed (constant) output gives 0.
``collapse_level = 1 - sqrt(d) * std`` maps that to about 0 (healthy) .. 1 (collapsed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def std_of_l2_normalized(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std (over the batch) of l2-normalised rows of z (N, d)."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"std_of_l2_normalized needs z of shape (N >= 2, d), got {tuple(z.shape)}")
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def collapse_level(z_std: torch.Tensor | float, dim: int) -> torch.Tensor | float:
    """1 - sqrt(d) * z_std: ~0 for outputs spread like random unit vectors, 1 for a constant output."""
    return 1.0 - math.sqrt(dim) * z_std


class L2NormalizedStd(Metric):
    """Epoch-level :func:`std_of_l2_normalized`: accumulates sums over all batches (and processes under DDP).

    A single small 3D batch gives a noisy std; the SimSiam module logs this over the whole epoch instead.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.add_state("total", default=torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, z: torch.Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"L2NormalizedStd(dim={self.dim}) got z of shape {tuple(z.shape)}")
        u = F.normalize(z.detach().to(torch.float64), dim=1)
        self.total += u.sum(dim=0)
        self.total_sq += (u * u).sum(dim=0)
        self.count += u.shape[0]

    def compute(self) -> torch.Tensor:
        n = self.count
        var = (self.total_sq - self.total * self.total / n) / (n - 1)  # unbiased, like torch.std
        return var.clamp_min(0).sqrt().mean().float()
