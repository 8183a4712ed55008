"""Reading and writing single 3D volumes in the package's axis convention.

Arrays returned here are (D, H, W) = NIfTI (Z, Y, X): the NIfTI array is transposed on load and back on save.
Spacings follow the same order, in mm: (sD, sH, sW) = (sz, sy, sx).
Every reader failure becomes a :class:`~liverfusion.errors.DataError` naming the file and the reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from liverfusion.errors import DataError
from liverfusion.utils.atomic import atomic_path


@dataclass
class Volume:
    """One decoded 3D image: ``array`` is (D, H, W); ``spacing`` is (sD, sH, sW) in mm; ``affine`` is NIfTI's."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Path | None = None


def load_volume(path: str | Path, dtype: np.dtype | type = np.float32, check: bool = True) -> Volume:
    """Load a NIfTI file as (D, H, W); raise DataError for a missing, unreadable, non-3D or non-finite image."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file is missing", path=path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib errors, ...)
        raise DataError(f"unreadable image ({type(exc).__name__}: {exc})", path=path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"not a 3D image: array shape {tuple(data.shape)}", path=path)
    zooms = img.header.get_zooms()[:3]
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0))).astype(dtype, copy=False)
    vol = Volume(
        array=array, spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])), affine=img.affine, path=path
    )
    if check:
        check_volume(vol)
    return vol


def check_volume(vol: Volume) -> None:
    """Reject volumes that would poison training silently: NaN/inf, constant, empty."""
    a = vol.array
    if a.size == 0 or min(a.shape) < 1:
        raise DataError(f"empty image of shape {a.shape}", path=vol.path)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        n_bad = int((~np.isfinite(a)).sum())
        raise DataError(f"contains {n_bad} NaN/inf voxels", path=vol.path)
    if a.max() == a.min():
        raise DataError(f"constant image (every voxel = {a.flat[0]!r})", path=vol.path)


def save_volume(
    path: str | Path,
    array: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write a (D, H, W) array as NIfTI atomically. Without ``affine`` a diagonal one from ``spacing`` is used."""
    if array.ndim != 3:
        raise ValueError(f"save_volume expects a (D, H, W) array, got shape {array.shape}")
    data = np.transpose(array, (2, 1, 0))
    if dtype is not None:
        data = data.astype(dtype)
    if affine is None:
        affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_zooms((spacing[2], spacing[1], spacing[0]))
    img.header.set_xyzt_units("mm")
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file (blake2b, 16 bytes): keys caches and finds exact duplicate modality files."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
