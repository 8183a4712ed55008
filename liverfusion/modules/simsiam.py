"""SimSiam (Chen & He, CVPR 2021) as a thin subclass of the SSL base: projector, predictor, symmetric negative
cosine with stop-gradient, and an optional fixed predictor lr (REFERENCE section 2). With MDA pairs the two views
are two modalities of one case, encoded by the same weights."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from liverfusion.models.heads import PredictionHead, ProjectionHead
from liverfusion.models.losses import SimSiamLoss
from liverfusion.modules.ssl_base import SSLModule
from liverfusion.modules.ssl_config import Schema


class SimSiam(SSLModule):
    """Sections beyond :class:`SSLModule` (``conf/model/simsiam.yaml``): ``projector`` (``hidden_dim``,
    ``out_dim``, ``num_layers``: 2 or 3), ``predictor`` (``hidden_dim``: the bottleneck) and ``fix_pred_lr`` (keep
    the predictor at the initial lr, as the paper). Collapse metric: std of the l2-normalised projector output z."""

    SCHEMA: ClassVar[Schema] = {
        "projector": (("hidden_dim", "out_dim", "num_layers"), ()),
        "predictor": (("hidden_dim",), ()),
        "fix_pred_lr": None,
    }
    collapse_kind = "l2"

    def __init__(self, encoder: nn.Module, **kwargs):
        super().__init__(encoder, **kwargs)
        self.criterion = SimSiamLoss()

    @property
    def z_dim(self) -> int:
        return int(self.cfg["projector"]["out_dim"])

    def build_heads(self, in_dim: int, part: str) -> dict[str, nn.Module]:
        proj, pred = self.cfg["projector"], self.cfg["predictor"]
        prefix = "model" if part == "all" else f"model ({part} part)"
        return {
            "projector": ProjectionHead(
                in_dim,
                int(proj["hidden_dim"]),
                self.z_dim,
                int(proj["num_layers"]),
                name=f"{prefix}.projector",
            ),
            "predictor": PredictionHead(
                self.z_dim, int(pred["hidden_dim"]), self.z_dim, name=f"{prefix}.predictor"
            ),
        }

    def fixed_lr_heads(self) -> set[str]:
        return {"predictor"} if bool(self.cfg["fix_pred_lr"]) else set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (what downstream tasks use)."""
        return self.encode(x)

    def view_outputs(self, part: str, f: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        heads = self.heads(part)
        z = heads["projector"](f)
        return {"z": z, "p": heads["predictor"](z)}

    def pair_loss(self, part: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion(a["p"], b["p"], a["z"], b["z"])
