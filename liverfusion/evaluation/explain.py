"""What the model looked at, per case and modality: Grad-CAM maps on the shared encoder (MONAI ``GradCAM`` /
``GradCAMpp``), brought back onto each input file's own voxel grid and saved as NIfTI with that file's affine, a PNG
sheet (modalities x slices, the map over the image the network saw), and the modality-occlusion importance (how much
the predicted class's probability falls when that modality is masked, as if it were missing).

The map is computed for the predicted class of the case (of the ensemble, for a fold ensemble: the members' maps are
averaged) at the encoder layer the fusion block reads (the feature map for map-consuming fusion such as CGC, else the
last stage), upsampled to the network input and scaled by the case's largest value, so the modalities of one case
compare. With early fusion the modalities are stacked into one encoder input, so there is one map for all of them
(said so in the output). Only 3D encoders are explained (a 2D slab encoder's maps are per slice).

Back to the input grid: the network input is the file reoriented (``preprocess.orientation``), resized (or resampled
and padded / cropped) to ``preprocess.shape`` and centre-cropped (``eval_crop``). Each step is a per-axis index map,
so the map is sampled back separably (linear; zero outside the crop) and the reorientation undone by nibabel's
orientation transforms: the NIfTI has the input's shape and affine and overlays it in any viewer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations as ornt
from torch import nn

from liverfusion.data.io import NO_REORIENTATION, load_volume, reorient
from liverfusion.data.preprocess import PreprocessConfig
from liverfusion.errors import ConfigError
from liverfusion.evaluation.dense import DenseClassifier
from liverfusion.utils.atomic import atomic_path

log = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcampp")


# ---------------------------------------------------------------------------------------------------------------
# maps at the network input
# ---------------------------------------------------------------------------------------------------------------
class _WithMask(nn.Module):
    """The dense network as the one-argument model MONAI's CAM classes call; ``present`` is set per case."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.dense = DenseClassifier(net)
        self.present: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x, self.present)


def target_layer(net: nn.Module, layer: str = "fusion") -> str:
    """The encoder layer Grad-CAM reads (a name inside ``_WithMask``): ``fusion`` = the one whose activations the
    fusion block depends on; ``layer1``..``layerN`` = an earlier, finer stage (the last stage of a small crop is a
    few voxels wide, e.g. 2x4x4 at 16x64x64, so its map can hardly localise)."""
    enc = net.encoder
    if layer != "fusion":
        stages = len(getattr(enc, "stages", ()))
        names = [f"layer{i}" for i in range(1, stages + 1)]
        if layer not in names:
            raise ConfigError(f"explain_layer={layer!r}: choose fusion or one of {names}")
        return f"dense.encoder.{layer}"
    if getattr(enc, "spatial_dims", 3) != 3 or not hasattr(enc, "stages"):
        raise ConfigError(
            f"explain=true: the {getattr(enc, 'name', type(enc).__name__)} encoder has no 3D feature maps to explain",
            fix="use explain=false for this model (Grad-CAM supports the 3D ResNet encoders)",
        )
    if net.fusion.consumes == "map":
        stage = int(getattr(enc, "map_stage", len(enc.stages)))
        return "dense.encoder.maxpool" if stage == 0 else f"dense.encoder.layer{stage}"
    return f"dense.encoder.layer{len(enc.stages)}"


class CamExplainer:
    """Grad-CAM (or Grad-CAM++) of a model or ensemble, hooks registered once and reused for every case."""

    def __init__(self, nets: Sequence[nn.Module], method: str = "gradcam", layer: str = "fusion"):
        from monai.visualize import GradCAM, GradCAMpp

        if method not in METHODS:
            raise ConfigError(f"explain_method={method!r}: choose one of {METHODS}")
        cls = GradCAM if method == "gradcam" else GradCAMpp
        self.method, self.early = method, nets[0].mode == "early"
        self.layer = target_layer(nets[0], layer)
        self.models = [_WithMask(n).eval() for n in nets]
        self.cams = [
            cls(nn_module=m, target_layers=target_layer(n, layer), postprocessing=_identity)
            for m, n in zip(self.models, nets)
        ]

    def __call__(self, image: torch.Tensor, present: torch.Tensor, class_idx: int) -> np.ndarray:
        """Maps of one case (``image`` (1, M, D, H, W)) for ``class_idx``, averaged over the members: (M, D, H, W),
        or (1, D, H, W) for early fusion; absent modalities are zero; scaled so the case's maximum is 1."""
        total = None
        for model, cam in zip(self.models, self.cams):
            model.present = present
            with torch.enable_grad():
                m = cam(image.detach().clone(), class_idx=int(class_idx)).detach().float()[:, 0]
            if not self.early:
                m = m * present.reshape(-1, 1, 1, 1).to(m.dtype)
            total = m if total is None else total + m
        maps = (total / len(self.models)).cpu().numpy()
        top = float(maps.max())
        return maps / top if top > 0 else maps


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps (the model-randomisation sanity check)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)


# ---------------------------------------------------------------------------------------------------------------
# does the map fall on the lesion? (the phantom ships lesion masks)
# ---------------------------------------------------------------------------------------------------------------
def centred_blob(shape: Sequence[int], n_voxels: int) -> np.ndarray:
    """The ``n_voxels`` voxels of a ``shape`` grid nearest its centre, distance scaled by the grid's extent per axis
    (an ellipsoid with the crop's aspect): the map of a model that only learnt "the lesion is in the middle"."""
    shape = tuple(int(v) for v in shape)
    n = int(np.clip(n_voxels, 0, int(np.prod(shape))))
    grids = np.meshgrid(*[(np.arange(d) - (d - 1) / 2) / (d / 2) for d in shape], indexing="ij")
    dist = sum(g**2 for g in grids).ravel()
    out = np.zeros(dist.size, dtype=bool)
    out[np.argsort(dist, kind="stable")[:n]] = True
    return out.reshape(shape)


def mass_inside(cam: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's total mass (sum of its non-negative values) inside ``region``; NaN for an all-zero map."""
    cam = np.clip(np.asarray(cam, dtype=np.float64), 0, None)
    total = cam.sum()
    if cam.shape != np.shape(region):
        raise ValueError(f"map {cam.shape} and region {np.shape(region)} differ in shape")
    return float(cam[np.asarray(region, dtype=bool)].sum() / total) if total > 0 else float("nan")


def lesion_mass(cam: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Grad-CAM mass inside the lesion ``mask`` against a centred blob of the same voxel count (lesion-centred
    crops make the centre a strong prior: the map must beat it to show it found the lesion itself) and against a
    uniform map (the mask's share of the volume)."""
    mask = np.asarray(mask, dtype=bool)
    blob = centred_blob(mask.shape, int(mask.sum()))
    return {
        "lesion": mass_inside(cam, mask),
        "blob": mass_inside(cam, blob),
        "uniform": float(mask.mean()),
        "overlap_blob_lesion": float((blob & mask).sum() / max(int(mask.sum()), 1)),
    }


def mask_on_network_grid(
    path: str | Path, preprocess: PreprocessConfig, eval_crop: Sequence[int] | None = None
) -> np.ndarray:
    """A lesion mask file brought onto the network input grid the way its image is (reorientation, resize or
    resampling, crop), as bool (D, H, W)."""
    from dataclasses import replace

    from monai.transforms import CenterSpatialCrop

    from liverfusion.data.preprocess import Preprocessor

    vol = load_volume(path, check=False)
    arr = Preprocessor(replace(preprocess, normalize="none"))(vol)
    if eval_crop:
        arr = np.asarray(CenterSpatialCrop(roi_size=[int(c) for c in eval_crop])(torch.as_tensor(arr)[None]))[
            0
        ]
    return arr > 0.5


# ---------------------------------------------------------------------------------------------------------------
# back onto the input file's grid
# ---------------------------------------------------------------------------------------------------------------
def _probe_offset(transform: Any, size: int, axis: int) -> float:
    """Index in ``transform``'s output of input index 0 along ``axis`` (crop: negative, pad: positive), read off
    the transform itself by sending an index ramp through it (so MONAI's rounding of odd sizes is followed)."""
    shape = [1, 1, 1]
    shape[axis] = size
    ramp = torch.arange(1, size + 1, dtype=torch.float32).reshape(1, *shape)
    out = np.asarray(torch.as_tensor(transform(ramp))).reshape(-1)
    hits = np.flatnonzero(out > 0)
    if len(hits) == 0:
        raise RuntimeError("probe lost")
    first = int(hits[0])
    return float(first - (out[first] - 1))


def _axis_map(
    n_in: int, axis: int, cfg: PreprocessConfig, spacing: Sequence[float], crop: Sequence[int] | None
):
    """For each index of the reoriented input along ``axis``: its (fractional) index in the network input."""
    from monai.transforms import CenterSpatialCrop, ResizeWithPadOrCrop

    j = np.arange(n_in, dtype=np.float64)
    target = cfg.shape[axis]
    if cfg.mode == "resize":  # MONAI Resize: F.interpolate with half-pixel centres
        idx = (j + 0.5) * target / n_in - 0.5
    else:  # Spacing keeps voxel 0 in place; then a centred pad / crop to shape
        ratio = float(spacing[axis]) / float(cfg.target_spacing[axis])
        n_res = _resampled_size(n_in, axis, float(spacing[axis]), float(cfg.target_spacing[axis]))
        size = [1, 1, 1]
        size[axis] = target
        idx = j * ratio + _probe_offset(ResizeWithPadOrCrop(spatial_size=size, mode="constant"), n_res, axis)
    if crop is not None:
        size = [-1, -1, -1]
        size[axis] = int(crop[axis])
        idx = idx + _probe_offset(CenterSpatialCrop(roi_size=[s if s > 0 else 1 for s in size]), target, axis)
    return idx


def _resampled_size(n_in: int, axis: int, spacing: float, target: float) -> int:
    """How many voxels MONAI's ``Spacing`` makes of ``n_in`` along ``axis`` (asked of the transform itself)."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    shape = [1, 1, 1]
    shape[axis] = n_in
    affine = np.eye(4)
    affine[axis, axis] = spacing
    pixdim = [1.0, 1.0, 1.0]
    pixdim[axis] = target
    probe = MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine))
    return int(Spacing(pixdim=pixdim)(probe).shape[1 + axis])


def _sample_axis(a: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` at fractional indices ``idx`` along ``axis``: the edge value up to half a voxel
    beyond the first / last voxel centre (what a voxel covers), zero further out (outside the crop)."""
    n = a.shape[axis]
    valid = (idx >= -0.5 - 1e-6) & (idx <= n - 0.5 + 1e-6)
    idx = np.clip(idx, 0, n - 1)
    lo = np.floor(idx).astype(int)
    w = (idx - lo).astype(a.dtype)
    lo_c, hi_c = np.clip(lo, 0, n - 1), np.clip(lo + 1, 0, n - 1)
    shape = [1] * a.ndim
    shape[axis] = -1
    out = np.take(a, lo_c, axis=axis) * (1 - w).reshape(shape) + np.take(a, hi_c, axis=axis) * w.reshape(
        shape
    )
    return out * valid.reshape(shape).astype(a.dtype)


def to_input_grid(
    net_map: np.ndarray, path: str | Path, preprocess: PreprocessConfig, eval_crop: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """A (D, H, W) map on the network input of the file at ``path`` as a NIfTI-ordered (i, j, k) array on that
    file's own grid, and the file's affine."""
    vol = load_volume(path, orientation=NO_REORIENTATION)
    moved = reorient(vol, preprocess.orientation)
    a = np.asarray(net_map, dtype=np.float32)
    for axis in range(3):
        idx = _axis_map(moved.array.shape[axis], axis, preprocess, moved.spacing, eval_crop)
        a = _sample_axis(a, idx, axis)
    ijk = np.transpose(a, (2, 1, 0))
    if moved is not vol:  # undo the reorientation: back to the file's stored axes
        transform = ornt.ornt_transform(ornt.io_orientation(moved.affine), ornt.io_orientation(vol.affine))
        ijk = ornt.apply_orientation(ijk, transform)
    if ijk.shape != tuple(reversed(vol.array.shape)):
        raise RuntimeError(f"map shape {ijk.shape} does not match {path}")
    return np.ascontiguousarray(ijk, dtype=np.float32), vol.affine


def save_map(ijk: np.ndarray, affine: np.ndarray, like: str | Path, target: Path) -> Path:
    """Write ``ijk`` as float32 NIfTI with ``affine`` and the sform / qform codes of the file ``like``."""
    ref = nib.load(str(like))
    img = nib.Nifti1Image(ijk, affine)
    if isinstance(ref, nib.Nifti1Image | nib.Nifti2Image):
        img.set_sform(affine, int(ref.header["sform_code"]) or 1)
        img.set_qform(affine, int(ref.header["qform_code"]) or 1)
    img.set_data_dtype(np.float32)
    with atomic_path(target, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))
    return target


# ---------------------------------------------------------------------------------------------------------------
# the PNG sheet
# ---------------------------------------------------------------------------------------------------------------
def plot_sheet(
    image: np.ndarray,
    maps: np.ndarray,
    rows: Sequence[str],
    title: str,
    path: Path,
    n_slices: int = 5,
) -> Path:
    """Modalities x slices: the network input (grey) with the map over it (``maps`` (R, D, H, W); one row for
    early fusion, drawn over the first present modality)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = image.shape[1]
    slices = np.unique(np.linspace(0, d - 1, min(n_slices, d)).round().astype(int))
    fig = Figure(figsize=(1.8 * len(slices) + 0.6, 1.8 * len(rows) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(slices), squeeze=False)
    for r, name in enumerate(rows):
        img = image[min(r, image.shape[0] - 1)]
        lo, hi = np.percentile(img, [1, 99]) if img.any() else (0.0, 1.0)
        for c, s in enumerate(slices):
            ax = axes[r][c]
            ax.imshow(img[s], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.imshow(np.ma.masked_less(maps[r][s], 0.05), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"slice {s}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


# ---------------------------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------------------------
def explain_case(
    explainer: CamExplainer,
    item: Mapping[str, Any],
    case: Any,
    modalities: Sequence[str],
    class_names: Sequence[str],
    prediction: int,
    probs_all: np.ndarray,
    dropped: Mapping[str, np.ndarray],
    preprocess: PreprocessConfig,
    eval_crop: Sequence[int] | None,
    out_dir: Path,
) -> dict[str, Any]:
    """Maps, sheet and occlusion importance of one case; returns what ``predictions.json`` records."""
    image, present = item["image"][None], item["present"][None]
    maps = explainer(image, present, prediction)
    early, method = explainer.early, explainer.method
    folder = out_dir / "explain" / _safe(case.case_id)
    files: dict[str, str] = {}
    used = [m for m in modalities if m not in case.missing]
    for i, m in enumerate(modalities):
        if m in case.missing:
            continue
        ijk, affine = to_input_grid(maps[0 if early else i], case.images[m], preprocess, eval_crop)
        name = f"{_safe(m)}_{method}.nii.gz"
        save_map(ijk, affine, case.images[m], folder / name)
        files[m] = str((folder / name).relative_to(out_dir))
    rows = ["all modalities (early fusion)"] if early else used
    sheet_maps = maps if early else maps[[modalities.index(m) for m in used]]
    sheet_image = item["image"].numpy()
    if not early:
        sheet_image = sheet_image[[modalities.index(m) for m in used]]
    else:
        sheet_image = sheet_image[[modalities.index(used[0])]]
    sheet = plot_sheet(
        sheet_image,
        sheet_maps,
        rows,
        f"{case.case_id}: {class_names[prediction]} ({probs_all[prediction]:.2f}), {method}",
        out_dir / "explain" / f"{_safe(case.case_id)}.png",
    )
    occlusion = {
        m: float(probs_all[prediction] - dropped[m][prediction])
        for m in used
        if m in dropped and len(used) > 1
    }
    return {
        "method": method,
        "layer": explainer.layer.removeprefix("dense."),
        "class": class_names[prediction],
        "maps": files,
        "sheet": str(sheet.relative_to(out_dir)),
        "one_map_for_all_modalities": early,
        "note": "early fusion stacks the modalities into one encoder input: one map, saved on each input's grid"
        if early
        else "one map per modality from the shared encoder",
        "occlusion": occlusion,
    }


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)
