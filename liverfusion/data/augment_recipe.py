"""One MDA augmentation recipe, two pipelines built from it.

``conf/augment/_mda_recipe.yaml`` states every range and probability once. :func:`per_view` runs all of it on each
view in the loader workers (``augment=mda_cpu``, MONAI transforms); :func:`loader_part` + :func:`device_part` split
the same recipe by cost (``augment=mda_batched``): crop / resize / smoothing / bias field stay per view, flips,
affine, intensity and noise run batched after transfer (``liverfusion.data.transforms.Batch*``), with per-sample
draws from the same ranges; :func:`no_loader_part` + :func:`device_all` (``augment=mda_device``) batch all of it,
so the loader workers only gather cached volumes. A transform whose probability is 0 is left out
(``augment=mda_spatial``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.transforms import (
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)

from liverfusion.data.batched_monai import (
    BatchRandBiasField,
    BatchRandGaussianSmooth,
    BatchRandScaleCropResize,
)
from liverfusion.data.transforms import (
    BatchRandAffine,
    BatchRandFlip,
    BatchRandGaussianNoise,
    BatchRandIntensity,
)
from liverfusion.utils.config_sections import check_section

SECTIONS: dict[str, tuple[str, ...]] = {
    "crop": ("roi_scale", "max_roi_scale"),
    "flip": ("prob", "spatial_axes"),
    "affine": ("prob", "rotate", "scale", "padding_mode"),
    "gamma": ("prob", "range"),
    "scale_intensity": ("prob", "factor"),
    "shift_intensity": ("prob", "offset"),
    "noise": ("prob", "std"),
    "smooth": ("prob", "sigma"),
    "bias_field": ("prob", "coeff_range"),
}


def checked_recipe(recipe: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The recipe with exactly the known sections and keys (one clear error naming an unknown or missing one)."""
    where = "data.augment"
    top = check_section("recipe", recipe, tuple(SECTIONS), where=where)
    return {k: check_section(k, top[k], keys, where=f"{where}.recipe") for k, keys in SECTIONS.items()}


def _crop_resize(r: Mapping[str, Any], shape: Sequence[int]) -> list[Callable]:
    crop = r["crop"]
    return [
        RandScaleCrop(
            roi_scale=list(crop["roi_scale"]),
            max_roi_scale=list(crop["max_roi_scale"]),
            random_size=True,
            random_center=True,
        ),
        Resize(spatial_size=[int(s) for s in shape], mode="trilinear"),
    ]


def _smooth_bias(r: Mapping[str, Any]) -> list[Callable]:
    out: list[Callable] = []
    if r["smooth"]["prob"] > 0:
        sigma = list(r["smooth"]["sigma"])
        out.append(RandGaussianSmooth(prob=r["smooth"]["prob"], sigma_x=sigma, sigma_y=sigma, sigma_z=sigma))
    if r["bias_field"]["prob"] > 0:
        out.append(
            RandBiasField(prob=r["bias_field"]["prob"], coeff_range=list(r["bias_field"]["coeff_range"]))
        )
    return out


def per_view(recipe: Mapping[str, Any], shape: Sequence[int]) -> list[Callable]:
    """The whole recipe as per-view MONAI transforms on one (1, D, H, W) volume: crop first (cheap), resize back,
    the affine on the small volume, intensity last."""
    r = checked_recipe(recipe)
    out = _crop_resize(r, shape)
    if r["flip"]["prob"] > 0:
        out += [RandFlip(prob=r["flip"]["prob"], spatial_axis=int(a)) for a in r["flip"]["spatial_axes"]]
    if r["affine"]["prob"] > 0:
        a = r["affine"]
        out.append(
            RandAffine(
                prob=a["prob"],
                rotate_range=[a["rotate"], 0.0, 0.0],  # in-plane: about the slice axis D
                scale_range=list(a["scale"]),
                padding_mode=a["padding_mode"],
            )
        )
    if r["gamma"]["prob"] > 0:
        out.append(RandAdjustContrast(prob=r["gamma"]["prob"], gamma=list(r["gamma"]["range"])))
    if r["scale_intensity"]["prob"] > 0:
        out.append(
            RandScaleIntensity(prob=r["scale_intensity"]["prob"], factors=r["scale_intensity"]["factor"])
        )
    if r["shift_intensity"]["prob"] > 0:
        out.append(
            RandShiftIntensity(prob=r["shift_intensity"]["prob"], offsets=r["shift_intensity"]["offset"])
        )
    if r["noise"]["prob"] > 0:
        out.append(RandGaussianNoise(prob=r["noise"]["prob"], std=r["noise"]["std"]))
    return out + _smooth_bias(r)


def loader_part(recipe: Mapping[str, Any], shape: Sequence[int]) -> list[Callable]:
    """What stays per view in the loader workers when the rest runs batched: crop, resize, smoothing, bias field."""
    r = checked_recipe(recipe)
    return _crop_resize(r, shape) + _smooth_bias(r)


def no_loader_part(recipe: Mapping[str, Any]) -> list[Callable]:
    """``augment=mda_device``: nothing runs per view in the loader workers (they only gather cached volumes)."""
    checked_recipe(recipe)
    return []


def device_all(recipe: Mapping[str, Any]) -> list[Callable]:
    """``augment=mda_device``: the whole recipe batched after transfer, in ``mda_batched``'s order: crop + resize,
    smoothing, bias field (``liverfusion.data.batched_monai``), then :func:`device_part`."""
    r = checked_recipe(recipe)
    crop = r["crop"]
    out: list[Callable] = [BatchRandScaleCropResize(list(crop["roi_scale"]), list(crop["max_roi_scale"]))]
    if r["smooth"]["prob"] > 0:
        out.append(BatchRandGaussianSmooth(prob=r["smooth"]["prob"], sigma=list(r["smooth"]["sigma"])))
    if r["bias_field"]["prob"] > 0:
        b = r["bias_field"]
        out.append(BatchRandBiasField(prob=b["prob"], coeff_range=list(b["coeff_range"])))
    return out + device_part(recipe)


def device_part(recipe: Mapping[str, Any]) -> list[Callable]:
    """Flips, affine, intensity and noise of the recipe as batched transforms (per-sample draws, same ranges)."""
    r = checked_recipe(recipe)
    out: list[Callable] = []
    if r["flip"]["prob"] > 0:
        out.append(BatchRandFlip(prob=r["flip"]["prob"], spatial_axes=list(r["flip"]["spatial_axes"])))
    if r["affine"]["prob"] > 0:
        a = r["affine"]
        out.append(
            BatchRandAffine(
                prob=a["prob"], rotate=a["rotate"], scale=list(a["scale"]), padding_mode=a["padding_mode"]
            )
        )
    g, s, o = r["gamma"], r["scale_intensity"], r["shift_intensity"]
    if g["prob"] > 0 or s["prob"] > 0 or o["prob"] > 0:
        out.append(
            BatchRandIntensity(
                gamma=list(g["range"]),
                gamma_prob=g["prob"],
                scale=s["factor"],
                scale_prob=s["prob"],
                shift=o["offset"],
                shift_prob=o["prob"],
            )
        )
    if r["noise"]["prob"] > 0:
        out.append(BatchRandGaussianNoise(prob=r["noise"]["prob"], std=r["noise"]["std"]))
    return out
