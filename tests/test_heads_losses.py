"""MLP heads (SimSiam, BYOL, VICReg), the SSL losses against hand-computed values, stop-gradient, collapse
metrics; classifier head."""

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
from liverfusion.models.heads import ExpanderHead, MLPHead
from liverfusion.models.losses import BYOLLoss, VICRegLoss, normalized_mse
from liverfusion.modules.ssl_health import RawStd


def _kinds(module: nn.Module) -> list[type]:
    return [type(m) for m in module.layers]


def test_projector_layout_is_simsiam():
    head = ProjectionHead(in_dim=16, hidden_dim=32, out_dim=24, num_layers=3)
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
        ProjectionHead(8, 16, 16, num_layers=4)


def test_heads_have_no_size_defaults():
    """Sizes come from conf/model/<method>.yaml only (SimSiam's were 2048 in code and 512 in the YAML)."""
    with pytest.raises(TypeError):
        ProjectionHead(in_dim=512)
    with pytest.raises(TypeError):
        PredictionHead()


def test_mlp_head_layouts_and_batchnorm_settings():
    # BYOL projector / predictor: Linear -> BN -> ReLU -> Linear (bias only where no BN follows)
    byol = MLPHead(16, [32], 8, norm="batch", last_norm="none")
    assert _kinds(byol) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert byol.layers[0].bias is None and byol.layers[-1].bias is not None
    assert byol(torch.randn(5, 16)).shape == (5, 8)
    # no hidden layer: a single Linear; norm none: biases everywhere, no BN
    assert _kinds(MLPHead(16, [], 4)) == [nn.Linear]
    plain = MLPHead(16, [8, 8], 4, norm="none")
    assert _kinds(plain) == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert all(m.bias is not None for m in plain.layers if isinstance(m, nn.Linear))
    # last_norm: affine BN vs SimSiam's plain (non-affine) BN on the output
    assert MLPHead(16, [8], 4, last_norm="affine").layers[-1].affine is True
    assert MLPHead(16, [8], 4, last_norm="plain").layers[-1].affine is False
    assert MLPHead(16, [8], 4, bias=True).layers[0].bias is not None  # forced
    # VICReg expander: (num_layers - 1) x (Linear, BN, ReLU), then a plain Linear
    exp = ExpanderHead(16, 32, 24, num_layers=3)
    assert _kinds(exp) == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert [(m.in_features, m.out_features) for m in exp.layers if isinstance(m, nn.Linear)] == [
        (16, 32),
        (32, 32),
        (32, 24),
    ]
    assert exp(torch.randn(3, 16)).shape == (3, 24)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: MLPHead(16, [0], 8, name="model.projector"), r"model\.projector: every width must be >= 1"),
        (lambda: MLPHead(16, [8], -1), "every width must be >= 1"),
        (lambda: MLPHead(0, [8], 8), "every width must be >= 1"),
        (
            lambda: MLPHead(16, [8], 8, norm="layer"),
            r"norm='layer' is unknown; choose one of \['batch', 'none'\]",
        ),
        (lambda: MLPHead(16, [8], 8, last_norm="yes"), "last_norm='yes' is unknown"),
        (lambda: ExpanderHead(16, 8, 8, num_layers=0), "num_layers=0"),
        (lambda: PredictionHead(16, 0, 16), "every width must be >= 1"),
    ],
)
def test_bad_head_settings_are_config_errors(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


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
    assert SimSiamLoss()(z, z, -z, -z).item() == pytest.approx(1.0, abs=1e-6)  # the upper bound


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


def test_byol_loss_against_hand_values():
    # cos(p, z) = 0 -> 2; cos = 1/sqrt(2) -> 2 - sqrt(2); cos = 1 -> 0; cos = -1 -> 4
    p1, z2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    p2, z1 = torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    assert normalized_mse(p1, z2).item() == pytest.approx((2.0 + 2.0 - math.sqrt(2)) / 2, abs=1e-6)
    assert normalized_mse(p2, z1).item() == pytest.approx(2.0, abs=1e-6)
    assert BYOLLoss()(p1, p2, z1, z2).item() == pytest.approx(((4.0 - math.sqrt(2)) / 2 + 2.0) / 2, abs=1e-6)
    # the teacher's targets get no gradient
    t1, t2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    q1 = p1.clone().requires_grad_()
    BYOLLoss()(q1, p2, t1, t2).backward()
    assert t1.grad is None and t2.grad is None and q1.grad.abs().sum() > 0


def test_vicreg_loss_against_hand_values():
    """z_a = [[0, 0], [2, 2]], z_b = [[0, 0], [2, 0]] (N = 2, d = 2), worked by hand:
    invariance: squared differences 0, 0, 0, 4 -> mean 1.
    variance: per-dim var (unbiased) a: 2, 2 -> std 1.414 > 1 -> 0; b: 2, 0 -> std 1.414, sqrt(1e-4) = 0.01 ->
      hinges 0, 0.99 -> mean 0.495; (0 + 0.495) / 2 = 0.2475.
    covariance: a centred [[-1, -1], [1, 1]] -> cov [[2, 2], [2, 2]] -> (2^2 + 2^2) / d = 4; b -> off-diagonal 0.
    total = 25 * 1 + 25 * 0.2475 + 1 * 4 = 35.1875."""
    z_a, z_b = torch.tensor([[0.0, 0.0], [2.0, 2.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    loss = VICRegLoss(inv_weight=25, var_weight=25, cov_weight=1, gamma=1.0, eps=1e-4)
    terms = loss.terms(z_a, z_b)
    assert terms["invariance"].item() == pytest.approx(1.0)
    assert terms["variance"].item() == pytest.approx(0.2475, abs=1e-6)
    assert terms["covariance"].item() == pytest.approx(4.0, abs=1e-6)
    assert loss(z_a, z_b).item() == pytest.approx(35.1875, abs=1e-5)
    # the weights are the config's: only invariance
    assert VICRegLoss(1, 0, 0, 1.0, 1e-4)(z_a, z_b).item() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="inv_weight"):
        VICRegLoss(-1, 25, 1, 1.0, 1e-4)


def test_raw_std_metric_is_the_unnormalised_std():
    torch.manual_seed(2)
    z = 3.0 * torch.randn(400, 16) + 5.0  # not normalised, not centred: std ~3 per dim
    metric = RawStd(dim=16)
    for chunk in z.split(33):
        metric.update(chunk)
    torch.testing.assert_close(metric.compute(), z.std(dim=0).mean(), rtol=1e-5, atol=1e-6)
    metric.reset()
    metric.update(torch.full((10, 16), 7.0))  # collapsed: every row the same
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-6)


def test_classifier_head():
    head = ClassifierHead(12, 3)
    assert _kinds(head) == [nn.Dropout, nn.Linear]
    deep = ClassifierHead(12, 3, hidden_dims=[8], dropout=0.5)
    assert _kinds(deep) == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert deep(torch.randn(4, 12)).shape == (4, 3)
    with pytest.raises(ConfigError, match="dropout"):
        ClassifierHead(12, 3, dropout=1.0)
