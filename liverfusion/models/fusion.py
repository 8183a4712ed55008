"""Fusion blocks: combine the shared encoder's per-modality outputs into class logits.

Common interface (so the classifier and its training loop do not care which one runs):
``forward(maps, pooled, mask) -> FusionOutput(logits, features)`` with ``maps`` (N, M, C, d, h, w) or None,
``pooled`` (N, M, F) or None and ``mask`` (N, M) bool, True = modality present. Masked modalities are replaced by
zeros with ``torch.where`` before anything else, so no output ever depends on their content (even NaNs).

Every constructor takes ``num_modalities``, ``in_channels`` and ``num_classes`` first: these are known only at
run time, so the Hydra presets in ``conf/fusion`` are ``_partial_: true`` and the classifier completes them
(``in_channels`` is ``encoder.map_channels`` for blocks that consume maps, ``encoder.feature_dim`` otherwise; see
``liverfusion.models.classifier_net.build_fusion_classifier``).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from liverfusion.errors import ConfigError
from liverfusion.models.encoder_base import as_tuple, layer_spec, plain
from liverfusion.models.heads import ClassifierHead


class FusionOutput(NamedTuple):
    """``logits`` (N, num_classes); ``features`` (N, feature_dim): the fused vector fed to the last head."""

    logits: torch.Tensor
    features: torch.Tensor


def check_groups(channels: int, groups: int, what: str) -> None:
    """ConfigError unless ``channels`` splits evenly into ``groups`` (grouped convs and shuffles need it)."""
    if groups < 1 or channels < 1 or channels % groups:
        raise ConfigError(
            f"{what}: {channels} channels cannot be split into {groups} groups (must be divisible)"
        )


def mask_modalities(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the entries of absent modalities: x (N, M, ...), mask (N, M) bool."""
    return torch.where(
        mask.view(*mask.shape, *([1] * (x.ndim - 2))), x, torch.zeros((), dtype=x.dtype, device=x.device)
    )


class Fusion(nn.Module, abc.ABC):
    """Base class. ``consumes`` says which encoder output the block reads ("map" or "pooled"); ``topology``
    is "shared" (one single-channel encoder applied to every modality) or "early" (modalities as channels)."""

    name: ClassVar[str]
    consumes: ClassVar[str] = "pooled"
    topology: ClassVar[str] = "shared"
    feature_dim: int

    def __init__(self, num_modalities: int, in_channels: int, num_classes: int, **options: Any):
        super().__init__()
        for key, value in (
            ("num_modalities", num_modalities),
            ("in_channels", in_channels),
            ("num_classes", num_classes),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"fusion {self.name}: {key}={value!r} must be a positive int")
        self.num_modalities, self.in_channels, self.num_classes = num_modalities, in_channels, num_classes
        self._options = dict(options)

    @property
    def input_slots(self) -> int:
        """How many (N, slot, ...) entries forward() expects: M, or 1 for early fusion."""
        return self.num_modalities

    def bind_modalities(self, modalities: Sequence[str]) -> None:
        """Called by the classifier with the modality names in input order (lets ``single`` resolve a name)."""
        if len(modalities) != self.num_modalities:
            raise ConfigError(
                f"fusion {self.name} was built for {self.num_modalities} modalities but got {list(modalities)}"
            )

    def used_modalities(self) -> list[int] | None:
        """Indices of the modalities the block reads (None = all); the classifier encodes only those."""
        return None

    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``build_fusion(**fusion.config())`` rebuilds the block."""
        return plain(
            {
                "name": self.name,
                "num_modalities": self.num_modalities,
                "in_channels": self.in_channels,
                "num_classes": self.num_classes,
                **self._options,
            }
        )

    def _checked(self, x: torch.Tensor | None, mask: torch.Tensor, ndim: int) -> torch.Tensor:
        kind = "maps (N, M, C, d, h, w)" if ndim == 6 else "pooled (N, M, F)"
        if x is None or x.ndim != ndim or x.shape[1] != self.input_slots or x.shape[2] != self.in_channels:
            got = None if x is None else tuple(x.shape)
            raise ConfigError(
                f"fusion {self.name} needs {kind} with M={self.input_slots}, C/F={self.in_channels}; got {got}"
            )
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ConfigError(
                f"fusion {self.name}: mask must be bool of shape {tuple(x.shape[:2])}, got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        return mask_modalities(x, mask)

    @abc.abstractmethod
    def forward(
        self, maps: torch.Tensor | None, pooled: torch.Tensor | None, mask: torch.Tensor
    ) -> FusionOutput:
        """Fuse the per-modality encoder outputs."""


class CGCBlock(nn.Module):
    """One cross-modality group-convolution unit (REFERENCE section 1).

    3D group conv (groups = M: each modality's channels are convolved on their own) -> norm -> act ->
    channel shuffle (M groups: every group now holds channels of all modalities) -> in-plane (1, k, k) group conv
    (mixes the modalities at a fraction of a dense conv's cost) -> norm -> act. ``shuffle=False`` keeps the
    modalities apart all the way (the ablation).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        kernel_3d: int | Sequence[int] = 3,
        kernel_2d: int | Sequence[int] = 3,
        shuffle: bool = True,
        norm: str | Sequence[Any] = "batch",
        act: str | Sequence[Any] = "relu",
    ):
        super().__init__()
        check_groups(in_channels, groups, "CGC input (num_modalities * encoder map channels)")
        check_groups(out_channels, groups, "CGC width (out channels)")
        k3 = as_tuple(kernel_3d, 3, "fusion.kernel_3d")
        k2 = as_tuple(kernel_2d, 2, "fusion.kernel_2d")
        if any(k % 2 == 0 for k in (*k3, *k2)):
            raise ConfigError(
                f"fusion kernels must be odd (same padding), got kernel_3d={k3}, kernel_2d={k2}"
            )
        norm, act = layer_spec(norm), layer_spec(act)
        self.groups = groups
        self.conv3d = nn.Conv3d(
            in_channels, out_channels, k3, padding=tuple(k // 2 for k in k3), groups=groups, bias=False
        )
        self.norm1 = get_norm_layer(name=norm, spatial_dims=3, channels=out_channels)
        self.act1 = get_act_layer(name=act)
        self.shuffle = nn.ChannelShuffle(groups) if shuffle and groups > 1 else nn.Identity()
        self.conv2d = nn.Conv3d(
            out_channels,
            out_channels,
            (1, *k2),
            padding=(0, *(k // 2 for k in k2)),
            groups=groups,
            bias=False,
        )
        self.norm2 = get_norm_layer(name=norm, spatial_dims=3, channels=out_channels)
        self.act2 = get_act_layer(name=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shuffle(self.act1(self.norm1(self.conv3d(x))))
        return self.act2(self.norm2(self.conv2d(x)))


class CGCFusion(Fusion):
    """Cross-modality group convolution on the stacked per-modality maps, then global pooling and a head.

    Args:
        num_blocks: CGC units in sequence.
        width: output channels per modality group of every unit (a unit has ``num_modalities * width``).
        kernel_3d / kernel_2d: kernel of the 3D group conv (int or d, h, w) and of the in-plane conv (int or h, w).
        shuffle: channel shuffle between the two convs (False: modalities are never mixed before pooling).
        norm / act: MONAI layer specs.
        dropout / hidden_dims: of the classifier head.
    """

    name = "cgc"
    consumes = "map"

    def __init__(
        self,
        num_modalities: int,
        in_channels: int,
        num_classes: int,
        num_blocks: int = 1,
        width: int = 32,
        kernel_3d: int | Sequence[int] = 3,
        kernel_2d: int | Sequence[int] = 3,
        shuffle: bool = True,
        norm: str | Sequence[Any] = "batch",
        act: str | Sequence[Any] = "relu",
        dropout: float = 0.0,
        hidden_dims: Sequence[int] = (),
    ):
        super().__init__(
            num_modalities,
            in_channels,
            num_classes,
            num_blocks=num_blocks,
            width=width,
            kernel_3d=kernel_3d,
            kernel_2d=kernel_2d,
            shuffle=shuffle,
            norm=norm,
            act=act,
            dropout=dropout,
            hidden_dims=hidden_dims,
        )
        if num_blocks < 1 or width < 1:
            raise ConfigError(f"fusion cgc: num_blocks={num_blocks} and width={width} must be >= 1")
        m = num_modalities
        channels = [m * in_channels] + [m * width] * num_blocks
        self.blocks = nn.Sequential(
            *(
                CGCBlock(c_in, c_out, m, kernel_3d, kernel_2d, shuffle, norm, act)
                for c_in, c_out in zip(channels[:-1], channels[1:])
            )
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.feature_dim = m * width
        self.head = ClassifierHead(self.feature_dim, num_classes, hidden_dims, dropout)

    def fuse_maps(self, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, M, C, d, h, w) -> fused map (N, M * width, d, h, w), modalities stacked phase-major."""
        x = self._checked(maps, mask, ndim=6)
        return self.blocks(x.flatten(1, 2))

    def forward(
        self, maps: torch.Tensor | None, pooled: torch.Tensor | None, mask: torch.Tensor
    ) -> FusionOutput:
        features = torch.flatten(self.pool(self.fuse_maps(maps, mask)), 1)
        return FusionOutput(self.head(features), features)


class SingleModalityFusion(Fusion):
    """Baseline ``single``: classify from one modality (an index, or a name resolved by ``bind_modalities``).

    A case that lacks that modality gets a zero feature vector (the head's bias decides).
    """

    name = "single"

    def __init__(
        self,
        num_modalities: int,
        in_channels: int,
        num_classes: int,
        modality: int | str = 0,
        hidden_dims: Sequence[int] = (),
        dropout: float = 0.0,
    ):
        super().__init__(
            num_modalities,
            in_channels,
            num_classes,
            modality=modality,
            hidden_dims=hidden_dims,
            dropout=dropout,
        )
        self.modality = modality
        self.index: int | None = None
        if isinstance(modality, int):
            if not 0 <= modality < num_modalities:
                raise ConfigError(
                    f"fusion single: modality index {modality} is outside 0..{num_modalities - 1}"
                )
            self.index = modality
        self.feature_dim = in_channels
        self.head = ClassifierHead(in_channels, num_classes, hidden_dims, dropout)

    def bind_modalities(self, modalities: Sequence[str]) -> None:
        super().bind_modalities(modalities)
        if isinstance(self.modality, str):
            if self.modality not in modalities:
                raise ConfigError(
                    f"fusion single: modality {self.modality!r} is not one of {list(modalities)}"
                )
            self.index = list(modalities).index(self.modality)

    def used_modalities(self) -> list[int] | None:
        return None if self.index is None else [self.index]

    def forward(
        self, maps: torch.Tensor | None, pooled: torch.Tensor | None, mask: torch.Tensor
    ) -> FusionOutput:
        if self.index is None:
            raise ConfigError(
                f"fusion single: modality {self.modality!r} was never bound to the modality names"
            )
        features = self._checked(pooled, mask, ndim=3)[:, self.index]
        return FusionOutput(self.head(features), features)


class PooledHeadFusion(Fusion):
    """A fusion of pooled vectors whose only parameters are one classifier head, ``head_width`` features wide
    (``late_concat``, ``late_mean``, ``early``)."""

    def __init__(
        self,
        num_modalities: int,
        in_channels: int,
        num_classes: int,
        hidden_dims: Sequence[int] = (),
        dropout: float = 0.0,
    ):
        super().__init__(num_modalities, in_channels, num_classes, hidden_dims=hidden_dims, dropout=dropout)
        self.feature_dim = self.head_width(num_modalities, in_channels)
        self.head = ClassifierHead(self.feature_dim, num_classes, hidden_dims, dropout)

    @staticmethod
    def head_width(num_modalities: int, in_channels: int) -> int:
        """Features the head reads: one modality's pooled vector (a concatenation overrides it)."""
        return in_channels


class LateConcatFusion(PooledHeadFusion):
    """Baseline ``late_concat``: pooled features of all modalities concatenated (absent ones zero) + head."""

    name = "late_concat"

    @staticmethod
    def head_width(num_modalities: int, in_channels: int) -> int:
        return num_modalities * in_channels

    def forward(
        self, maps: torch.Tensor | None, pooled: torch.Tensor | None, mask: torch.Tensor
    ) -> FusionOutput:
        features = self._checked(pooled, mask, ndim=3).flatten(1)
        return FusionOutput(self.head(features), features)


class LateMeanFusion(PooledHeadFusion):
    """Baseline ``late_mean``: one head shared by all modalities; logits averaged over the present ones.

    ``features`` is the mean pooled vector over present modalities. A case with no modality gets zero logits.
    """

    name = "late_mean"

    def forward(
        self, maps: torch.Tensor | None, pooled: torch.Tensor | None, mask: torch.Tensor
    ) -> FusionOutput:
        x = self._checked(pooled, mask, ndim=3)
        weights = mask.to(x.dtype).unsqueeze(-1)  # (N, M, 1)
        count = weights.sum(dim=1).clamp_min(1.0)
        logits = (self.head(x) * weights).sum(dim=1) / count
        features = (x * weights).sum(dim=1) / count
        return FusionOutput(logits, features)


class EarlyFusion(PooledHeadFusion):
    """Baseline ``early`` (the LLD-MMRI official recipe): the modalities are the input channels of one encoder
    (``in_channels = num_modalities``), so fusion is the identity and only a head remains.

    Its inputs have a single slot: pooled (N, 1, F), mask (N, 1); the classifier zeroes absent modalities' input
    channels before the encoder.
    """

    name = "early"
    topology = "early"

    @property
    def input_slots(self) -> int:
        return 1

    def forward(
        self, maps: torch.Tensor | None, pooled: torch.Tensor | None, mask: torch.Tensor
    ) -> FusionOutput:
        features = self._checked(pooled, mask, ndim=3)[:, 0]
        return FusionOutput(self.head(features), features)


FUSIONS: dict[str, type[Fusion]] = {
    cls.name: cls for cls in (CGCFusion, SingleModalityFusion, LateConcatFusion, LateMeanFusion, EarlyFusion)
}


def build_fusion(name: str, **kwargs: Any) -> Fusion:
    """Rebuild a fusion block by name, e.g. from ``fusion.config()`` stored in a checkpoint."""
    if name not in FUSIONS:
        raise ConfigError(f"fusion name {name!r} is unknown; choose one of {sorted(FUSIONS)}")
    return FUSIONS[name](**kwargs)
