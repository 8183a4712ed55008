"""SimSiam (Chen & He, CVPR 2021) as a thin subclass of the SSL base: projector, predictor, symmetric negative
cosine with stop-gradient, and an optional fixed predictor lr (REFERENCE section 2). With MDA pairs the two views
are two modalities of one case, encoded by the same weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from liverfusion.models.encoder_base import Encoder
from liverfusion.models.heads import PredictionHead, ProjectionHead
from liverfusion.models.losses import SimSiamLoss
from liverfusion.modules.ssl_base import SSLModule
from liverfusion.utils.hydra_utils import to_plain


class SimSiam(SSLModule):
    """Args: ``encoder``; ``projector`` (hidden_dim, out_dim, num_layers) and ``predictor`` (hidden_dim) sizes;
    ``fix_pred_lr`` keeps the predictor at the initial lr (as the paper); the rest go to :class:`SSLModule`."""

    def __init__(
        self,
        encoder: Encoder,
        projector: Mapping[str, Any] | None = None,
        predictor: Mapping[str, Any] | None = None,
        fix_pred_lr: bool = True,
        **kwargs: Any,
    ):
        proj = {"hidden_dim": 2048, "out_dim": 2048, "num_layers": 3, **(to_plain(projector) or {})}
        pred = {"hidden_dim": 512, **(to_plain(predictor) or {})}
        self._z_dim = int(proj["out_dim"])
        super().__init__(encoder, **kwargs)
        self.projector = ProjectionHead(encoder.feature_dim, **proj)
        self.predictor = PredictionHead(self._z_dim, int(pred["hidden_dim"]), self._z_dim)
        self.criterion = SimSiamLoss()
        self.fix_pred_lr = fix_pred_lr

    @property
    def z_dim(self) -> int:
        return self._z_dim

    def method_parameter_groups(self) -> list[dict[str, Any]]:
        return [
            {"name": "projector", "params": list(self.projector.parameters())},
            {"name": "predictor", "params": list(self.predictor.parameters()), "fixed_lr": self.fix_pred_lr},
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (what downstream tasks use)."""
        return self.encode(x)

    def ssl_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # two passes, as in the paper: BatchNorm statistics are per view
        f1 = self.encode(batch["view1"])
        f2 = self.encode(batch["view2"])
        z1, z2 = self.projector(f1), self.projector(f2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return self.criterion(p1, p2, z1, z2), torch.cat([z1, z2]), f1
