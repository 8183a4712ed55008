"""Momentum (EMA teacher) base for SSL methods such as BYOL: the teacher is a copy of the backbone and of the heads
named in ``momentum_heads`` (the projector), gets no gradient, and follows the student after every optimiser step:

    teacher <- tau * teacher + (1 - tau) * student,
    tau_k = final_tau - (final_tau - base_tau) * (cos(pi * k / K) + 1) / 2

(k = optimiser steps done before this one, K = all steps of the run: BYOL's schedule from ``base_tau`` to
``final_tau`` = 1). Only parameters are averaged; the teacher's BatchNorm layers keep their own running statistics
(it runs in train mode like the student, on the same views).
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
from torch import nn

from liverfusion.errors import ConfigError
from liverfusion.modules.ssl_base import SSLModule
from liverfusion.modules.ssl_config import Schema


def cosine_tau(step: int, total_steps: int, base_tau: float, final_tau: float) -> float:
    """EMA coefficient after ``step`` of ``total_steps`` optimiser steps: ``base_tau`` at 0, ``final_tau`` at the end."""
    progress = min(1.0, max(0, step) / max(1, total_steps))
    return final_tau - (final_tau - base_tau) * (math.cos(math.pi * progress) + 1) / 2


class MomentumSSLModule(SSLModule):
    """:class:`SSLModule` with an EMA teacher. Section ``ema``: ``base_tau``, ``final_tau`` (0 <= base <= final <= 1).

    Subclasses name the heads the teacher mirrors in ``momentum_heads`` and read the teacher's outputs with
    :meth:`teacher_outputs` inside :meth:`view_outputs`.
    """

    SCHEMA: ClassVar[Schema] = {"ema": (("base_tau", "final_tau"), ())}
    momentum_heads: ClassVar[tuple[str, ...]] = ("projector",)

    def __init__(self, encoder: nn.Module, **kwargs: Any):
        super().__init__(encoder, **kwargs)
        ema = self.cfg["ema"]
        self.base_tau, self.final_tau = float(ema["base_tau"]), float(ema["final_tau"])
        if not 0.0 <= self.base_tau <= self.final_tau <= 1.0:
            raise ConfigError(
                f"model.ema: base_tau={self.base_tau}, final_tau={self.final_tau}; need 0 <= base_tau <= "
                "final_tau <= 1 (BYOL: 0.996 -> 1)"
            )
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_heads = nn.ModuleDict(
            {
                part: nn.ModuleDict({name: copy.deepcopy(heads[name]) for name in self.momentum_heads})
                for part, heads in self._heads.items()
            }
        )
        self.teacher_backbone.requires_grad_(False)
        self.teacher_heads.requires_grad_(False)
        self._ema_pairs = [(self.backbone, self.teacher_backbone)] + [
            (self._heads[part][name], self.teacher_heads[part][name])
            for part in self._heads
            for name in self.momentum_heads
        ]
        self._teacher_feats: list[torch.Tensor] = []
        self._last_ema_step = 0
        self.tau = self.base_tau

    # ---- the teacher ----
    def prepare_targets(self, views: list[torch.Tensor], present: torch.Tensor | None) -> None:
        """Teacher features of every view (no graph)."""
        with torch.no_grad():
            self._teacher_feats = [
                self.teacher_backbone.encode(self.prepare_input(v), present) for v in views
            ]

    def teacher_outputs(self, part: str, view: int) -> dict[str, torch.Tensor]:
        """The teacher's heads on its features of ``view`` (the slice of ``part``), detached."""
        f = self._teacher_feats[view]
        sl = self.part_slices[part]
        f = f if sl is None else f[:, sl]
        with torch.no_grad():
            out: dict[str, torch.Tensor] = {}
            x = f
            for name in self.momentum_heads:
                x = self.teacher_heads[part][name](x)
                out[name] = x
        return out

    @torch.no_grad()
    def ema_update(self, tau: float) -> None:
        """teacher <- tau * teacher + (1 - tau) * student, parameter by parameter."""
        for student, teacher in self._ema_pairs:
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(tau).add_(ps.detach(), alpha=1.0 - tau)

    def current_tau(self) -> float:
        """tau for the update after the optimiser step just taken (k = global_step - 1)."""
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return cosine_tau(self.global_step - 1, total, self.base_tau, self.final_tau)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # once per optimiser step (gradient accumulation runs this hook for every micro-batch)
        if self.global_step > self._last_ema_step:
            self.tau = self.current_tau()
            self.ema_update(self.tau)
            self._last_ema_step = self.global_step
            self.log("train/tau", self.tau, on_step=True, on_epoch=False, batch_size=1)
