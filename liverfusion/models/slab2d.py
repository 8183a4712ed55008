"""2D-slab encoder: one shared 2D ResNet applied to every slice, keeping the slice axis.

Thick-slice MRI (a few mm between slices, sub-mm in-plane) often suits 2D kernels better than isotropic 3D ones,
and a 2D ResNet is 2-4x cheaper on CPU. The slices of a volume become a batch of 2D images; the per-slice maps are
stacked back along D, so CGC still receives an (N, C, D, h, w) map with the full slice extent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from liverfusion.errors import ConfigError
from liverfusion.models.encoder_base import Encoder, EncoderOutput, load_local_weights
from liverfusion.models.resnet3d import ResNetEncoder


class Slab2dEncoder(Encoder):
    """Shared 2D ResNet per slice (``name: slab2d``). Strides and kernels are given for (H, W) only.

    ``weights_path`` is a state dict of this encoder (keys ``net.*``), as exported after pre-training.
    Other arguments are those of :class:`~liverfusion.models.resnet3d.ResNetEncoder`.
    """

    name = "slab2d"

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
        pretrained: bool = False,
        weights_path: str | Path | None = None,
    ):
        super().__init__()
        if pretrained and weights_path is None:
            raise ConfigError(
                "encoder.pretrained=true needs encoder.weights_path (a local state dict file): weights are never "
                "downloaded; set weights_path or pretrained=false"
            )
        self.net = ResNetEncoder(
            arch=arch,
            in_channels=in_channels,
            widths=widths,
            stem_kernel=stem_kernel,
            stem_stride=stem_stride,
            pool_stride=pool_stride,
            stage_strides=stage_strides,
            map_stage=map_stage,
            shortcut_type=shortcut_type,
            bias_downsample=bias_downsample,
            norm=norm,
            act=act,
            spatial_dims=2,
        )
        self.in_channels = in_channels
        self.feature_dim = self.net.feature_dim
        self.map_channels = self.net.map_channels
        if weights_path is not None:
            load_local_weights(self, weights_path)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"slab2d encoder expects (N, {self.in_channels}, D, H, W) input, got {tuple(x.shape)}: "
                "check encoder.in_channels against the modalities"
            )
        n, c, d, h, w = x.shape
        slices = x.permute(0, 2, 1, 3, 4).reshape(n * d, c, h, w)
        out = self.net(slices)
        fmap = out.map.reshape(n, d, *out.map.shape[1:]).permute(0, 2, 1, 3, 4)
        # mean over slices of per-slice global averages == global average over (D, h, w): equal-size slices
        pooled = out.pooled.reshape(n, d, -1).mean(dim=1)
        return EncoderOutput(pooled, fmap)

    def map_shape(self, input_shape_dhw: Sequence[int]) -> tuple[int, int, int]:
        if len(input_shape_dhw) != 3:
            raise ConfigError(f"map_shape needs (D, H, W), got {input_shape_dhw}")
        d, h, w = (int(s) for s in input_shape_dhw)
        return (d, *self.net.map_shape((h, w)))

    def config(self) -> dict[str, Any]:
        return {**self.net.config(), "name": self.name}
