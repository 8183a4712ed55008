"""Optimiser pieces: lr scaling rule, warm-up + cosine, fixed-lr groups, weight-decay exclusion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from liverfusion.errors import ConfigError
from liverfusion.modules.schedule import (
    build_optimizer,
    build_scheduler,
    scaled_lr,
    split_decay,
    warmup_cosine,
)


def test_scaled_lr_counts_batch_devices_and_accumulation():
    assert scaled_lr(0.05, 256, 1, 1) == pytest.approx(0.05)
    assert scaled_lr(0.05, 32, 1, 1) == pytest.approx(0.00625)
    assert scaled_lr(0.05, 32, 4, 2) == pytest.approx(0.05)
    assert scaled_lr(0.1, 64, 2, 1, reference=128) == pytest.approx(0.1)


def test_warmup_then_cosine_to_floor():
    f = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    warm = [f(s) for s in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:])) and warm[-1] < 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert warmup_cosine(5, 0)(0) == pytest.approx(1.0)


def test_fixed_lr_group_keeps_its_lr_while_others_follow_the_schedule():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    groups = [{"params": a.parameters(), "lr": 0.2}, {"params": b.parameters(), "lr": 0.2, "fixed_lr": True}]
    opt = build_optimizer(groups, {"name": "sgd", "momentum": 0.9, "nesterov": False})
    sched = build_scheduler(opt, total_steps=20, cfg={"warmup_steps": 0, "min_lr_ratio": 0.0})
    lrs = []
    for _ in range(20):
        opt.step()
        sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    assert all(fixed == pytest.approx(0.2) for _, fixed in lrs)
    assert lrs[9][0] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert lrs[-1][0] == pytest.approx(0.0, abs=1e-12)


def test_split_decay_excludes_norm_and_bias_only_when_asked():
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.Linear(2, 2))
    decay, no_decay = split_decay(net.named_parameters(), exclude_bn_bias=True)
    assert [p.ndim for p in decay] == [5, 2]
    assert sorted(p.ndim for p in no_decay) == [1, 1, 1, 1]
    decay, no_decay = split_decay(net.named_parameters(), exclude_bn_bias=False)
    assert len(decay) == 6 and not no_decay


def test_optimizer_names_and_settings_come_from_the_yaml_only():
    params = [{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1}]
    opt = build_optimizer(params, {"name": "adamw", "betas": [0.8, 0.99]})
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.99)
    with pytest.raises(ConfigError, match="optimizer.name"):
        build_optimizer(params, {"name": "lamb"})
    # no code default: a setting the YAML does not state is one error naming it
    with pytest.raises(ConfigError, match="model.optimizer has no 'nesterov'"):
        build_optimizer(params, {"name": "sgd", "momentum": 0.9})
    with pytest.raises(ConfigError, match="model.scheduler has no 'min_lr_ratio'"):
        build_scheduler(build_optimizer(params, {"name": "adam"}), 10, {"warmup_steps": 0})


def test_an_ssl_config_written_before_a_setting_existed_reads_it_from_the_yaml():
    """Runs configured before nesterov / betas / warmup_steps were stated in conf/model/_ssl.yaml lack them: they
    come from that file (the one place a default lives), not from the code."""
    from liverfusion.modules.simsiam import SimSiam
    from liverfusion.modules.ssl_config import checked_config
    from liverfusion.utils.config_sections import model_config

    cfg = model_config("simsiam")
    cfg.pop("encoder", None)
    old = {**cfg, "optimizer": dict(cfg["optimizer"]), "scheduler": dict(cfg["scheduler"])}
    for key in ("nesterov", "betas"):
        old["optimizer"].pop(key)
    old["scheduler"].pop("warmup_steps")
    got = checked_config(SimSiam, old)
    base = model_config("_ssl")
    assert got["optimizer"]["nesterov"] == base["optimizer"]["nesterov"]
    assert got["optimizer"]["betas"] == base["optimizer"]["betas"]
    assert got["scheduler"]["warmup_steps"] is None
