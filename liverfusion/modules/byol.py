"""BYOL (Grill et al., NeurIPS 2020) as a thin subclass of the momentum base: the online network (backbone,
projector, predictor) predicts the EMA teacher's projection of the other view; normalised MSE, symmetric."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from liverfusion.models.heads import MLPHead
from liverfusion.models.losses import BYOLLoss
from liverfusion.modules.momentum import MomentumSSLModule
from liverfusion.modules.ssl_config import Schema


class BYOL(MomentumSSLModule):
    """Sections beyond :class:`MomentumSSLModule` (``conf/model/byol.yaml``): ``projector`` (``hidden_dim``,
    ``out_dim``: Linear -> BN -> ReLU -> Linear, paper 4096 -> 256) and ``predictor`` (``hidden_dim``, same layout,
    back to ``out_dim``). Collapse metric: std of the l2-normalised online projection z."""

    SCHEMA: ClassVar[Schema] = {
        "projector": (("hidden_dim", "out_dim"), ()),
        "predictor": (("hidden_dim",), ()),
    }
    collapse_kind = "l2"
    momentum_heads = ("projector",)

    def __init__(self, encoder: nn.Module, **kwargs):
        super().__init__(encoder, **kwargs)
        self.criterion = BYOLLoss()

    @property
    def z_dim(self) -> int:
        return int(self.cfg["projector"]["out_dim"])

    def build_heads(self, in_dim: int, part: str) -> dict[str, nn.Module]:
        prefix = "model" if part == "all" else f"model ({part} part)"
        hidden_proj, hidden_pred = (
            int(self.cfg["projector"]["hidden_dim"]),
            int(self.cfg["predictor"]["hidden_dim"]),
        )
        return {
            "projector": MLPHead(
                in_dim, [hidden_proj], self.z_dim, "batch", "none", name=f"{prefix}.projector"
            ),
            "predictor": MLPHead(
                self.z_dim, [hidden_pred], self.z_dim, "batch", "none", name=f"{prefix}.predictor"
            ),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled online-encoder features (what downstream tasks use)."""
        return self.encode(x)

    def view_outputs(self, part: str, f: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        heads = self.heads(part)
        z = heads["projector"](f)
        return {"z": z, "p": heads["predictor"](z), "target": self.teacher_outputs(part, view)["projector"]}

    def pair_loss(self, part: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion(a["p"], b["p"], a["target"], b["target"])
