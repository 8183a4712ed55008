"""MONAI's per-view crop + resize, Gaussian smoothing and bias field, batched for the device.

With ``augment=mda_batched`` these three stay per view in the loader workers, and at the GPU preset they are what
the workers spend their time on (``benchmarks/results/loader_throughput.md``: the trilinear resize dominates). With
``augment=mda_device`` they run here, on the whole batch after transfer, so the workers only gather cached volumes.
Each one draws its parameters per sample from the same distribution as its MONAI counterpart and, for a given draw,
computes what the MONAI transform computes (the tests compare them sample by sample):

- :class:`BatchRandScaleCropResize` = ``RandScaleCrop(random_size=True, random_center=True)`` then
  ``Resize(mode="trilinear")`` back to the input shape;
- :class:`BatchRandGaussianSmooth` = ``RandGaussianSmooth`` (erf kernel, 4 sigma tail, zero padding);
- :class:`BatchRandBiasField` = ``RandBiasField`` (Legendre polynomials of degree ``degree``, ``x * exp(field)``).

Tensors are (N, C, D, H, W); one draw per sample, shared by the sample's channels (a ``stack`` view's phases get
per-phase draws for the intensity-like smoothing and bias field from ``MDADataModule``, as for the other batched
intensity transforms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from liverfusion.data.transforms import _check_batch, _chosen, _uniform
from liverfusion.errors import ConfigError


def _randint(
    n: int, low: torch.Tensor, high: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """(n,) integers uniform in [low, high] (inclusive; both (n,) or scalars)."""
    span = (high - low + 1).to(torch.float64)
    return low + torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * span).long()


class BatchRandScaleCropResize:
    """A random box per sample, each side an integer between ``ceil(roi_scale * size)`` and
    ``ceil(max_roi_scale * size)`` at a random position, resampled trilinearly back to the full size (what MONAI's
    ``Resize`` does with ``align_corners=False``: edge samples clamp to the box's first / last voxel)."""

    def __init__(self, roi_scale: Sequence[float], max_roi_scale: Sequence[float]):
        self.roi_scale = [float(s) for s in roi_scale]
        self.max_roi_scale = [float(s) for s in max_roi_scale]
        if len(self.roi_scale) != 3 or len(self.max_roi_scale) != 3:
            raise ConfigError("BatchRandScaleCropResize needs roi_scale and max_roi_scale for D, H, W")
        if any(not 0 < lo <= hi <= 1 for lo, hi in zip(self.roi_scale, self.max_roi_scale)):
            raise ConfigError(
                f"crop scales need 0 < roi_scale <= max_roi_scale <= 1, got {self.roi_scale} / {self.max_roi_scale}"
            )

    def boxes(
        self, n: int, shape: Sequence[int], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3) box sizes and (n, 3) start indices (D, H, W)."""
        sizes, starts = [], []
        for lo, hi, dim in zip(self.roi_scale, self.max_roi_scale, shape):
            size = _randint(
                n, torch.tensor(math.ceil(lo * dim)), torch.tensor(math.ceil(hi * dim)), generator
            )
            size = size.clamp(max=dim)
            sizes.append(size)
            starts.append(_randint(n, torch.zeros(n, dtype=torch.long), dim - size, generator))
        return torch.stack(sizes, 1), torch.stack(starts, 1)

    @staticmethod
    def resample(x: torch.Tensor, sizes: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Each sample's box resized to the full shape, in one ``grid_sample`` call."""
        n, _, *shape = x.shape
        axes = []
        for a, dim in enumerate(shape):
            size = sizes[:, a : a + 1].to(torch.float64)
            start = starts[:, a : a + 1].to(torch.float64)
            out = torch.arange(dim, dtype=torch.float64)[None]
            src = ((out + 0.5) * size / dim - 0.5).clamp(
                min=0.0
            )  # interpolate's source index (align_corners=False)
            src = torch.minimum(src, size - 1) + start
            axes.append(
                2 * src / max(dim - 1, 1) - 1
            )  # grid_sample, align_corners=True: -1 / +1 = first / last voxel
        gd, gh, gw = (g.to(device=x.device, dtype=x.dtype) for g in axes)
        d, h, w = shape
        grid = torch.stack(
            (
                gw[:, None, None, :].expand(n, d, h, w),
                gh[:, None, :, None].expand(n, d, h, w),
                gd[:, :, None, None].expand(n, d, h, w),
            ),
            dim=-1,
        )
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        sizes, starts = self.boxes(x.shape[0], x.shape[2:], generator)
        return self.resample(x, sizes, starts)


def gaussian_kernels(sigma: torch.Tensor, truncated: float = 4.0) -> torch.Tensor:
    """(n, 2T + 1) erf-approximated Gaussian kernels, as ``monai.networks.layers.convutils.gaussian_1d`` (its
    ``approx="erf"``), zero beyond each sigma's own tail; T is the largest sigma's tail."""
    tails = [int(max(float(s) * truncated, 0.5) + 0.5) for s in sigma.tolist()]
    tail = max(tails)
    x = torch.arange(-tail, tail + 1, dtype=torch.float32)[None]
    t = 0.70710678 / sigma.abs().float()[:, None]
    k = (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)
    keep = x.abs() <= torch.tensor(tails, dtype=torch.float32)[:, None]
    return k * keep


class BatchRandGaussianSmooth:
    """Gaussian smoothing with probability ``prob``, sigma per axis drawn from ``sigma`` (the same range on every
    axis, as the recipe states it), one draw per sample; separable zero-padded convolutions, grouped per sample."""

    def __init__(self, prob: float, sigma: Sequence[float], truncated: float = 4.0):
        self.prob = float(prob)
        self.sigma = [float(s) for s in sigma]
        if len(self.sigma) != 2 or not 0 < self.sigma[0] <= self.sigma[1]:
            raise ConfigError(
                f"BatchRandGaussianSmooth sigma needs [low, high] with 0 < low <= high, got {sigma}"
            )
        self.truncated = float(truncated)

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) chosen mask and (n, 3) sigmas (D, H, W)."""
        chosen = _chosen(n, self.prob, generator)
        sigmas = torch.stack([_uniform(n, *self.sigma, generator) for _ in range(3)], 1)
        return chosen, sigmas

    def smooth(self, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        n, c, *shape = x.shape
        y = x.reshape(1, n * c, *shape)
        for axis in range(3):
            k = gaussian_kernels(sigmas[:, axis], self.truncated).repeat_interleave(c, 0)
            size = [1, 1, 1]
            size[axis] = k.shape[1]
            pad = [0, 0, 0]
            pad[axis] = k.shape[1] // 2
            weight = k.to(device=x.device, dtype=x.dtype).view(n * c, 1, *size)
            y = F.conv3d(y, weight, padding=tuple(pad), groups=n * c)
        return y.view_as(x)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        chosen, sigmas = self.draw(x.shape[0], generator)
        if not bool(chosen.any()):
            return x
        idx = chosen.nonzero().flatten()
        sub = x.index_select(0, idx.to(x.device))
        return x.index_copy(0, idx.to(x.device), self.smooth(sub, sigmas[idx]))


def legendre_basis(dim: int, degree: int) -> torch.Tensor:
    """(degree + 1, dim) Legendre polynomials P_0..P_degree on ``linspace(-1, 1, dim)`` (float32, as MONAI)."""
    coords = np.linspace(-1.0, 1.0, dim, dtype=np.float32)
    eye = np.eye(degree + 1)
    basis = np.stack([np.polynomial.legendre.legval(coords, eye[i]) for i in range(degree + 1)])
    return torch.from_numpy(basis.astype(np.float32))


class BatchRandBiasField:
    """``x * exp(field)`` with probability ``prob``; the field is a sum of products of Legendre polynomials of total
    degree <= ``degree`` with coefficients drawn from ``coeff_range`` (MONAI's ``RandBiasField``), one per sample."""

    def __init__(self, prob: float, coeff_range: Sequence[float], degree: int = 3):
        self.prob = float(prob)
        self.coeff_range = [float(c) for c in coeff_range]
        if len(self.coeff_range) != 2 or self.coeff_range[0] > self.coeff_range[1]:
            raise ConfigError(f"BatchRandBiasField coeff_range needs [low, high], got {coeff_range}")
        if int(degree) < 1:
            raise ConfigError(f"BatchRandBiasField degree must be >= 1, got {degree}")
        self.degree = int(degree)
        # MONAI's order of the coefficients: i (D), then j (H), then k (W), total degree <= degree
        self.terms = [
            (i, j, k)
            for i in range(self.degree + 1)
            for j in range(self.degree + 1 - i)
            for k in range(self.degree + 1 - i - j)
        ]

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) chosen mask and (n, terms) coefficients."""
        chosen = _chosen(n, self.prob, generator)
        lo, hi = self.coeff_range
        return chosen, lo + (hi - lo) * torch.rand(n, len(self.terms), generator=generator)

    def field(
        self, coeffs: torch.Tensor, shape: Sequence[int], device: torch.device | None = None
    ) -> torch.Tensor:
        """(n, D, H, W) log bias field of each sample's coefficients (float32, on ``device``)."""
        bd, bh, bw = (legendre_basis(int(s), self.degree).to(device) for s in shape)
        i, j, k = (torch.tensor(t, device=device) for t in zip(*self.terms))
        return torch.einsum("bt,td,th,tw->bdhw", coeffs.float().to(device), bd[i], bh[j], bw[k])

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        chosen, coeffs = self.draw(x.shape[0], generator)
        if not bool(chosen.any()):
            return x
        idx = chosen.nonzero().flatten()
        gain = self.field(coeffs[idx], x.shape[2:], x.device).exp().to(x.dtype)
        dev = idx.to(x.device)
        return x.index_copy(0, dev, x.index_select(0, dev) * gain[:, None])
