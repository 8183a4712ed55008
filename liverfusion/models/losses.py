"""SSL losses: SimSiam's negative cosine and BYOL's normalised MSE, both with the stop-gradient on the target
branch, and VICReg's invariance + variance + covariance. Weights and constants come from the method's YAML."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from liverfusion.errors import ConfigError


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


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, stopgrad(z)), mean over the batch; z is detached here."""
    return (2.0 - 2.0 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class BYOLLoss(nn.Module):
    """Symmetric BYOL loss (l(p1, z2) + l(p2, z1)) / 2 with l = 2 - 2 cos and the teacher's z detached; 0 .. 4.

    The paper sums the two directions; the mean keeps the scale of SimSiam's loss and of any number of pairs.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return 0.5 * (normalized_mse(p1, z2) + normalized_mse(p2, z1))


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class VICRegLoss(nn.Module):
    """VICReg (Bardes et al., ICLR 2022): ``inv_weight`` * MSE(z_a, z_b) + ``var_weight`` * variance hinge +
    ``cov_weight`` * covariance penalty.

    Variance: mean over dims of relu(gamma - sqrt(var + eps)), averaged over both branches (per-dim std over the
    batch, unbiased). Covariance: sum of squared off-diagonal covariances / d, summed over both branches. Paper
    values: 25, 25, 1, gamma 1, eps 1e-4 (``conf/model/vicreg.yaml``). :meth:`terms` gives the three parts.
    """

    def __init__(self, inv_weight: float, var_weight: float, cov_weight: float, gamma: float, eps: float):
        super().__init__()
        for key, value in (
            ("inv_weight", inv_weight),
            ("var_weight", var_weight),
            ("cov_weight", cov_weight),
        ):
            if float(value) < 0:
                raise ConfigError(f"model.loss.{key}={value}: a loss weight must be >= 0")
        if float(gamma) <= 0 or float(eps) <= 0:
            raise ConfigError(f"model.loss: gamma={gamma} and eps={eps} must be > 0")
        self.inv_weight, self.var_weight, self.cov_weight = (
            float(inv_weight),
            float(var_weight),
            float(cov_weight),
        )
        self.gamma, self.eps = float(gamma), float(eps)

    def terms(self, z_a: torch.Tensor, z_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted ``invariance``, ``variance`` and ``covariance`` terms."""
        if z_a.ndim != 2 or z_a.shape != z_b.shape or z_a.shape[0] < 2:
            raise ValueError(
                f"VICReg needs two (N >= 2, d) embeddings, got {tuple(z_a.shape)}, {tuple(z_b.shape)}"
            )
        n, d = z_a.shape
        invariance = F.mse_loss(z_a, z_b)
        variance, covariance = z_a.new_zeros(()), z_a.new_zeros(())
        for z in (z_a, z_b):
            z = z - z.mean(dim=0)
            std = torch.sqrt(z.var(dim=0) + self.eps)
            variance = variance + F.relu(self.gamma - std).mean() / 2
            cov = (z.T @ z) / (n - 1)
            covariance = covariance + _off_diagonal(cov).pow(2).sum() / d
        return {"invariance": invariance, "variance": variance, "covariance": covariance}

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        t = self.terms(z_a, z_b)
        return (
            self.inv_weight * t["invariance"]
            + self.var_weight * t["variance"]
            + self.cov_weight * t["covariance"]
        )
