"""Deterministic per-volume preprocessing (reorient, resample/resize, crop/pad, per-modality normalisation).

Every volume is first brought to ``orientation`` (nibabel, see ``liverfusion.data.io.reorient``), so the modalities
of a case share one axis convention whatever their files store. Spacing-aware by default: resample to
``target_spacing`` (mm, D x H x W), then centre crop / pad to ``shape``. ``mode="resize"`` resizes straight to
``shape`` for data whose spacing means nothing (LLD-MMRI crops, LGG's nominal spacing). The result is what the
cache stores; random augmentation happens later, per view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    NormalizeIntensity,
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensityRangePercentiles,
    Spacing,
)

from liverfusion.data.io import NO_REORIENTATION, Volume, check_orientation, dhw_affine, reorient
from liverfusion.errors import ConfigError

MODES = ("spacing", "resize")
NORMALISATIONS = ("zscore", "minmax", "percentile", "median", "none")


@dataclass
class PreprocessConfig:
    shape: Sequence[int] = (16, 64, 64)
    mode: str = "resize"
    target_spacing: Sequence[float] | None = None
    normalize: str = "percentile"
    percentiles: Sequence[float] = (0.5, 99.5)
    nonzero: bool = False
    interpolation: str = "trilinear"
    require_same_grid: bool = False
    cache_dtype: str = "float16"
    orientation: str | None = NO_REORIENTATION
    """axis convention every volume is brought to (``RAS``, ...) or ``none``. The default here is ``none`` on
    purpose: it is how a preprocessing dict written before the key existed (a classifier checkpoint's
    ``meta["preprocess"]``, an exported encoder) must be read, since those models saw the files as stored. New runs
    get their value from ``conf/data/_base.yaml``."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ConfigError(f"preprocess.shape must be 3 positive ints (D, H, W), got {self.shape}")
        if self.mode not in MODES:
            raise ConfigError(f"preprocess.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "spacing":
            if self.target_spacing is None or len(self.target_spacing) != 3:
                raise ConfigError("preprocess.mode=spacing needs target_spacing: [sD, sH, sW] in mm")
            self.target_spacing = tuple(float(s) for s in self.target_spacing)
        if self.normalize not in NORMALISATIONS:
            raise ConfigError(f"preprocess.normalize must be one of {NORMALISATIONS}, got {self.normalize!r}")
        if self.cache_dtype not in ("float16", "float32"):
            raise ConfigError("preprocess.cache_dtype must be float16 or float32")
        self.percentiles = tuple(float(p) for p in self.percentiles)
        self.orientation = check_orientation(self.orientation)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, key: str = "data.preprocess") -> PreprocessConfig:
        """Build from a config or checkpoint dict, refusing unknown keys (a ConfigError naming them, not the
        dataclass's TypeError); missing keys take the defaults above (``orientation``: ``none``, see there)."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{key}: unknown key(s) {', '.join(unknown)}",
                fix=f"known keys: {', '.join(sorted(known))}",
            )
        return cls(**values)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


class MedianRatio:
    """Divide a volume by its median (over voxels > 0 with ``nonzero``): intensities become ratios to the dominant
    tissue, e.g. the liver in a lesion-centred crop, the contrast a radiologist reads. Unlike a percentile window it
    neither depends on how bright the lesion or the tissue outside the liver is nor clips the brightest lesion."""

    def __init__(self, nonzero: bool = False):
        self.nonzero = nonzero

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values = x[x > 0] if self.nonzero else x.flatten()
        median = float(values.median()) if values.numel() else 0.0
        if not np.isfinite(median) or median <= 0:
            raise ValueError(
                f"median normalisation needs a positive median intensity, got {median:g} (all-dark or signed "
                "volume: use normalize=zscore or percentile)"
            )
        return x / median


class Preprocessor:
    """Callable turning one decoded :class:`Volume` into a normalised (D, H, W) float32 array of ``cfg.shape``."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        mode = "trilinear" if cfg.interpolation == "trilinear" else cfg.interpolation
        if cfg.mode == "spacing":
            self.resample = Spacing(
                pixdim=cfg.target_spacing, mode="bilinear" if mode == "trilinear" else mode
            )
            self.fit = ResizeWithPadOrCrop(spatial_size=cfg.shape, mode="constant")
        else:
            self.resample = None
            self.fit = Resize(spatial_size=cfg.shape, mode=mode, anti_aliasing=False)
        if cfg.normalize == "zscore":
            self.norm = NormalizeIntensity(nonzero=cfg.nonzero)
        elif cfg.normalize == "percentile":
            lo, hi = cfg.percentiles
            self.norm = ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)
        elif cfg.normalize == "median":
            self.norm = MedianRatio(nonzero=cfg.nonzero)
        elif cfg.normalize == "minmax":
            self.norm = ScaleIntensityRangePercentiles(lower=0, upper=100, b_min=0.0, b_max=1.0, clip=True)
        else:
            self.norm = None

    def __call__(self, vol: Volume) -> np.ndarray:
        vol = reorient(vol, self.cfg.orientation)
        x = torch.as_tensor(np.asarray(vol.array, dtype=np.float32))[None]
        if (
            self.resample is not None
        ):  # Spacing keeps the volume's direction: no axis is flipped back or permuted
            affine = torch.as_tensor(dhw_affine(vol.affine), dtype=torch.float64)
            x = self.resample(MetaTensor(x, affine=affine))
        if self.norm is not None:  # normalise on the native grid, before padding adds constant voxels
            x = self.norm(x)
        x = self.fit(x)
        return np.asarray(torch.as_tensor(x).float().numpy()[0], dtype=np.float32)
