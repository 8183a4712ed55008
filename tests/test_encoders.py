"""Encoders: presets, per-axis strides, map size at the demo/LLD-MMRI sizes, MONAI parity, local weights only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from monai.networks.nets import ResNet
from omegaconf import OmegaConf

import liverfusion
from liverfusion.errors import CheckpointError, ConfigError
from liverfusion.models import build_encoder, encoder_config_diff

CONF = Path(liverfusion.__file__).parent / "conf"
ENCODER_PRESETS = sorted(p.stem for p in (CONF / "encoder").glob("*.yaml"))
DEMO, LLD = (16, 64, 64), (16, 128, 128)
TINY = [4, 8, 8, 16]


def preset_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / "encoder" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def test_presets_shipped():
    assert {"resnet10_cpu", "resnet10", "resnet18", "resnet34", "slab2d_resnet18"} <= set(ENCODER_PRESETS)


@pytest.mark.parametrize("name", ENCODER_PRESETS)
def test_preset_instantiates_and_config_round_trips(name):
    enc = instantiate(preset_cfg(name, widths=TINY))
    cfg = enc.config()
    assert cfg["widths"] == TINY and cfg["in_channels"] == 1
    again = build_encoder(**cfg)
    assert encoder_config_diff(cfg, again.config()) == []
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in enc.state_dict().items()
    }
    # the config survives torch.save / torch.load(weights_only=True), as it will inside encoder.pt
    assert encoder_config_diff(cfg, torch.load(_roundtrip(cfg), weights_only=True)) == []


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name", ENCODER_PRESETS)
@pytest.mark.parametrize("size", [DEMO, LLD], ids=["demo16x64x64", "lld16x128x128"])
def test_preset_map_keeps_2x4x4(name, size):
    enc = instantiate(preset_cfg(name, widths=TINY))
    d, h, w = enc.map_shape(size)
    assert d >= 2 and h >= 4 and w >= 4, f"{name} at {size}: map {d}x{h}x{w} is smaller than 2x4x4"


@pytest.mark.parametrize("name", ENCODER_PRESETS)
def test_map_shape_matches_forward(name):
    enc = instantiate(preset_cfg(name, widths=TINY)).eval()
    for size in [(8, 32, 32), (9, 35, 30)]:
        with torch.no_grad():
            out = enc(torch.randn(2, 1, *size))
        assert out.pooled.shape == (2, enc.feature_dim)
        assert out.map.shape == (2, enc.map_channels, *enc.map_shape(size))


@pytest.mark.parametrize("size", [DEMO, LLD], ids=["demo", "lld"])
def test_cpu_preset_real_size_forward(size):
    enc = instantiate(preset_cfg("resnet10_cpu")).eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 1, *size))
    assert out.map.shape[2:] == enc.map_shape(size)
    assert tuple(out.map.shape[2:]) >= (2, 4, 4) and min(out.map.shape[2:]) >= 2
    assert out.pooled.shape == (1, 128) and enc.feature_dim == 128 and enc.map_channels == 128


def test_per_axis_strides_keep_the_slice_axis():
    enc = build_encoder(
        arch="resnet10",
        widths=TINY,
        stem_stride=[1, 2, 2],
        pool_stride=[1, 2, 2],
        stage_strides=[1, [1, 2, 2], [1, 2, 2], [1, 2, 2]],
    )
    assert enc.map_shape((16, 64, 64)) == (16, 2, 2)
    with torch.no_grad():
        assert enc.eval()(torch.randn(1, 1, 16, 64, 64)).map.shape == (1, 16, 16, 2, 2)
    no_pool = build_encoder(arch="resnet10", widths=TINY, pool_stride=None).eval()  # stem 2 + stages 1/2/2/2
    assert (
        no_pool.map_shape((16, 64, 64))
        == (1, 4, 4)
        == tuple(no_pool(torch.randn(1, 1, 16, 64, 64)).map.shape[2:])
    )


def test_map_stage_taps_an_earlier_stage():
    enc = build_encoder(arch="resnet18", widths=TINY, map_stage=2)
    assert enc.map_channels == TINY[1] and enc.feature_dim == TINY[3]
    out = enc.eval()(torch.randn(1, 1, 16, 64, 64))
    assert out.map.shape == (1, TINY[1], *enc.map_shape((16, 64, 64)))
    assert enc.map_shape((16, 64, 64)) == (2, 8, 8)  # stem 2, pool 2, stage 2 stride 2: 8x in total


@pytest.mark.parametrize("arch,shortcut", [("resnet10", "B"), ("resnet18", "A")])
def test_matches_monai_resnet_with_default_strides(arch, shortcut):
    """With MONAI's strides our stages reproduce monai.networks.nets.ResNet exactly (same keys, same output)."""
    layers = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2]}[arch]
    torch.manual_seed(0)
    ref = ResNet(
        "basic",
        layers,
        TINY,
        n_input_channels=1,
        conv1_t_stride=2,
        shortcut_type=shortcut,
        bias_downsample=False,
        feed_forward=False,
    ).eval()
    ours = build_encoder(arch=arch, widths=TINY, stem_stride=2, pool_stride=2, stage_strides=[1, 2, 2, 2])
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).pooled, ref(x))


def test_early_fusion_in_channels_and_input_check():
    enc = build_encoder(arch="resnet10", widths=TINY, in_channels=3)
    assert enc.eval()(torch.randn(1, 3, 8, 32, 32)).pooled.shape == (1, TINY[-1])
    with pytest.raises(ConfigError, match="in_channels"):
        enc(torch.randn(1, 1, 8, 32, 32))


def test_slab2d_keeps_slices_independent():
    enc = build_encoder("slab2d", arch="resnet18", widths=TINY, stage_strides=[1, 2, 2, 1]).eval()
    x = torch.randn(2, 1, 6, 32, 32)
    with torch.no_grad():
        a = enc(x)
        y = x.clone()
        y[:, :, 3] += torch.randn_like(y[:, :, 3])
        b = enc(y)
    assert a.map.shape == (2, TINY[-1], 6, 2, 2) == (2, enc.map_channels, *enc.map_shape((6, 32, 32)))
    changed = (a.map - b.map).abs().amax(dim=(0, 1, 3, 4)) > 1e-6
    assert changed.tolist() == [False, False, False, True, False, False]
    torch.testing.assert_close(a.pooled, a.map.mean(dim=(2, 3, 4)))


def _monai_state(tmp_path: Path, **kwargs) -> tuple[Path, dict]:
    ref = ResNet(
        "basic",
        [1, 1, 1, 1],
        TINY,
        n_input_channels=1,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        num_classes=5,
        **kwargs,
    )
    state = {
        f"module.{k}": v for k, v in ref.state_dict().items()
    }  # DataParallel-style keys, with an fc head
    path = tmp_path / "medicalnet_like.pth"
    torch.save({"state_dict": state}, path)
    return path, ref.state_dict()


def test_local_weights_load_strictly(tmp_path):
    path, ref_state = _monai_state(tmp_path)
    enc = build_encoder(arch="resnet10", widths=TINY, pretrained=True, weights_path=str(path))
    for key, value in enc.state_dict().items():
        torch.testing.assert_close(value, ref_state[key])


def test_pretrained_without_local_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="weights_path"):
        build_encoder(arch="resnet10", widths=TINY, pretrained=True)
    with pytest.raises(ConfigError, match="weights_path"):
        build_encoder("slab2d", arch="resnet10", widths=TINY, pretrained=True)
    with pytest.raises(CheckpointError, match="no such file"):
        build_encoder(arch="resnet10", widths=TINY, weights_path=str(tmp_path / "absent.pt"))
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        build_encoder(arch="resnet10", widths=TINY, weights_path=str(bad))


def test_mismatched_weights_list_the_keys(tmp_path):
    path, _ = _monai_state(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing \d+: layer1\.1\.") as err:
        build_encoder(
            arch="resnet18", widths=TINY, shortcut_type="B", bias_downsample=False, weights_path=str(path)
        )
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_encoder(arch="resnet10", widths=[4, 8, 8, 32], weights_path=str(path))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"arch": "resnet11"}, "arch"),
        ({"widths": [8, 16, 32]}, "widths"),
        ({"stage_strides": [1, 2, 2]}, "stage_strides"),
        ({"stage_strides": [1, [1, 2], 2, 2]}, r"stage_strides\[1\]"),
        ({"stem_stride": [1, 2]}, "stem_stride"),
        ({"map_stage": 5}, "map_stage"),
        ({"shortcut_type": "C"}, "shortcut_type"),
        ({"depth": 18}, "no argument"),
        ({"spatial_dims": 2}, "no argument"),
    ],
)
def test_bad_config_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_encoder(**{"arch": "resnet10", "widths": TINY, **kwargs})


def test_unknown_encoder_name_and_too_small_input():
    with pytest.raises(ConfigError, match="resnet3d"):
        build_encoder("vit")
    with pytest.raises(ConfigError, match="too small"):
        build_encoder(arch="resnet10", widths=TINY).map_shape((0, 64, 64))


def test_config_diff_names_the_differences():
    a = build_encoder(arch="resnet10", widths=TINY).config()
    b = build_encoder(arch="resnet18", widths=TINY, in_channels=2).config()
    diff = encoder_config_diff(a, b)
    assert any(d.startswith("arch:") for d in diff) and any(d.startswith("in_channels:") for d in diff)
    assert encoder_config_diff(a, {**a, "widths": tuple(TINY)}) == []
