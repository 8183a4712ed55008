"""Optimiser construction shared by the LightningModules: parameter groups, lr scaling, warm-up + cosine."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from liverfusion.errors import ConfigError


def split_decay(params: Iterable[tuple[str, nn.Parameter]], exclude_bn_bias: bool) -> tuple[list, list]:
    """(decayed, not decayed): BN/LayerNorm weights and biases (1-D tensors) skip weight decay when asked."""
    decay, no_decay = [], []
    for _, p in params:
        if not p.requires_grad:
            continue
        (no_decay if exclude_bn_bias and p.ndim <= 1 else decay).append(p)
    return decay, no_decay


def scaled_lr(
    base_lr: float, batch_size: int, world_size: int, accumulate: int, reference: int = 256
) -> float:
    """Linear scaling rule: lr = base_lr * global_batch / reference, counting devices and accumulation."""
    return base_lr * batch_size * world_size * accumulate / reference


def _key(cfg: Mapping[str, Any], key: str, section: str) -> Any:
    """A setting the YAML states (``conf/model/classifier.yaml``, ``conf/model/_ssl.yaml``): no code default."""
    if key not in cfg:
        raise ConfigError(f"model.{section} has no {key!r}; the defaults live in conf/model/*.yaml")
    return cfg[key]


def build_optimizer(groups: list[dict[str, Any]], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    name = str(_key(cfg, "name", "optimizer")).lower()
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=groups[0]["lr"],
            momentum=float(_key(cfg, "momentum", "optimizer")),
            nesterov=bool(_key(cfg, "nesterov", "optimizer")),
        )
    if name == "adamw":
        betas = tuple(float(b) for b in _key(cfg, "betas", "optimizer"))
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas)
    if name == "adam":
        return torch.optim.Adam(groups, lr=groups[0]["lr"])
    raise ConfigError(f"optimizer.name={name!r}: choose sgd, adamw or adam")


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """lr multiplier: linear warm-up from 0 to 1, then cosine down to ``min_ratio``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = min(max(0, int(warmup_steps)), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: Mapping[str, Any]):
    """LambdaLR stepping every optimiser step; groups flagged ``fixed_lr`` keep their lr (SimSiam's predictor)."""
    warmup = _key(cfg, "warmup_steps", "scheduler")
    if warmup is None:
        warmup = round(float(_key(cfg, "warmup_fraction", "scheduler")) * total_steps)
    cosine = warmup_cosine(total_steps, int(warmup), float(_key(cfg, "min_lr_ratio", "scheduler")))
    lambdas = [(lambda _s: 1.0) if g.get("fixed_lr") else cosine for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
