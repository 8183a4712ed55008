"""The batched crop + resize, Gaussian smoothing and bias field (liverfusion/data/batched_monai.py) against the MONAI
transforms they stand in for, sample by sample for a given draw, and their draws against MONAI's ranges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth, RandBiasField

from liverfusion.data.batched_monai import (
    BatchRandBiasField,
    BatchRandGaussianSmooth,
    BatchRandScaleCropResize,
)
from liverfusion.errors import ConfigError


def volumes(n=6, shape=(7, 12, 10), seed=0):
    return torch.rand(n, 1, *shape, generator=torch.Generator().manual_seed(seed))


def test_crop_resize_equals_cropping_then_monai_style_trilinear_resize():
    x = volumes()
    t = BatchRandScaleCropResize(roi_scale=[0.6, 0.5, 0.7], max_roi_scale=[1.0, 0.9, 1.0])
    sizes, starts = t.boxes(x.shape[0], x.shape[2:], torch.Generator().manual_seed(1))
    got = t.resample(x, sizes, starts)
    for b in range(x.shape[0]):
        (d0, h0, w0), (sd, sh, sw) = starts[b].tolist(), sizes[b].tolist()
        box = x[b : b + 1, :, d0 : d0 + sd, h0 : h0 + sh, w0 : w0 + sw]
        want = F.interpolate(box, size=x.shape[2:], mode="trilinear", align_corners=False)  # MONAI's Resize
        torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)
    full = t.resample(
        x, torch.tensor([x.shape[2:]] * x.shape[0]), torch.zeros(x.shape[0], 3, dtype=torch.long)
    )
    torch.testing.assert_close(full, x, atol=1e-5, rtol=1e-5)  # the whole volume: nothing changes


def test_crop_boxes_follow_monai_rand_scale_crop_ranges():
    t = BatchRandScaleCropResize(roi_scale=[0.75, 0.6, 0.6], max_roi_scale=[1.0, 1.0, 1.0])
    shape = (16, 64, 64)
    sizes, starts = t.boxes(4000, shape, torch.Generator().manual_seed(0))
    for a, (lo, dim) in enumerate(zip([0.75, 0.6, 0.6], shape)):
        low, high = math.ceil(lo * dim), dim
        assert (
            sizes[:, a].min() == low and sizes[:, a].max() == high
        )  # randint(low, high + 1): both ends reached
        assert (starts[:, a] >= 0).all() and (starts[:, a] + sizes[:, a] <= dim).all()
        # the size is uniform over its integers (MONAI's randint): each value within 30 % of its expected count
        counts = torch.bincount(sizes[:, a] - low, minlength=high - low + 1).float()
        assert (counts - counts.mean()).abs().max() < 0.3 * counts.mean()
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(t.boxes(8, shape, g)[0], t.boxes(8, shape, g)[0])  # per-sample, fresh draws


@pytest.mark.parametrize("sigmas", [(0.5, 0.7, 1.0), (1.0, 0.55, 0.8)])
def test_gaussian_smooth_equals_monai_for_the_drawn_sigmas(sigmas):
    x = volumes(n=3)
    t = BatchRandGaussianSmooth(prob=1.0, sigma=[0.5, 1.0])
    s = torch.tensor([sigmas, sigmas[::-1], (0.6, 0.6, 0.6)])
    got = t.smooth(x, s)
    for b in range(3):
        want = GaussianSmooth(sigma=tuple(s[b].tolist()), approx="erf")(x[b])
        torch.testing.assert_close(got[b], torch.as_tensor(want), atol=1e-5, rtol=1e-4)


def test_gaussian_smooth_applies_with_its_probability_and_leaves_the_rest():
    x = volumes(n=400, shape=(4, 6, 6))
    out = BatchRandGaussianSmooth(prob=0.2, sigma=[0.5, 1.0])(x, torch.Generator().manual_seed(0))
    changed = (out - x).flatten(1).abs().amax(1) > 0
    assert 0.13 < changed.float().mean() < 0.27
    torch.testing.assert_close(out[~changed], x[~changed])


def test_bias_field_equals_monai_for_the_drawn_coefficients():
    x = volumes(n=3, shape=(6, 9, 8)) + 0.5
    t = BatchRandBiasField(prob=1.0, coeff_range=[0.0, 0.2])
    chosen, coeffs = t.draw(3, torch.Generator().manual_seed(2))
    got = x * t.field(coeffs, x.shape[2:]).exp()[:, None]
    monai = RandBiasField(coeff_range=(0.0, 0.2))
    assert len(t.terms) == (3 + 1) * (3 + 2) * (3 + 3) // 6  # MONAI's coefficient count for 3D
    for b in range(3):
        field = monai._generate_random_field(x.shape[2:], degree=3, coeff=coeffs[b].tolist())
        want = x[b].numpy() * np.exp(field)[None]
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-5, atol=1e-6)
    out = t(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, got)  # __call__ = the same draw applied


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="roi_scale <= max_roi_scale"):
        BatchRandScaleCropResize([0.9, 0.5, 0.5], [0.8, 1.0, 1.0])
    with pytest.raises(ConfigError, match="sigma"):
        BatchRandGaussianSmooth(0.2, [1.0, 0.5])
    with pytest.raises(ConfigError, match="coeff_range"):
        BatchRandBiasField(0.3, [0.2, 0.0])
