"""SimSiam heads, loss with stop-gradient, collapse metric; classifier head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from liverfusion.errors import ConfigError
from liverfusion.models import (
    ClassifierHead,
    L2NormalizedStd,
    NegativeCosineSimilarity,
    PredictionHead,
    ProjectionHead,
    SimSiamLoss,
    collapse_level,
    negative_cosine_similarity,
    std_of_l2_normalized,
)


def _kinds(module: nn.Module) -> list[type]:
    return [type(m) for m in module.layers]


def test_projector_layout_is_simsiam():
    head = ProjectionHead(in_dim=16, hidden_dim=32, out_dim=24)
    assert _kinds(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    norms = [m for m in head.layers if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 24)]
    assert all(m.bias is None for m in linears), "no bias before BatchNorm"
    assert [n.affine for n in norms] == [True, True, False], "last BN is not affine"
    assert head(torch.randn(5, 16)).shape == (5, 24)


def test_projector_two_layers_and_bad_depth():
    head = ProjectionHead(in_dim=8, hidden_dim=16, out_dim=4, num_layers=2)
    assert _kinds(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert head.layers[-1].affine is False
    with pytest.raises(ConfigError, match="num_layers"):
        ProjectionHead(8, num_layers=4)


def test_projector_defaults_are_the_paper_dims():
    head = ProjectionHead(in_dim=512)
    assert [m.out_features for m in head.layers if isinstance(m, nn.Linear)] == [2048, 2048, 2048]
    pred = PredictionHead()
    assert [(m.in_features, m.out_features) for m in pred.layers if isinstance(m, nn.Linear)] == [
        (2048, 512),
        (512, 2048),
    ]


def test_predictor_is_a_bottleneck_with_plain_linear_out():
    pred = PredictionHead(in_dim=24, hidden_dim=6, out_dim=24)
    assert _kinds(pred) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert pred.layers[0].bias is None and pred.layers[-1].bias is not None
    assert pred(torch.randn(4, 24)).shape == (4, 24)


def test_loss_of_identical_p_and_z_is_minus_one():
    z = torch.randn(8, 16)
    assert negative_cosine_similarity(z, z).item() == pytest.approx(-1.0, abs=1e-6)
    assert negative_cosine_similarity(z, -3 * z).item() == pytest.approx(1.0, abs=1e-6)
    assert SimSiamLoss()(z, 2 * z, 0.5 * z, z).item() == pytest.approx(-1.0, abs=1e-6)


def test_symmetric_loss_formula():
    p1, p2, z1, z2 = (torch.randn(6, 10) for _ in range(4))
    cos = nn.functional.cosine_similarity
    expected = -(cos(p1, z2).mean() + cos(p2, z1).mean()) / 2
    torch.testing.assert_close(SimSiamLoss()(p1, p2, z1, z2), expected)
    torch.testing.assert_close(NegativeCosineSimilarity()(p1, z1), -cos(p1, z1).mean())


def test_gradients_never_reach_the_stop_gradient_branch():
    p1, p2, z1, z2 = (torch.randn(6, 10, requires_grad=True) for _ in range(4))
    SimSiamLoss()(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_gradient_reaches_z_only_through_the_predictor():
    """In a real SimSiam graph z feeds the predictor; its gradient must equal the predictor path's alone."""
    torch.manual_seed(0)
    pred = PredictionHead(8, 4, 8)
    z1, z2 = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    loss = SimSiamLoss()(pred(z1), pred(z2), z1, z2)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    # same loss with the targets as constants: identical gradients, so the target branch contributes nothing
    c1, c2 = z1.detach().clone(), z2.detach().clone()
    h1, h2 = torch.autograd.grad(SimSiamLoss()(pred(z1), pred(z2), c1, c2), (z1, z2))
    torch.testing.assert_close(g1, h1)
    torch.testing.assert_close(g2, h2)


def test_collapse_metric_random_vs_constant():
    torch.manual_seed(0)
    d = 64
    z = torch.randn(4096, d)
    std = std_of_l2_normalized(z)
    assert std.item() == pytest.approx(1 / math.sqrt(d), rel=0.03)
    assert abs(collapse_level(std, d)) < 0.03
    const = torch.ones(256, d) * 3.0
    assert std_of_l2_normalized(const).item() == pytest.approx(0.0, abs=1e-6)
    assert collapse_level(std_of_l2_normalized(const), d) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="N >= 2"):
        std_of_l2_normalized(torch.randn(1, d))


def test_epoch_metric_equals_the_whole_epoch_std():
    torch.manual_seed(1)
    z = torch.randn(300, 32) + torch.linspace(0, 2, 32)  # non-centred, so the streaming formula is exercised
    metric = L2NormalizedStd(dim=32)
    for chunk in z.split(7):
        metric.update(chunk)
    torch.testing.assert_close(metric.compute(), std_of_l2_normalized(z), rtol=1e-5, atol=1e-6)
    metric.reset()
    metric.update(torch.ones(10, 32))
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="dim=32"):
        metric.update(torch.randn(4, 16))


def test_classifier_head():
    head = ClassifierHead(12, 3)
    assert _kinds(head) == [nn.Dropout, nn.Linear]
    deep = ClassifierHead(12, 3, hidden_dims=[8], dropout=0.5)
    assert _kinds(deep) == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert deep(torch.randn(4, 12)).shape == (4, 3)
    with pytest.raises(ConfigError, match="dropout"):
        ClassifierHead(12, 3, dropout=1.0)
