"""What every encoder promises: a pooled vector for SimSiam/probes and a spatial map for the CGC fusion.

Encoders are modality-agnostic: the same weights encode every MR sequence (one channel per volume), except for
the ``early`` fusion baseline, which stacks the modalities as input channels of one encoder.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from liverfusion.errors import CheckpointError, ConfigError
from liverfusion.utils.plain import to_plain as plain  # the one plain conversion, under the name models use

# Keys of classification / segmentation heads found in MONAI or MedicalNet weight files: they are not part of an
# encoder, so they are dropped (and reported) rather than counted as unexpected.
HEAD_KEY_PREFIXES: tuple[str, ...] = ("fc.", "conv_seg.")


class EncoderOutput(NamedTuple):
    """``pooled``: (N, feature_dim) global average of the last stage; ``map``: (N, map_channels, d, h, w)."""

    pooled: torch.Tensor
    map: torch.Tensor


class Encoder(nn.Module, abc.ABC):
    """Base class: subclasses set ``in_channels``, ``feature_dim``, ``map_channels`` and implement the methods."""

    in_channels: int
    feature_dim: int
    map_channels: int

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode ``x`` of shape (N, in_channels, D, H, W)."""

    @abc.abstractmethod
    def map_shape(self, input_shape_dhw: Sequence[int]) -> tuple[int, int, int]:
        """Spatial extent (d, h, w) of the map for an input of size D x H x W, without running the network."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Architecture arguments: ``build_encoder(**encoder.config())`` rebuilds the same network.

        Stored in checkpoints so a loader can refuse weights of another architecture.
        """


def layer_spec(value: str | Sequence[Any]) -> str | tuple:
    """YAML gives ``[name, {args}]`` lists; MONAI's layer factories want a name or a ``(name, {args})`` tuple."""
    return value if isinstance(value, str) else tuple(plain(value))


def as_tuple(value: int | Sequence[int], n: int, key: str) -> tuple[int, ...]:
    """An int or a length-``n`` sequence of positive ints as a tuple, else a ConfigError naming ``key``."""
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ConfigError(f"{key}={value!r}: expected a positive int or {n} positive ints (one per axis)")
    return values


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling along one axis (PyTorch arithmetic, dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def load_local_weights(module: nn.Module, weights_path: str | Path) -> None:
    """Load a local state dict into ``module`` strictly; never downloads.

    Accepts a plain state dict or a dict with a ``state_dict`` entry (MedicalNet, encoder.pt); strips a
    DataParallel ``module.`` prefix and drops head keys (``fc.``, ``conv_seg.``). Any missing, unexpected or
    mis-shaped key raises a CheckpointError that lists them, because silently partial weights ruin a fine-tune.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights_path {path}: no such file (weights are never downloaded)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"weights_path {path}: cannot be read with torch.load(weights_only=True): {exc}"
        ) from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"weights_path {path}: expected a state dict of tensors, found {found}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEY_PREFIXES)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label} {len(keys)}: {', '.join(keys[:8])}{more}")
        raise CheckpointError(
            f"weights_path {path} does not match the encoder architecture; " + "; ".join(parts)
        )
    module.load_state_dict(state, strict=True)
