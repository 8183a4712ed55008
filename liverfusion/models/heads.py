"""Small composable MLP heads (lightly's idea, our own code): one :class:`MLPHead` builds the projectors and
predictors of SimSiam and BYOL and VICReg's expander; :class:`ClassifierHead` is the head of every fusion block.

No sizes live here: the SSL modules pass the sizes of ``conf/model/<method>.yaml`` and the layout their paper
uses (which norm, whether the last layer is normalised).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from liverfusion.errors import ConfigError

NORMS = ("batch", "none")
LAST_NORMS = ("affine", "plain", "none")


class MLPHead(nn.Module):
    """``hidden_dims`` x (Linear -> norm -> ReLU), then Linear -> ``last_norm``; ``layers`` is one Sequential.

    Args:
        in_dim / hidden_dims / out_dim: widths (every one >= 1; ``hidden_dims`` may be empty: one Linear).
        norm: after each hidden Linear, ``batch`` (BatchNorm1d) or ``none``.
        last_norm: after the output Linear, ``affine`` (BatchNorm1d with weight and bias), ``plain`` (BatchNorm1d
            without them: SimSiam's standardised z) or ``none`` (BYOL, VICReg, predictors).
        bias: ``None`` gives each Linear a bias exactly when no BatchNorm follows it (a bias before BN is
            cancelled by the mean subtraction); True/False force it for every Linear.
        name: what error messages call the head (e.g. ``model.projector``).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        norm: str = "batch",
        last_norm: str = "none",
        bias: bool | None = None,
        name: str = "head",
    ):
        super().__init__()
        hidden = [int(h) for h in hidden_dims]
        dims = [int(in_dim), *hidden, int(out_dim)]
        if min(dims) < 1:
            raise ConfigError(
                f"{name}: every width must be >= 1, got {' -> '.join(str(d) for d in dims)}; "
                "fix the head's hidden_dim/out_dim in conf/model/<method>.yaml"
            )
        if norm not in NORMS:
            raise ConfigError(f"{name}: norm={norm!r} is unknown; choose one of {list(NORMS)}")
        if last_norm not in LAST_NORMS:
            raise ConfigError(f"{name}: last_norm={last_norm!r} is unknown; choose one of {list(LAST_NORMS)}")
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            last = i == len(dims) - 2
            normed = (last_norm != "none") if last else (norm == "batch")
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=(not normed) if bias is None else bool(bias)))
            if normed:
                layers.append(nn.BatchNorm1d(dims[i + 1], affine=not last or last_norm == "affine"))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.hidden_dims, self.out_dim = dims[0], hidden, dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _depth(num_layers: int, allowed: Sequence[int], name: str) -> int:
    if int(num_layers) not in allowed:
        raise ConfigError(f"{name}: num_layers={num_layers} is not one of {list(allowed)}")
    return int(num_layers)


class ProjectionHead(MLPHead):
    """SimSiam projector: ``num_layers`` x (Linear without bias -> BatchNorm1d), ReLU between them.

    The last BatchNorm has ``affine=False`` (as in SimSiam): z is standardised per dimension, which is what makes
    the per-dimension std of normalised z a meaningful collapse signal. The paper uses 2048 everywhere and 3
    layers (2 on CIFAR); the sizes come from ``conf/model/simsiam.yaml``.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, name: str = "model.projector"
    ):
        depth = _depth(num_layers, (2, 3), f"{name} (SimSiam uses 3 on ImageNet, 2 on CIFAR)")
        super().__init__(in_dim, [hidden_dim] * (depth - 1), out_dim, "batch", "plain", name=name)


class PredictionHead(MLPHead):
    """SimSiam / BYOL predictor: bottleneck Linear (no bias) -> BN -> ReLU -> Linear (with bias), e.g.
    2048 -> 512 -> 2048 (SimSiam) or 256 -> 4096 -> 256 (BYOL)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, name: str = "model.predictor"):
        super().__init__(in_dim, [hidden_dim], out_dim, "batch", "none", name=name)


class ExpanderHead(MLPHead):
    """VICReg expander: ``num_layers - 1`` x (Linear -> BN -> ReLU), then a plain Linear (paper: 8192 x 3)."""

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, name: str = "model.expander"
    ):
        depth = _depth(num_layers, range(1, 9), name)
        super().__init__(in_dim, [hidden_dim] * (depth - 1), out_dim, "batch", "none", name=name)


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
