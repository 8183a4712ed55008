"""Regions of interest: boxes from a mask (whole mask or per connected component), an LLD-MMRI box, or a centre and a
size; margins; crops that zero-pad where the box leaves the image and keep real geometry (origin moves, spacing and
direction stay), so a crop can still be resampled or overlaid on the full volume.

Boxes are in ITK index order (x, y, z) = (W, H, D), ``lo`` inclusive and ``hi`` exclusive. Config values are written
D, H, W like everywhere else in the project and converted here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from liverfusion.errors import ConfigError, DataError


@dataclass(frozen=True)
class IndexBox:
    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(h - lo for lo, h in zip(self.lo, self.hi))  # type: ignore[return-value]

    def expanded(self, margin_xyz: Sequence[int]) -> IndexBox:
        m = [int(v) for v in margin_xyz]
        return IndexBox(
            tuple(lo - v for lo, v in zip(self.lo, m)),  # type: ignore[arg-type]
            tuple(h + v for h, v in zip(self.hi, m)),  # type: ignore[arg-type]
        )

    def at_least(self, size_xyz: Sequence[int] | None) -> IndexBox:
        """Grow symmetrically (extra voxel on the high side) to a minimum size per axis."""
        if not size_xyz:
            return self
        lo, hi = list(self.lo), list(self.hi)
        for a, want in enumerate(size_xyz):
            extra = int(want) - (hi[a] - lo[a])
            if extra > 0:
                lo[a] -= extra // 2
                hi[a] += extra - extra // 2
        return IndexBox(tuple(lo), tuple(hi))  # type: ignore[arg-type]

    def clamped(self, size: Sequence[int], axes: Sequence[int]) -> IndexBox:
        lo, hi = list(self.lo), list(self.hi)
        for a in axes:
            lo[a] = max(lo[a], 0)
            hi[a] = min(hi[a], int(size[a]))
        return IndexBox(tuple(lo), tuple(hi))  # type: ignore[arg-type]

    def outside(self, size: Sequence[int]) -> bool:
        """True when not one voxel of the box lies in an image of ``size``."""
        return any(h <= 0 or lo >= s for lo, h, s in zip(self.lo, self.hi, size))

    def leaves(self, size: Sequence[int]) -> bool:
        """True when part of the box lies outside the image (it will be padded)."""
        return any(lo < 0 or h > s for lo, h, s in zip(self.lo, self.hi, size))

    def to_dict(self) -> dict[str, list[int]]:
        """D, H, W order for the log."""
        return {
            "lo_dhw": list(self.lo[::-1]),
            "hi_dhw": list(self.hi[::-1]),
            "size_dhw": list(self.size[::-1]),
        }


def dhw_to_xyz(values: Sequence[float] | None) -> list[float] | None:
    if values is None:
        return None
    values = list(values)
    if len(values) != 3:
        raise ConfigError(f"expected three values in D, H, W order, got {values}")
    return values[::-1]


def margin_voxels(
    image: sitk.Image, margin_dhw: Sequence[int] | None, margin_mm_dhw: Sequence[float] | None
) -> list[int]:
    """Margin per axis (x, y, z) in voxels, from voxels or from mm (rounded up on this image's spacing)."""
    if margin_mm_dhw is not None:
        mm = dhw_to_xyz(margin_mm_dhw)
        return [int(math.ceil(float(m) / s - 1e-9)) for m, s in zip(mm, image.GetSpacing())]  # type: ignore[arg-type]
    return [int(v) for v in (dhw_to_xyz(margin_dhw) or [0, 0, 0])]


def crop_with_pad(image: sitk.Image, box: IndexBox, pad_value: float = 0) -> sitk.Image:
    """The part of ``image`` inside ``box``; voxels outside the image are ``pad_value``. Geometry stays physical."""
    size = image.GetSize()
    if box.outside(size):
        raise DataError(f"box {box.to_dict()} lies entirely outside the image (D, H, W = {list(size[::-1])})")
    if any(s <= 0 for s in box.size):
        raise DataError(f"empty box {box.to_dict()}")
    pad_lo = [max(0, -v) for v in box.lo]
    pad_hi = [max(0, h - s) for h, s in zip(box.hi, size)]
    if any(pad_lo) or any(pad_hi):
        image = sitk.ConstantPad(image, pad_lo, pad_hi, pad_value)
    index = [v + p for v, p in zip(box.lo, pad_lo)]
    return sitk.RegionOfInterest(image, list(box.size), index)


def mask_boxes(
    mask: sitk.Image, labels: Sequence[int] | None = None, components: bool = False, min_voxels: int = 1
) -> list[IndexBox]:
    """Bounding box of the mask (``labels`` or any non-zero value), or one per connected component, largest first."""
    arr = sitk.GetArrayViewFromImage(mask)
    fg = np.isin(arr, list(labels)) if labels else arr != 0
    binary = sitk.GetImageFromArray(fg.astype(np.uint8))
    binary.CopyInformation(mask)
    if not fg.any():
        return []
    if components:
        cc = sitk.RelabelComponent(
            sitk.ConnectedComponent(binary), minimumObjectSize=int(min_voxels), sortByObjectSize=True
        )
    else:
        cc = binary
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    boxes = []
    for label in sorted(stats.GetLabels()):
        if not components and stats.GetNumberOfPixels(label) < int(min_voxels):
            continue
        bb = stats.GetBoundingBox(label)  # x, y, z start then x, y, z size
        lo = tuple(int(v) for v in bb[:3])
        boxes.append(IndexBox(lo, tuple(int(v + s) for v, s in zip(lo, bb[3:]))))  # type: ignore[arg-type]
    return boxes


def centre_box(image: sitk.Image, point_lps: Sequence[float], size_xyz: Sequence[int]) -> IndexBox:
    """A box of ``size_xyz`` voxels centred on a physical point (LPS mm) of ``image``'s grid."""
    c = image.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps])
    lo = tuple(int(math.floor(ci + 0.5 - s / 2.0)) for ci, s in zip(c, size_xyz))
    return IndexBox(lo, tuple(v + int(s) for v, s in zip(lo, size_xyz)))  # type: ignore[arg-type]


def box_in_grid(box: IndexBox, source: sitk.Image, target: sitk.Image) -> IndexBox:
    """The smallest box of ``target``'s grid that holds ``box`` of ``source``'s grid (for QA overlays)."""
    corners = []
    for ix in (box.lo[0] - 0.5, box.hi[0] - 0.5):
        for iy in (box.lo[1] - 0.5, box.hi[1] - 0.5):
            for iz in (box.lo[2] - 0.5, box.hi[2] - 0.5):
                p = source.TransformContinuousIndexToPhysicalPoint([ix, iy, iz])
                corners.append(target.TransformPhysicalPointToContinuousIndex(p))
    c = np.asarray(corners)
    eps = 1e-6  # the corners of the same grid map back onto half-integers up to rounding noise
    lo = np.floor(c.min(axis=0) + 0.5 + eps).astype(int)
    hi = np.ceil(c.max(axis=0) + 0.5 - eps).astype(int)
    return IndexBox(tuple(int(v) for v in lo), tuple(int(v) for v in hi))  # type: ignore[arg-type]
