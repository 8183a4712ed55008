"""Geometry of one case: canonical orientation, a common grid (a reference modality's or a fixed spacing over the
reference's extent), optional rigid registration to the reference (SimpleITK), and a record of every step.

Everything stays in physical space (LPS mm, SimpleITK's convention), so the written files carry their true origin,
spacing and direction and can be overlaid on the source images in any viewer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from liverfusion.errors import ConfigError

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
    "lanczos": sitk.sitkLanczosWindowedSinc,
}


def describe(img: sitk.Image) -> dict[str, Any]:
    """Identifier-free geometry for the log: shape/spacing in D, H, W; origin/direction as SimpleITK holds them."""
    return {
        "shape_dhw": list(img.GetSize()[::-1]),
        "spacing_dhw": [round(float(s), 5) for s in img.GetSpacing()[::-1]],
        "origin_lps": [round(float(o), 4) for o in img.GetOrigin()],
        "direction": [round(float(d), 5) for d in img.GetDirection()],
        "orientation": orientation_code(img),
        "dtype": img.GetPixelIDTypeAsString(),
    }


def orientation_code(img: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())


def reorient(img: sitk.Image, code: str | None) -> tuple[sitk.Image, str | None]:
    """Permute/flip axes (no interpolation) to the closest canonical orientation ``code`` (e.g. LPS, RAS)."""
    if not code:
        return img, None
    before = orientation_code(img)
    if before == code:
        return img, None
    return sitk.DICOMOrient(img, code), f"reoriented {before} -> {code}"


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def spacing_grid(ref: sitk.Image, spacing_dhw: Sequence[float]) -> sitk.Image:
    """An empty image covering ``ref``'s physical extent, with ``ref``'s direction and the requested spacing."""
    new_sp = [float(s) for s in spacing_dhw][::-1]
    if len(new_sp) != 3 or any(s <= 0 for s in new_sp):
        raise ConfigError(
            f"geometry.spacing must be three positive mm values in D, H, W order, got {spacing_dhw}"
        )
    old_sp = ref.GetSpacing()
    size = [max(1, int(round(n * o / s))) for n, o, s in zip(ref.GetSize(), old_sp, new_sp)]
    d = np.asarray(ref.GetDirection()).reshape(3, 3)
    # keep the outer edge of the volume where it was: shift the first voxel centre by half the spacing change
    shift = d @ ((np.asarray(new_sp) - np.asarray(old_sp)) / 2.0)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(new_sp)
    grid.SetDirection(ref.GetDirection())
    grid.SetOrigin([float(o + s) for o, s in zip(ref.GetOrigin(), shift)])
    return grid


def resample_onto(
    img: sitk.Image,
    grid: sitk.Image,
    interpolation: str = "linear",
    transform: sitk.Transform | None = None,
    default: float = 0.0,
    dtype: str = "keep",
) -> sitk.Image:
    """Resample in float32 onto ``grid``; ``dtype=keep`` rounds and clips back to the source pixel type."""
    interp = INTERPOLATORS.get(interpolation)
    if interp is None:
        raise ConfigError(f"interpolation must be one of {sorted(INTERPOLATORS)}, not {interpolation!r}")
    src_type = img.GetPixelID()
    out = sitk.Resample(
        sitk.Cast(img, sitk.sitkFloat32),
        grid,
        transform or sitk.Transform(3, sitk.sitkIdentity),
        interp,
        float(default),
        sitk.sitkFloat32,
    )
    if dtype == "keep" and src_type != sitk.sitkFloat32:
        out = cast_like(out, src_type)
    return out


def cast_like(img: sitk.Image, pixel_id: int) -> sitk.Image:
    """Round to nearest and clip into ``pixel_id``'s range (SimpleITK's cast would truncate)."""
    probe = sitk.Image(1, 1, 1, pixel_id)
    np_type = sitk.GetArrayViewFromImage(probe).dtype
    arr = sitk.GetArrayFromImage(img)
    if np.issubdtype(np_type, np.integer):
        info = np.iinfo(np_type)
        arr = np.clip(np.rint(arr), info.min, info.max)
    out = sitk.GetImageFromArray(arr.astype(np_type))
    out.CopyInformation(img)
    return out


def resample_mask(mask: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    return sitk.Resample(
        mask,
        grid,
        transform or sitk.Transform(3, sitk.sitkIdentity),
        sitk.sitkNearestNeighbor,
        0,
        mask.GetPixelID(),
    )


def coverage(img: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None) -> float:
    """Fraction of ``grid``'s voxels that ``img`` covers (a smaller field of view leaves zeros after resampling)."""
    ones = sitk.Image(img.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(img)
    hit = sitk.Resample(
        ones,
        grid,
        transform or sitk.Transform(3, sitk.sitkIdentity),
        sitk.sitkNearestNeighbor,
        0,
        sitk.sitkUInt8,
    )
    return float(sitk.GetArrayViewFromImage(hit).mean())


def register_rigid(
    fixed: sitk.Image, moving: sitk.Image, cfg: Mapping[str, Any]
) -> tuple[sitk.Transform, dict[str, Any]]:
    """Rigid (Euler 3D) registration of ``moving`` to ``fixed`` by Mattes mutual information, multi-resolution.

    Returns the transform mapping fixed-space points into ``moving`` (what ``sitk.Resample`` wants) and a record
    with the metric before/after, the rotation (degrees) and translation (mm).
    """
    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = sitk.Cast(moving, sitk.sitkFloat32)
    init_mode = str(cfg["initializer"])
    if init_mode == "none":
        init = sitk.Euler3DTransform()
        centre = f.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in f.GetSize()])
        init.SetCenter(centre)
    elif init_mode in ("geometry", "moments"):
        mode = (
            sitk.CenteredTransformInitializerFilter.GEOMETRY
            if init_mode == "geometry"
            else sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        init = sitk.CenteredTransformInitializer(f, m, sitk.Euler3DTransform(), mode)
    else:
        raise ConfigError(
            f"geometry.registration.initializer must be none, geometry or moments, not {init_mode!r}"
        )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(cfg["histogram_bins"]))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(cfg["sampling_fraction"]), int(cfg["seed"]))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=float(cfg["learning_rate"]),
        minStep=float(cfg["min_step"]),
        numberOfIterations=int(cfg["iterations"]),
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    shrink = [int(v) for v in cfg["shrink_factors"]]
    smooth = [float(v) for v in cfg["smoothing_mm"]]
    if len(shrink) != len(smooth):
        raise ConfigError("geometry.registration.shrink_factors and smoothing_mm need the same length")
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(smooth)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    before = reg.MetricEvaluate(f, m)
    out = reg.Execute(f, m)
    if out.GetName() == "CompositeTransform":
        out = sitk.CompositeTransform(out).GetNthTransform(0)
    euler = sitk.Euler3DTransform(out)
    reg.SetInitialTransform(euler, inPlace=False)
    after = reg.MetricEvaluate(f, m)
    angles = [math.degrees(a) for a in (euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ())]
    record = {
        "metric": "mattes_mutual_information",
        "metric_before": round(float(before), 5),
        "metric_after": round(float(after), 5),
        "rotation_deg_xyz": [round(a, 3) for a in angles],
        "translation_mm_xyz": [round(float(t), 3) for t in euler.GetTranslation()],
    }
    return euler, record
