"""How an SSL run tells that it is failing: a non-finite loss (:class:`TrainingDivergedError`) or a collapsing
embedding (the epoch-level collapse metric and its alarm, :class:`CollapseWatch`)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from liverfusion.errors import LiverfusionError
from liverfusion.models.collapse import L2NormalizedStd, collapse_level

COLLAPSE_KINDS = ("l2", "raw")


class TrainingDivergedError(LiverfusionError, FloatingPointError):
    """The loss became NaN or infinite: names the step and the cases of the batch."""


class RawStd(L2NormalizedStd):
    """Epoch-level per-dimension std (over the batch) of the raw embedding, averaged over dimensions.

    For embeddings that are not normalised (VICReg's expander output): its variance term keeps every
    dimension's std at or above ``gamma``, and a collapsed embedding gives 0.
    """

    def update(self, z: torch.Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"RawStd(dim={self.dim}) got z of shape {tuple(z.shape)}")
        u = z.detach().to(torch.float64)
        self.total += u.sum(dim=0)
        self.total_sq += (u * u).sum(dim=0)
        self.count += u.shape[0]


def collapse_metric(kind: str, dim: int) -> L2NormalizedStd:
    """The epoch-level std metric of a ``collapse_kind``: of the l2-normalised embedding, or of the raw one."""
    return (L2NormalizedStd if kind == "l2" else RawStd)(dim)


class CollapseWatch:
    """The SSL module's collapse bookkeeping (a mixin of ``SSLModule``): at every epoch end, per embedding part,
    ``train/z_std`` and ``train/collapse`` (0 healthy, 1 constant; the worst part), and the alarm below
    ``collapse.alarm_fraction`` of a healthy std (stopping the run when ``collapse.stop``).

    Reads ``collapse_kind``, ``z_dim``, ``collapse_metrics`` (one metric per part) and ``collapse_cfg`` of the
    module; a method overrides :meth:`collapse_embedding` or :meth:`collapse_scale` where its embedding differs.
    """

    collapse_kind: ClassVar[str] = "l2"  # l2: std of l2-normalised z (healthy ~ 1/sqrt(d)) | raw: see RawStd
    collapse_metrics: nn.ModuleDict
    collapse_cfg: dict[str, Any]
    z_dim: int

    def collapse_embedding(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return out["z"]

    def collapse_scale(self) -> float:
        """The std of a healthy embedding: 1/sqrt(d) for l2-normalised z; raw embeddings must override."""
        if self.collapse_kind == "l2":
            return 1.0 / math.sqrt(self.z_dim)
        raise TypeError(f"{type(self).__name__} has collapse_kind=raw: it must define collapse_scale()")

    def collapse_from_std(self, z_std: float) -> float:
        """0 for a healthy embedding, 1 for a constant one (see :meth:`collapse_scale`)."""
        if self.collapse_kind == "l2":
            return float(collapse_level(z_std, self.z_dim))
        return 1.0 - z_std / self.collapse_scale()

    def on_train_epoch_end(self) -> None:
        worst: tuple[float, float, str] | None = None  # (collapse, z_std, part)
        for part, metric in self.collapse_metrics.items():  # same order on every rank (all_gather inside)
            if float(metric.count) == 0 and self.trainer.world_size == 1:
                continue
            z_std = float(metric.compute())  # all z of the epoch, all processes
            metric.reset()
            level = self.collapse_from_std(z_std)
            if len(self.collapse_metrics) > 1:
                self.log(f"train/z_std_{part}", z_std, sync_dist=False)
                self.log(f"train/collapse_{part}", level, sync_dist=False)
            if worst is None or level > worst[0]:
                worst = (level, z_std, part)
        if worst is None:
            return
        level, z_std, part = worst
        self.log("train/z_std", z_std, sync_dist=False)
        self.log("train/collapse", level, sync_dist=False)
        fraction = float(self.collapse_cfg["alarm_fraction"])
        d = self.z_dim
        if self.collapse_kind == "l2":
            threshold = fraction / math.sqrt(d)
            rule = f"{self.collapse_cfg['alarm_fraction']} / sqrt({d})"
        else:
            threshold = fraction * self.collapse_scale()
            rule = f"{self.collapse_cfg['alarm_fraction']} x {self.collapse_scale():g}"
        if z_std < threshold:
            where = "" if part == "all" else f" ({part} part)"
            rank_zero_warn(
                f"collapse alarm at epoch {self.current_epoch}{where}: z_std {z_std:.4f} < {rule} = {threshold:.4f}"
                + ("; stopping (model.collapse.stop=true)" if self.collapse_cfg["stop"] else "")
            )
            if self.collapse_cfg["stop"]:
                self.trainer.should_stop = True
