"""Augmentation pipelines declared in YAML: per-view lists of MONAI (or torchio) transforms, plus optional
batched tensor transforms applied to a whole batch of views after it reaches the device.

Per-view items are Hydra ``_target_`` configs that :func:`build_transform` composes; the MDA recipe's values
live in ``conf/augment/_mda_recipe.yaml`` only (``liverfusion.data.augment_recipe`` builds both pipelines), so the
batched transforms take every parameter explicitly. Random transforms draw from
their own generators, so :func:`reseed` re-seeds them from torch's generator per call: views are then
reproducible under ``seed_everything(workers=True)`` and differ between workers and ranks.

The batched transforms (:class:`BatchRandFlip`, :class:`BatchRandAffine`, :class:`BatchRandIntensity`,
:class:`BatchRandGaussianNoise`) take (N, C, D, H, W) tensors and draw their parameters per sample, so each view
of each case still gets its own draw. They exist because per-sample MONAI calls cost milliseconds of Python and
MetaTensor overhead each (measured in ``benchmarks/throughput.py``) while the same work on a batch is one
vectorised kernel, on the GPU when there is one: they keep the loader ahead of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.transforms import Compose, Randomizable

from liverfusion.errors import ConfigError


def build_transform(items: Sequence[Any] | Callable | None) -> Callable | None:
    """A MONAI Compose from instantiated transforms (Hydra already instantiated nested ``_target_`` items)."""
    if items is None:
        return None
    if callable(items) and not isinstance(items, list | tuple):
        return items
    items = [t for t in items if t is not None]
    if not items:
        return None
    for t in items:
        if not callable(t):
            raise ConfigError(f"augmentation item {t!r} is not a transform (did the YAML miss a _target_?)")
    return Compose(items)


def reseed(transform: Callable | None) -> None:
    """Seed a MONAI Randomizable pipeline from torch's generator (seeded per worker by Lightning)."""
    if isinstance(transform, Randomizable):
        transform.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,)).item()))


# ---- batched tensor augmentation: (N, C, D, H, W), parameters drawn per sample ----


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _chosen(n: int, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < prob


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) CPU values as an (N, 1, 1, 1, 1) tensor on x's device and dtype."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"batched augmentation expects (N, C, D, H, W), got shape {tuple(x.shape)}")


class BatchRandFlip:
    """Flip each sample along each of ``spatial_axes`` (0 = D, 1 = H, 2 = W) with probability ``prob``."""

    def __init__(self, prob: float, spatial_axes: Sequence[int]):
        self.prob = float(prob)
        self.spatial_axes = [int(a) for a in spatial_axes]
        if any(a not in (0, 1, 2) for a in self.spatial_axes):
            raise ConfigError(
                f"BatchRandFlip spatial_axes must be in 0..2 (D, H, W), got {self.spatial_axes}"
            )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        for axis in self.spatial_axes:
            flip = _chosen(x.shape[0], self.prob, generator).to(x.device)
            if flip.any():
                x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(axis + 2), x)
        return x


class BatchRandAffine:
    """In-plane rotation (about the slice axis D) and per-axis scaling, one draw per sample, with probability
    ``prob``; trilinear resampling of the whole batch in one ``grid_sample`` call.

    Args:
        rotate: maximal absolute in-plane angle in radians (0.26 ~ 15 degrees).
        scale: per axis (D, H, W), the zoom factor is drawn from [1 - s, 1 + s].
        padding_mode: ``zeros``, ``border`` or ``reflection`` (``grid_sample``).
    """

    def __init__(
        self,
        prob: float,
        rotate: float,
        scale: Sequence[float],
        padding_mode: str,
    ):
        self.prob = float(prob)
        self.rotate = float(rotate)
        self.scale = [float(s) for s in scale]
        if len(self.scale) != 3 or any(not 0 <= s < 1 for s in self.scale):
            raise ConfigError(f"BatchRandAffine scale needs 3 values in [0, 1) (D, H, W), got {self.scale}")
        self.padding_mode = padding_mode

    def matrices(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) chosen mask and (n, 3, 4) ``affine_grid`` matrices (x, y, z = W, H, D); identity if not chosen."""
        chosen = _chosen(n, self.prob, generator)
        angle = _uniform(n, -self.rotate, self.rotate, generator) * chosen
        zoom = [1 + _uniform(n, -s, s, generator) * chosen for s in self.scale]  # D, H, W
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 3, 4)
        # output coordinates -> input coordinates: a zoom factor z > 1 samples a smaller region (magnifies)
        theta[:, 0, 0], theta[:, 0, 1] = cos / zoom[2], -sin / zoom[2]
        theta[:, 1, 0], theta[:, 1, 1] = sin / zoom[1], cos / zoom[1]
        theta[:, 2, 2] = 1 / zoom[0]
        return chosen, theta

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        chosen, theta = self.matrices(x.shape[0], generator)
        if not bool(chosen.any()):
            return x
        idx = chosen.nonzero().flatten().to(x.device)  # resample only the chosen samples
        sub = x.index_select(0, idx)
        grid = F.affine_grid(
            theta[chosen].to(device=x.device, dtype=x.dtype), list(sub.shape), align_corners=False
        )
        moved = F.grid_sample(sub, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)
        return x.index_copy(0, idx, moved)


class BatchRandIntensity:
    """Per-sample contrast (gamma on the sample's own [min, max] range, as MONAI's RandAdjustContrast),
    intensity scaling ``x * (1 + f)`` and shift ``x + o``, each applied with its own probability."""

    def __init__(
        self,
        gamma: Sequence[float],
        gamma_prob: float,
        scale: float,
        scale_prob: float,
        shift: float,
        shift_prob: float,
    ):
        self.gamma = (float(gamma[0]), float(gamma[1]))
        if not 0 < self.gamma[0] <= self.gamma[1]:
            raise ConfigError(f"BatchRandIntensity gamma must be 0 < lo <= hi, got {self.gamma}")
        self.gamma_prob, self.scale, self.scale_prob = float(gamma_prob), float(scale), float(scale_prob)
        self.shift, self.shift_prob = float(shift), float(shift_prob)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        n = x.shape[0]
        use_gamma = _chosen(n, self.gamma_prob, generator)
        log_gamma = _uniform(n, math.log(self.gamma[0]), math.log(self.gamma[1]), generator) * use_gamma
        factor = 1 + _uniform(n, -self.scale, self.scale, generator) * _chosen(n, self.scale_prob, generator)
        offset = _uniform(n, -self.shift, self.shift, generator) * _chosen(n, self.shift_prob, generator)
        if use_gamma.any():
            flat = x.flatten(1)
            lo = flat.amin(1).view(-1, 1, 1, 1, 1)
            span = (flat.amax(1).view(-1, 1, 1, 1, 1) - lo).clamp_min(1e-7)
            x = ((x - lo) / span).clamp_min(0).pow(_per_sample(log_gamma.exp(), x)) * span + lo
        return x * _per_sample(factor, x) + _per_sample(offset, x)


class BatchRandGaussianNoise:
    """Add N(0, s^2) noise with s drawn from [0, ``std``] per sample, with probability ``prob``."""

    def __init__(self, prob: float, std: float):
        self.prob, self.std = float(prob), float(std)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        sigma = _uniform(x.shape[0], 0.0, self.std, generator) * _chosen(x.shape[0], self.prob, generator)
        if not bool((sigma > 0).any()):
            return x
        if x.device.type == "cpu":
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        else:  # the device's own generator (seeded by seed_everything): no host-to-device copy of a volume
            noise = torch.randn_like(x)
        return x + noise * _per_sample(sigma, x)


class BatchCompose:
    """Apply batched transforms in order, all drawing from one generator."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator=generator)
        return x


def build_batch_transform(items: Sequence[Any] | None) -> BatchCompose | None:
    """The batched counterpart of :func:`build_transform` (items already instantiated by Hydra)."""
    if items is None:
        return None
    items = [t for t in items if t is not None]
    for t in items:
        if not callable(t):
            raise ConfigError(f"batch_augment item {t!r} is not a transform (did the YAML miss a _target_?)")
    return BatchCompose(items) if items else None
