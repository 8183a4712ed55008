"""Fusion blocks, the classifier network, missing modalities, presets and complexity counts."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import liverfusion
from liverfusion.errors import ConfigError
from liverfusion.models import (
    FUSIONS,
    CGCBlock,
    CGCFusion,
    EarlyFusion,
    FusionClassifierNet,
    LateConcatFusion,
    LateMeanFusion,
    SingleModalityFusion,
    build_encoder,
    build_fusion,
    build_fusion_classifier,
    fusion_class,
)
from liverfusion.models.complexity import complexity_report, count_parameters, preset_table

CONF = Path(liverfusion.__file__).parent / "conf"
FUSION_PRESETS = sorted(p.stem for p in (CONF / "fusion").glob("*.yaml"))
ENCODER_PRESETS = sorted(p.stem for p in (CONF / "encoder").glob("*.yaml"))
MODS = ["t1", "flair", "t2"]
TINY_ENC = {
    "arch": "resnet10",
    "widths": [4, 8, 8, 8],
    "pool_stride": [1, 2, 2],
    "stage_strides": [1, 2, 2, 1],
}
SIZE = (8, 32, 32)  # map 1x2x2 with TINY_ENC: enough for shape/mask tests
N, M, C, F, K = 2, 3, 4, 6, 5


def make_fusion(cls, **kw):
    in_ch = C if cls.consumes == "map" else F
    return cls(num_modalities=1 if cls is EarlyFusion else M, in_channels=in_ch, num_classes=K, **kw).eval()


def fusion_inputs(slots=M):
    torch.manual_seed(0)
    return torch.randn(N, slots, C, 2, 4, 4), torch.randn(N, slots, F), torch.ones(N, slots, dtype=torch.bool)


def test_presets_shipped():
    assert {"cgc", "single", "early", "late_concat", "late_mean"} <= set(FUSION_PRESETS)


@pytest.mark.parametrize(
    "cls", [CGCFusion, SingleModalityFusion, LateConcatFusion, LateMeanFusion, EarlyFusion]
)
def test_block_shapes_and_config_round_trip(cls):
    block = make_fusion(cls)
    slots = block.input_slots
    maps, pooled, mask = fusion_inputs(slots)
    out = block(maps if cls.consumes == "map" else None, pooled, mask)
    assert out.logits.shape == (N, K) and out.features.shape == (N, block.feature_dim)
    again = build_fusion(**block.config()).eval()
    again.load_state_dict(block.state_dict())
    torch.testing.assert_close(again(maps, pooled, mask).logits, out.logits)


def test_feature_dims():
    assert make_fusion(CGCFusion, width=3).feature_dim == M * 3
    assert make_fusion(LateConcatFusion).feature_dim == M * F
    assert make_fusion(LateMeanFusion).feature_dim == F


def test_cgc_groups_and_channels():
    block = make_fusion(CGCFusion, width=2, num_blocks=2, kernel_3d=[1, 3, 3], kernel_2d=5)
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.groups for c in convs] == [M] * 4
    assert [(c.in_channels, c.out_channels) for c in convs] == [(M * C, M * 2)] + [(M * 2, M * 2)] * 3
    assert [c.kernel_size for c in convs] == [
        (1, 3, 3),
        (1, 5, 5),
    ] * 2  # the second conv is in-plane (1, k, k)
    assert block.fuse_maps(*fusion_inputs()[::2]).shape == (N, M * 2, 2, 4, 4)


def test_cgc_width_must_divide_into_groups():
    with pytest.raises(ConfigError, match="divisible"):
        CGCBlock(in_channels=12, out_channels=10, groups=4)
    with pytest.raises(ConfigError, match="divisible"):
        CGCBlock(in_channels=10, out_channels=12, groups=4)
    with pytest.raises(ConfigError, match="odd"):
        CGCBlock(in_channels=12, out_channels=12, groups=4, kernel_2d=2)
    with pytest.raises(ConfigError, match="width"):
        make_fusion(CGCFusion, width=0)


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(6.0).view(1, 6, 1, 1, 1)
    shuffled = torch.nn.ChannelShuffle(3)(x)
    assert shuffled.flatten().tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]
    ref = x.view(1, 3, 2, 1, 1, 1).transpose(1, 2).reshape(1, 6, 1, 1, 1)
    assert torch.equal(shuffled, ref)


def _changed_channels(block: CGCFusion, j: int) -> torch.Tensor:
    """Perturb modality j's map; which output channels of the CGC blocks change?"""
    maps, _, mask = fusion_inputs()
    with torch.no_grad():
        base = block.fuse_maps(maps, mask)
        moved = maps.clone()
        moved[:, j] += 5 * torch.randn_like(moved[:, j])
        out = block.fuse_maps(moved, mask)
    return (out - base).abs().amax(dim=(0, 2, 3, 4)) > 1e-5


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_without_shuffle_each_output_channel_sees_one_modality(num_blocks):
    torch.manual_seed(0)
    width = 4
    block = make_fusion(CGCFusion, width=width, num_blocks=num_blocks, shuffle=False)
    for j in range(M):
        changed = _changed_channels(block, j).view(M, width)  # phase-major: row g = modality group g
        assert changed[j].any()
        assert not changed[[g for g in range(M) if g != j]].any(), f"modality {j} leaked into another group"


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_with_shuffle_every_group_sees_every_modality(num_blocks):
    torch.manual_seed(0)
    width = 4
    block = make_fusion(CGCFusion, width=width, num_blocks=num_blocks, shuffle=True)
    for j in range(M):
        changed = _changed_channels(block, j).view(M, width)
        assert changed.any(dim=1).all(), f"modality {j} does not reach every output group"


def test_single_by_name_and_index():
    block = make_fusion(SingleModalityFusion, modality="flair")
    with pytest.raises(ConfigError, match="never bound"):
        block(None, *fusion_inputs()[1:])
    block.bind_modalities(MODS)
    assert block.used_modalities() == [1]
    _, pooled, mask = fusion_inputs()
    torch.testing.assert_close(block(None, pooled, mask).features, pooled[:, 1])
    with pytest.raises(ConfigError, match="not one of"):
        make_fusion(SingleModalityFusion, modality="dwi").bind_modalities(MODS)
    with pytest.raises(ConfigError, match="outside"):
        make_fusion(SingleModalityFusion, modality=3)
    with pytest.raises(ConfigError, match="3 modalities"):
        make_fusion(LateConcatFusion).bind_modalities(MODS[:2])


@pytest.mark.parametrize(
    "cls", [CGCFusion, SingleModalityFusion, LateConcatFusion, LateMeanFusion, EarlyFusion]
)
def test_blocks_ignore_the_content_of_masked_inputs(cls):
    block = make_fusion(cls)
    maps, pooled, mask = fusion_inputs(block.input_slots)
    mask[0, 0] = False
    mask[1, -1] = False
    ref = block(maps, pooled, mask)
    maps[0, 0], pooled[0, 0] = float("nan"), float("nan")
    maps[1, -1], pooled[1, -1] = 1e3, -1e3
    out = block(maps, pooled, mask)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.features, ref.features)


def test_late_mean_averages_present_modalities_only():
    block = make_fusion(LateMeanFusion)
    _, pooled, mask = fusion_inputs()
    mask[0, 1] = False
    mask[1] = False  # a case with nothing: zero logits, no NaN
    out = block(None, pooled, mask)
    with torch.no_grad():
        expected0 = (block.head(pooled[0, 0]) + block.head(pooled[0, 2])) / 2
    torch.testing.assert_close(out.logits[0], expected0)
    assert torch.equal(out.logits[1], torch.zeros(K))


def test_bad_inputs_are_config_errors():
    block = make_fusion(LateConcatFusion)
    maps, pooled, mask = fusion_inputs()
    with pytest.raises(ConfigError, match="pooled"):
        block(None, pooled[:, :2], mask)
    with pytest.raises(ConfigError, match="mask"):
        block(None, pooled, mask.float())
    with pytest.raises(ConfigError, match="maps"):
        make_fusion(CGCFusion)(None, pooled, mask)


# --- the classifier network ---------------------------------------------------------------------------------


def _net(fusion_name: str, **fusion_kw) -> FusionClassifierNet:
    torch.manual_seed(0)
    factory = functools.partial(FUSIONS[fusion_name], **fusion_kw)
    return build_fusion_classifier(functools.partial(build_encoder, **TINY_ENC), factory, MODS, K).eval()


@pytest.mark.parametrize("name", ["cgc", "single", "late_concat", "late_mean", "early"])
def test_outputs_do_not_depend_on_masked_modalities(name):
    net = _net(name, modality="t2") if name == "single" else _net(name)
    x = torch.randn(N, M, *SIZE)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    with torch.no_grad():
        ref = net(x, mask)
        y = x.clone()
        y[0, 1] = float("nan")  # even NaNs in an absent modality must not leak
        y[1, 0] = 100 * torch.randn(SIZE)
        out = net(y, mask)
        present_changed = x.clone()
        present_changed[0, 2] += torch.randn(SIZE)
        moved = net(present_changed, mask)
    assert ref.logits.shape == (N, K) and ref.features.shape == (N, net.fusion.feature_dim)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.features, ref.features)
    assert not torch.allclose(moved.logits[0], ref.logits[0]), "a present modality must matter"


def test_shared_topology_encodes_only_present_used_volumes():
    net = _net("late_concat")
    seen = []
    net.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    mask = torch.tensor([[True, False, True], [False, False, True]])
    net(torch.randn(N, M, *SIZE), mask)
    assert seen == [torch.Size([3, 1, *SIZE])]
    single = _net("single", modality="flair")
    seen.clear()
    single.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    single(torch.randn(N, M, *SIZE), torch.ones(N, M, dtype=torch.bool))
    assert seen == [torch.Size([2, 1, *SIZE])]
    out = net(torch.randn(N, M, *SIZE), torch.zeros(N, M, dtype=torch.bool))  # nothing present at all
    assert torch.isfinite(out.logits).all()


def test_early_topology_stacks_modalities_as_channels():
    net = _net("early")
    assert net.mode == "early" and net.encoder.in_channels == M
    seen = []
    net.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    out = net(torch.randn(N, M, *SIZE))
    assert seen == [torch.Size([N, M, *SIZE])] and out.pooled.shape == (N, 1, net.encoder.feature_dim)


def test_training_gradients_reach_encoder_and_fusion():
    net = _net("cgc").train()
    out = net(torch.randn(N, M, *SIZE), torch.tensor([[True, True, False], [True, True, True]]))
    out.logits.sum().backward()
    assert net.encoder.conv1.weight.grad.abs().sum() > 0
    assert net.fusion.blocks[0].conv3d.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["cgc", "late_concat"])
def test_bf16_autocast_trains_with_a_missing_modality(name):
    """The GPU preset trains under bf16 autocast: the per-modality buffers take the encoder's output dtype (a float32
    buffer refused the bf16 maps: 'Index put requires the source and destination dtypes match')."""
    net = _net(name).train()
    mask = torch.tensor([[True, False, True], [True, True, True]])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = net(torch.randn(N, M, *SIZE), mask)
    assert out.logits.shape == (N, K) and torch.isfinite(out.logits.float()).all()
    out.logits.float().sum().backward()
    assert net.encoder.conv1.weight.grad.abs().sum() > 0


def test_classifier_refuses_inconsistent_parts():
    enc1 = build_encoder(**TINY_ENC)
    late = LateConcatFusion(M, enc1.feature_dim, K)
    with pytest.raises(ConfigError, match="in_channels=3"):
        FusionClassifierNet(enc1, EarlyFusion(M, enc1.feature_dim, K), MODS, K)
    with pytest.raises(ConfigError, match="topology"):
        FusionClassifierNet(enc1, late, MODS, K, mode="early")
    with pytest.raises(ConfigError, match="classes"):
        FusionClassifierNet(enc1, late, MODS, K + 1)
    with pytest.raises(ConfigError, match="gives"):
        FusionClassifierNet(enc1, LateConcatFusion(M, enc1.feature_dim + 1, K), MODS, K)
    with pytest.raises(ConfigError, match="distinct"):
        FusionClassifierNet(enc1, late, ["a", "a", "b"], K)
    net = FusionClassifierNet(enc1, late, MODS, K)
    with pytest.raises(ConfigError, match="input"):
        net(torch.randn(N, 2, *SIZE))
    with pytest.raises(ConfigError, match="mask"):
        net(torch.randn(N, M, *SIZE), torch.ones(N, 2, dtype=torch.bool))


# --- presets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUSION_PRESETS)
def test_every_fusion_preset_instantiates_with_hydra(name):
    factory = instantiate(OmegaConf.load(CONF / "fusion" / f"{name}.yaml"))
    assert isinstance(factory, functools.partial)
    cls = fusion_class(factory)
    assert cls.name == name
    encoder_cfg = OmegaConf.merge(
        OmegaConf.load(CONF / "encoder" / "resnet10_cpu.yaml"), {"widths": [4, 8, 8, 8]}
    )
    net = build_fusion_classifier(functools.partial(instantiate, encoder_cfg), factory, MODS, K).eval()
    with torch.no_grad():
        out = net(torch.randn(1, M, *SIZE))
    assert out.logits.shape == (1, K)
    assert net.fusion.config()["name"] == name


def test_fusion_class_rejects_non_fusion_factories():
    with pytest.raises(ConfigError, match="Fusion"):
        fusion_class(functools.partial(dict, a=1))


@pytest.mark.parametrize("encoder", ENCODER_PRESETS)
@pytest.mark.parametrize("size", [(16, 64, 64), (16, 128, 128)], ids=["demo", "lld"])
def test_cgc_input_keeps_space_for_every_shipped_encoder(encoder, size):
    """CGC's 3D and in-plane kernels must see space: its input keeps extent > 1 on every axis (>= 2x4x4)."""
    enc = instantiate(
        OmegaConf.merge(OmegaConf.load(CONF / "encoder" / f"{encoder}.yaml"), {"widths": [4, 4, 4, 4]})
    )
    shape = enc.map_shape(size)
    assert min(shape) > 1 and shape[0] >= 2 and shape[1] >= 4 and shape[2] >= 4


@pytest.mark.parametrize("size", [(16, 64, 64), (16, 128, 128)], ids=["demo", "lld"])
def test_cgc_receives_a_spatial_map_at_real_size(size):
    cfg = OmegaConf.load(CONF / "encoder" / "resnet10_cpu.yaml")
    net = build_fusion_classifier(
        functools.partial(instantiate, cfg),
        instantiate(OmegaConf.load(CONF / "fusion" / "cgc.yaml")),
        MODS,
        K,
    ).eval()
    seen = []
    net.fusion.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        net(torch.randn(1, M, *size))
    (shape,) = seen
    assert shape[1] == M * net.encoder.map_channels
    assert min(shape[2:]) > 1 and shape[2:] >= (2, 4, 4)


# --- complexity -----------------------------------------------------------------------------------------------


def test_complexity_counts_are_exact_for_known_layers():
    late = _net("late_concat")
    report = complexity_report(late, SIZE)
    f = late.encoder.feature_dim
    assert report["fusion_params"] == M * f * K + K == count_parameters(late.fusion)
    assert report["fusion_flops"] == 2 * M * f * K  # one (1 x Mf) @ (Mf x K) product
    cgc = _net("cgc", width=2)
    report = complexity_report(cgc, SIZE)
    voxels = 1 * 2 * 2  # map 1x2x2 with TINY_ENC at 8x32x32
    c = cgc.encoder.map_channels
    conv3d = 2 * voxels * (M * 2) * c * 27  # groups=M: each output channel reads c input channels
    conv2d = 2 * voxels * (M * 2) * 2 * 9
    assert report["fusion_flops"] == conv3d + conv2d + 2 * M * 2 * K
    assert report["encoder_flops"] > report["fusion_flops"] > 0
    assert report["total_params"] == count_parameters(cgc)


def test_preset_table_covers_every_preset():
    rows = preset_table("resnet10_cpu", SIZE, num_modalities=2, num_classes=3)
    assert [r["preset"] for r in rows] == FUSION_PRESETS
    by_name = {r["preset"]: r for r in rows}
    assert by_name["single"]["encoder_flops"] * 2 == by_name["late_concat"]["encoder_flops"]
    assert by_name["cgc"]["fusion_params"] > by_name["late_concat"]["fusion_params"]
