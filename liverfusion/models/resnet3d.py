"""MONAI ResNet (10/18/34/...) as an encoder with per-axis strides and a tappable spatial map.

MONAI's ``ResNet`` fixes every stage stride to an isotropic 2, so a 16-slice slab loses its slice axis before the
last stage and a 64 x 64 crop ends at 2 x 2 in-plane: too small for CGC's 3D and in-plane kernels. The stages are
therefore assembled here from MONAI's own ``ResNetBlock`` / ``ResNetBottleneck``, norm/act factories and
``resnet_params`` table, with strides given per axis. Module names (``conv1``, ``bn1``, ``layer1``..) match
MONAI's ``ResNet``, so its (and MedicalNet's) state dicts load unchanged when the widths and shortcut agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck, get_inplanes, resnet_params
from torch import nn

from liverfusion.errors import ConfigError
from liverfusion.models.encoder_base import (
    Encoder,
    EncoderOutput,
    as_tuple,
    conv_out_size,
    layer_spec,
    load_local_weights,
    plain,
)

_BLOCKS: dict[str, type[ResNetBlock | ResNetBottleneck]] = {
    "basic": ResNetBlock,
    "bottleneck": ResNetBottleneck,
}


class ZeroPadShortcut(nn.Module):
    """ResNet shortcut type A: subsample by the stride and zero-pad the new channels (no parameters).

    Unlike MONAI's version (which concatenates ``out.data``), the identity part keeps its gradient.
    """

    def __init__(self, out_channels: int, stride: tuple[int, ...]):
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]
        pad = self.out_channels - x.shape[1]
        if pad > 0:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
        return x


class ResNetEncoder(Encoder):
    """ResNet trunk for ``spatial_dims`` 3 (volumes) or 2 (used per slice by the slab encoder).

    Args:
        arch: a key of MONAI's ``resnet_params`` (resnet10, resnet18, resnet34, resnet50, ...): block type, blocks
            per stage and default shortcut.
        in_channels: 1 for the shared per-modality encoder, M for the ``early`` fusion baseline.
        widths: planes per stage (MONAI ``block_inplanes``); default 64, 128, 256, 512.
        stem_kernel / stem_stride: first convolution, an int or one value per axis (D, H, W).
        pool_stride: stride of the 3x3x3 max pool after the stem (kernel 1 along axes with stride 1);
            ``None`` removes the pool.
        stage_strides: per stage, an int or one value per axis; default MONAI's 1, 2, 2, 2.
        map_stage: 1-based stage whose output is the spatial map (default: the last stage).
        shortcut_type: ``A`` (zero pad) or ``B`` (1x1 conv + norm); default as MONAI for ``arch``.
        bias_downsample: bias of the type-B shortcut conv; default as MONAI for ``arch``.
        norm, act: MONAI layer specs, e.g. ``batch`` or ``[group, {num_groups: 8}]``.
        pretrained: MONAI-style flag; here it only demands ``weights_path`` (nothing is ever downloaded).
        weights_path: local state dict (e.g. MedicalNet or an exported encoder) loaded strictly.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        in_channels: int = 1,
        widths: Sequence[int] | None = None,
        stem_kernel: int | Sequence[int] = 7,
        stem_stride: int | Sequence[int] = 2,
        pool_stride: int | Sequence[int] | None = 2,
        stage_strides: Sequence[int | Sequence[int]] | None = None,
        map_stage: int | None = None,
        shortcut_type: str | None = None,
        bias_downsample: bool | None = None,
        norm: str | Sequence[Any] = "batch",
        act: str | Sequence[Any] = "relu",
        spatial_dims: int = 3,
        pretrained: bool = False,
        weights_path: str | Path | None = None,
    ):
        super().__init__()
        if arch not in resnet_params:
            raise ConfigError(f"encoder.arch={arch!r} is unknown; choose one of {sorted(resnet_params)}")
        block_name, layers, default_shortcut, default_bias, _ = resnet_params[arch]
        block = _BLOCKS[block_name]
        n_stages = len(layers)
        nd = spatial_dims
        if in_channels < 1:
            raise ConfigError(f"encoder.in_channels={in_channels}: must be >= 1")
        widths = list(get_inplanes() if widths is None else widths)
        if len(widths) != n_stages or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ConfigError(
                f"encoder.widths={widths}: {arch} needs {n_stages} positive ints (one per stage)"
            )
        stage_strides = [1, 2, 2, 2] if stage_strides is None else list(stage_strides)
        if len(stage_strides) != n_stages:
            raise ConfigError(
                f"encoder.stage_strides={stage_strides}: {arch} needs {n_stages} entries (one per stage)"
            )
        strides = [as_tuple(s, nd, f"encoder.stage_strides[{i}]") for i, s in enumerate(stage_strides)]
        map_stage = n_stages if map_stage is None else map_stage
        if not 1 <= map_stage <= n_stages:
            raise ConfigError(f"encoder.map_stage={map_stage}: must be between 1 and {n_stages}")
        shortcut_type = default_shortcut if shortcut_type is None else shortcut_type
        if shortcut_type not in ("A", "B"):
            raise ConfigError(f"encoder.shortcut_type={shortcut_type!r}: must be 'A' or 'B'")
        bias_downsample = default_bias if bias_downsample is None else bool(bias_downsample)
        if pretrained and weights_path is None:
            raise ConfigError(
                "encoder.pretrained=true needs encoder.weights_path (a local state dict file): weights are never "
                "downloaded; set weights_path or pretrained=false"
            )

        self.arch, self.spatial_dims, self.in_channels = arch, nd, in_channels
        self.widths, self.stage_strides, self.map_stage = widths, strides, map_stage
        self.stem_kernel = as_tuple(stem_kernel, nd, "encoder.stem_kernel")
        self.stem_stride = as_tuple(stem_stride, nd, "encoder.stem_stride")
        self.pool_stride = None if pool_stride is None else as_tuple(pool_stride, nd, "encoder.pool_stride")
        self.shortcut_type, self.bias_downsample = shortcut_type, bias_downsample
        self.norm, self.act_spec = layer_spec(norm), layer_spec(act)
        self.feature_dim = widths[-1] * block.expansion
        self.map_channels = widths[map_stage - 1] * block.expansion

        conv = Conv[Conv.CONV, nd]
        self.conv1 = conv(
            in_channels,
            widths[0],
            kernel_size=self.stem_kernel,
            stride=self.stem_stride,
            padding=tuple(k // 2 for k in self.stem_kernel),
            bias=False,
        )
        self.bn1 = get_norm_layer(name=self.norm, spatial_dims=nd, channels=widths[0])
        self.act = get_act_layer(name=self.act_spec)
        if self.pool_stride is None:
            self.maxpool: nn.Module = nn.Identity()
        else:
            pool_kernel = tuple(3 if s > 1 else 1 for s in self.pool_stride)
            self.maxpool = Pool[Pool.MAX, nd](
                kernel_size=pool_kernel, stride=self.pool_stride, padding=tuple(k // 2 for k in pool_kernel)
            )
        in_planes = widths[0]
        for i, (planes, n_blocks, stride) in enumerate(zip(widths, layers, strides), start=1):
            stage, in_planes = self._make_stage(block, in_planes, planes, n_blocks, stride)
            self.add_module(f"layer{i}", stage)
        self.avgpool = Pool[Pool.ADAPTIVEAVG, nd](1)

        for m in self.modules():  # MONAI's initialisation
            if isinstance(m, conv):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if weights_path is not None:
            load_local_weights(self, weights_path)

    def _make_stage(
        self,
        block: type[ResNetBlock | ResNetBottleneck],
        in_planes: int,
        planes: int,
        n_blocks: int,
        stride: tuple[int, ...],
    ) -> tuple[nn.Sequential, int]:
        out_planes = planes * block.expansion
        downsample: nn.Module | None = None
        if any(s != 1 for s in stride) or in_planes != out_planes:
            if self.shortcut_type == "A":
                downsample = ZeroPadShortcut(out_planes, stride)
            else:
                downsample = nn.Sequential(
                    Conv[Conv.CONV, self.spatial_dims](
                        in_planes, out_planes, kernel_size=1, stride=stride, bias=self.bias_downsample
                    ),
                    get_norm_layer(name=self.norm, spatial_dims=self.spatial_dims, channels=out_planes),
                )
        common = {"spatial_dims": self.spatial_dims, "act": self.act_spec, "norm": self.norm}
        blocks = [block(in_planes, planes, stride=stride, downsample=downsample, **common)]
        blocks += [block(out_planes, planes, **common) for _ in range(1, n_blocks)]
        return nn.Sequential(*blocks), out_planes

    @property
    def name(self) -> str:
        return "resnet3d" if self.spatial_dims == 3 else f"resnet{self.spatial_dims}d"

    @property
    def stages(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i}") for i in range(1, len(self.widths) + 1)]

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"{self.arch} encoder expects (N, {self.in_channels}, {'D, H, W' if self.spatial_dims == 3 else 'H, W'})"
                f" input, got {tuple(x.shape)}: check encoder.in_channels against the modalities"
            )
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        fmap = x
        for i, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if i == self.map_stage:
                fmap = x
        return EncoderOutput(torch.flatten(self.avgpool(x), 1), fmap)

    def map_shape(self, input_shape_dhw: Sequence[int]) -> tuple[int, ...]:
        shape = [int(s) for s in input_shape_dhw]
        if len(shape) != self.spatial_dims:
            raise ConfigError(f"map_shape needs {self.spatial_dims} sizes, got {input_shape_dhw}")
        shape = [conv_out_size(n, k, s, k // 2) for n, k, s in zip(shape, self.stem_kernel, self.stem_stride)]
        if self.pool_stride is not None:
            shape = [
                conv_out_size(n, 3 if s > 1 else 1, s, 1 if s > 1 else 0)
                for n, s in zip(shape, self.pool_stride)
            ]
        for stride in self.stage_strides[: self.map_stage]:
            shape = [conv_out_size(n, 3, s, 1) for n, s in zip(shape, stride)]
        if min(shape) < 1:
            raise ConfigError(
                f"input {tuple(input_shape_dhw)} is too small for the {self.arch} strides (map {shape})"
            )
        return tuple(shape)

    def config(self) -> dict[str, Any]:
        return plain(
            {
                "name": self.name,
                "arch": self.arch,
                "in_channels": self.in_channels,
                "widths": self.widths,
                "stem_kernel": self.stem_kernel,
                "stem_stride": self.stem_stride,
                "pool_stride": self.pool_stride,
                "stage_strides": self.stage_strides,
                "map_stage": self.map_stage,
                "shortcut_type": self.shortcut_type,
                "bias_downsample": self.bias_downsample,
                "norm": self.norm,
                "act": self.act_spec,
            }
        )
