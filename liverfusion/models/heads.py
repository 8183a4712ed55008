"""Small composable MLP heads: SimSiam projector and predictor (REFERENCE section 2) and a classifier head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from liverfusion.errors import ConfigError


class ProjectionHead(nn.Module):
    """SimSiam projector: ``num_layers`` x (Linear without bias -> BatchNorm1d), ReLU between them.

    The last BatchNorm has ``affine=False`` (as in SimSiam): z is standardised per dimension, which is what makes
    the per-dimension std of normalised z a meaningful collapse signal. Paper dims are 2048; the CPU presets
    use smaller ones.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048, num_layers: int = 3):
        super().__init__()
        if num_layers not in (2, 3):
            raise ConfigError(f"projector num_layers={num_layers}: SimSiam uses 3 (ImageNet) or 2 (CIFAR)")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ConfigError(f"projector dims must be positive, got {in_dim}->{hidden_dim}->{out_dim}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            last = i == num_layers - 1
            layers += [
                nn.Linear(dims[i], dims[i + 1], bias=False),
                nn.BatchNorm1d(dims[i + 1], affine=not last),
            ]
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PredictionHead(nn.Module):
    """SimSiam predictor: bottleneck Linear(no bias) -> BN -> ReLU -> Linear (with bias), e.g. 2048->512->2048."""

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 512, out_dim: int = 2048):
        super().__init__()
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ConfigError(f"predictor dims must be positive, got {in_dim}->{hidden_dim}->{out_dim}")
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ClassifierHead(nn.Module):
    """Dropout -> Linear, optionally preceded by hidden ReLU layers (``hidden_dims``); the head of every fusion.

    With no hidden layer it is the linear classifier used for linear probing.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dims: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ConfigError(
                f"classifier head needs in_dim >= 1 and num_classes >= 1, got {in_dim}, {num_classes}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout}: must be in [0, 1)")
        layers: list[nn.Module] = []
        dim = in_dim
        for hidden in hidden_dims:
            layers += [nn.Dropout(dropout), nn.Linear(dim, int(hidden)), nn.ReLU(inplace=True)]
            dim = int(hidden)
        layers += [nn.Dropout(dropout), nn.Linear(dim, num_classes)]
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.num_classes = in_dim, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
