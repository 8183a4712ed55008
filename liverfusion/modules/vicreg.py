"""VICReg (Bardes, Ponce & LeCun, ICLR 2022) as a thin subclass of the SSL base: an expander on the pooled
features, then invariance (MSE between the views) + variance hinge + covariance penalty; no stop-gradient, no
predictor, no teacher."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from liverfusion.models.heads import ExpanderHead
from liverfusion.models.losses import VICRegLoss
from liverfusion.modules.ssl_base import SSLModule
from liverfusion.modules.ssl_config import Schema


class VICReg(SSLModule):
    """Sections beyond :class:`SSLModule` (``conf/model/vicreg.yaml``): ``expander`` (``hidden_dim``, ``out_dim``,
    ``num_layers``; paper 8192 x 3) and ``loss`` (``inv_weight``, ``var_weight``, ``cov_weight``: paper 25/25/1,
    ``gamma``: the target std, ``eps``).

    Collapse metric: VICReg's embedding is not normalised (its scale is what the variance term controls), so the
    metric is the mean per-dimension std of the *raw* expander output over the epoch (``RawStd``); healthy is
    about ``gamma`` or more, collapse 0, and ``train/collapse`` = 1 - std / gamma.
    """

    SCHEMA: ClassVar[Schema] = {
        "expander": (("hidden_dim", "out_dim", "num_layers"), ()),
        "loss": (("inv_weight", "var_weight", "cov_weight", "gamma", "eps"), ()),
    }
    collapse_kind = "raw"

    def __init__(self, encoder: nn.Module, **kwargs):
        super().__init__(encoder, **kwargs)
        self.criterion = VICRegLoss(**self.cfg["loss"])

    @property
    def z_dim(self) -> int:
        return int(self.cfg["expander"]["out_dim"])

    def collapse_scale(self) -> float:
        return float(self.cfg["loss"]["gamma"])

    def build_heads(self, in_dim: int, part: str) -> dict[str, nn.Module]:
        exp = self.cfg["expander"]
        prefix = "model" if part == "all" else f"model ({part} part)"
        return {
            "expander": ExpanderHead(
                in_dim, int(exp["hidden_dim"]), self.z_dim, int(exp["num_layers"]), name=f"{prefix}.expander"
            )
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (what downstream tasks use)."""
        return self.encode(x)

    def view_outputs(self, part: str, f: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        return {"z": self.heads(part)["expander"](f)}

    def pair_loss(self, part: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = self.criterion.terms(a["z"], b["z"])
        for (
            key,
            value,
        ) in terms.items():  # logged as epoch means (the last pair's terms when there are several)
            self.step_logs[f"train/{key}" if part == "all" else f"train/{key}_{part}"] = value.detach()
        c = self.criterion
        return (
            c.inv_weight * terms["invariance"]
            + c.var_weight * terms["variance"]
            + c.cov_weight * terms["covariance"]
        )
