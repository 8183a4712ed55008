"""Encoder + fusion block: the classifier network (no training logic; the LightningModule wraps it).

Two topologies:
- ``shared``: one single-channel encoder encodes every present (case, modality) volume in one batch; the outputs
  are scattered back to (N, M, ...) with zeros for absent modalities. Absent volumes are never encoded, so they
  cannot leak into the output or into BatchNorm statistics.
- ``early``: the M modalities are the input channels of one encoder (absent ones zeroed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from liverfusion.errors import ConfigError
from liverfusion.models.encoder_base import Encoder
from liverfusion.models.fusion import Fusion, mask_modalities

TOPOLOGIES = ("shared", "early")


class ClassifierOutput(NamedTuple):
    """``logits`` (N, K); ``features`` (N, fusion.feature_dim), e.g. for embeddings; ``pooled`` (N, slots, F)."""

    logits: torch.Tensor
    features: torch.Tensor
    pooled: torch.Tensor


class EncodedModalities(NamedTuple):
    """Encoder outputs per slot: ``pooled`` (N, S, F), ``maps`` (N, S, C, d, h, w), ``mask`` (N, S) bool.

    S = M for the shared topology, 1 for early fusion.
    """

    pooled: torch.Tensor
    maps: torch.Tensor
    mask: torch.Tensor


class FusionClassifierNet(nn.Module):
    """``forward(x (N, M, D, H, W), mask (N, M) bool) -> ClassifierOutput``.

    ``mode`` is "shared" or "early"; None takes it from ``fusion.topology`` (a contradiction is a ConfigError).
    Modality dropout is not done here: the training module edits the mask.
    """

    def __init__(
        self,
        encoder: Encoder,
        fusion: Fusion,
        modalities: Sequence[str],
        num_classes: int,
        mode: str | None = None,
    ):
        super().__init__()
        modalities = list(modalities)
        mode = fusion.topology if mode is None else mode
        if mode not in TOPOLOGIES:
            raise ConfigError(f"classifier mode={mode!r}: choose one of {TOPOLOGIES}")
        if mode != fusion.topology:
            raise ConfigError(
                f"fusion {fusion.name!r} is built for the {fusion.topology!r} topology, not {mode!r}"
            )
        if len(set(modalities)) != len(modalities) or not modalities:
            raise ConfigError(f"modalities must be distinct names, got {modalities}")
        m = len(modalities)
        want_in = m if mode == "early" else 1
        if encoder.in_channels != want_in:
            raise ConfigError(
                f"{mode} fusion of {m} modalities needs encoder.in_channels={want_in}, got {encoder.in_channels}"
            )
        if fusion.num_classes != num_classes:
            raise ConfigError(f"fusion has {fusion.num_classes} classes but the classifier {num_classes}")
        want_c = encoder.map_channels if fusion.consumes == "map" else encoder.feature_dim
        if fusion.in_channels != want_c:
            raise ConfigError(
                f"fusion {fusion.name!r} reads the encoder {fusion.consumes} with {fusion.in_channels} channels, "
                f"but the encoder gives {want_c}"
            )
        fusion.bind_modalities(modalities)
        self.encoder, self.fusion = encoder, fusion
        self.modalities, self.num_classes, self.mode = modalities, num_classes, mode

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        m = len(self.modalities)
        if x.ndim != 5 or x.shape[1] != m:
            raise ConfigError(
                f"classifier input must be (N, {m}, D, H, W) for {self.modalities}, got {tuple(x.shape)}"
            )
        if mask is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ConfigError(f"mask must be bool {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
        return mask

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncodedModalities:
        """Run the encoder as the topology requires; the fusion block's inputs."""
        mask = self._check_input(x, mask)
        if self.mode == "early":
            out = self.encoder(mask_modalities(x, mask))
            return EncodedModalities(out.pooled[:, None], out.map[:, None], mask.any(dim=1, keepdim=True))
        n, m = mask.shape
        selected = mask
        used = self.fusion.used_modalities()
        if used is not None:
            keep = torch.zeros(m, dtype=torch.bool, device=mask.device)
            keep[used] = True
            selected = mask & keep
        enc = self.encoder
        map_shape = enc.map_shape(x.shape[2:])
        if not bool(selected.any()):
            pooled = x.new_zeros(n, m, enc.feature_dim)
            return EncodedModalities(pooled, x.new_zeros(n, m, enc.map_channels, *map_shape), mask)
        out = enc(x[selected].unsqueeze(1))
        # the buffers take the encoder's output dtypes: under bf16 autocast (the GPU preset) maps come out bf16
        pooled = out.pooled.new_zeros(n, m, enc.feature_dim).index_put((selected,), out.pooled)
        maps = out.map.new_zeros(n, m, enc.map_channels, *map_shape).index_put((selected,), out.map)
        return EncodedModalities(pooled, maps, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> ClassifierOutput:
        enc = self.encode(x, mask)
        maps = enc.maps if self.fusion.consumes == "map" else None
        out = self.fusion(maps, enc.pooled, enc.mask)
        return ClassifierOutput(out.logits, out.features, enc.pooled)


def fusion_class(factory: Callable[..., Fusion] | type[Fusion]) -> type[Fusion]:
    """The Fusion class behind a Hydra ``_partial_`` (functools.partial) or a class."""
    func = factory
    while isinstance(func, functools.partial):
        func = func.func
    if not (isinstance(func, type) and issubclass(func, Fusion)):
        raise ConfigError(f"fusion factory {factory!r} does not build a liverfusion Fusion block")
    return func


def build_fusion_classifier(
    encoder: Callable[..., Encoder] | Encoder,
    fusion: Callable[..., Fusion],
    modalities: Sequence[str],
    num_classes: int,
    **fusion_overrides: Any,
) -> FusionClassifierNet:
    """Complete the run-time arguments and assemble the network.

    ``encoder`` is an Encoder (shared topology only) or a callable taking ``in_channels`` (e.g.
    ``functools.partial(hydra.utils.instantiate, cfg.encoder)``), so early fusion gets ``in_channels = M``.
    ``fusion`` is the ``_partial_`` preset; it receives ``num_modalities``, ``in_channels`` (encoder map channels
    or feature dim, as the block consumes) and ``num_classes``.
    """
    cls = fusion_class(fusion)
    m = len(modalities)
    in_channels = m if cls.topology == "early" else 1
    if isinstance(encoder, Encoder):
        enc = encoder
    else:
        enc = encoder(in_channels=in_channels)
    channels = enc.map_channels if cls.consumes == "map" else enc.feature_dim
    block = fusion(num_modalities=m, in_channels=channels, num_classes=num_classes, **fusion_overrides)
    return FusionClassifierNet(enc, block, modalities, num_classes)
