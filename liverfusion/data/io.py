"""Reading and writing single 3D volumes in the package's axis convention.

Arrays returned here are (D, H, W) = NIfTI (Z, Y, X): the NIfTI array is transposed on load and back on save.
Spacings follow the same order, in mm: (sD, sH, sW) = (sz, sy, sx). ``affine`` stays NIfTI's (voxel i, j, k ->
world RAS mm); ``reorient`` brings a volume to an orientation convention (``data.preprocess.orientation``) so that
a sequence stored with a flipped or permuted axis is not fed to the model mirrored beside the others.
Every reader failure becomes a :class:`~liverfusion.errors.DataError` naming the file and the reason.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.atomic import atomic_path

NO_REORIENTATION = "none"
_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})
_GZIP_MAGIC = b"\x1f\x8b"
_REREAD = "copy or export the file again from its source"


@dataclass
class Volume:
    """One decoded 3D image: ``array`` is (D, H, W); ``spacing`` is (sD, sH, sW) in mm; ``affine`` is NIfTI's.

    ``stored_axcodes`` is the file's orientation as stored (nibabel axis codes of i, j, k, e.g. ``RAS``, ``LAS``),
    kept through ``reorient`` so ``data.check`` can say how a file was stored; ``""`` when the file records no
    orientation (NIfTI qform and sform codes 0): its affine is then nibabel's guess and it is never reoriented.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Path | None = None
    stored_axcodes: str | None = None

    def __post_init__(self) -> None:
        if self.stored_axcodes is None:
            self.stored_axcodes = axcodes(self.affine)


def axcodes(affine: np.ndarray) -> str:
    """Orientation of a NIfTI affine as three letters (the direction each of i, j, k points to), e.g. ``RAS``;
    ``""`` when an axis has no direction (a degenerate affine)."""
    codes = nib.aff2axcodes(np.asarray(affine, dtype=float))
    return "" if None in codes else "".join(codes)


def check_orientation(code: str | None, key: str = "data.preprocess.orientation") -> str:
    """Normalise an orientation setting: ``none``/null (keep every file as stored) or three axis letters, one of
    each pair L/R, A/P, S/I (e.g. ``RAS``, nibabel's and MONAI's canonical one); anything else is a ConfigError."""
    if code is None or str(code).strip().lower() == NO_REORIENTATION:
        return NO_REORIENTATION
    text = str(code).strip().upper()
    if len(text) != 3 or not all(len(pair & set(text)) == 1 for pair in _AXIS_PAIRS):
        raise ConfigError(
            f"{key} must be none or three axis letters, one of each L/R, A/P, S/I (e.g. RAS), got {code!r}"
        )
    return text


def reorient(vol: Volume, code: str | None) -> Volume:
    """``vol`` brought to orientation ``code`` by flipping/permuting axes (no interpolation), with its affine and
    spacing updated to match (nibabel's ``ornt_transform`` + ``apply_orientation``, as ``as_closest_canonical``).

    Returns ``vol`` itself when ``code`` is ``none``, when it is already so oriented (its array is then untouched,
    byte for byte) or when the file recorded no orientation (``stored_axcodes == ""``: nothing to trust).
    """
    code = check_orientation(code)
    if code == NO_REORIENTATION or not vol.stored_axcodes:
        return vol
    start = ornt.io_orientation(vol.affine)
    transform = ornt.ornt_transform(start, ornt.axcodes2ornt(code))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return vol
    data_ijk = np.transpose(vol.array, (2, 1, 0))  # (D, H, W) -> NIfTI (i, j, k)
    data = ornt.apply_orientation(data_ijk, transform)
    affine = vol.affine @ ornt.inv_ornt_aff(transform, data_ijk.shape)
    zooms_ijk = np.asarray(vol.spacing[::-1], dtype=float)
    new_zooms = np.empty(3)
    new_zooms[transform[:, 0].astype(int)] = zooms_ijk
    return Volume(
        array=np.ascontiguousarray(np.transpose(data, (2, 1, 0))),
        spacing=(float(new_zooms[2]), float(new_zooms[1]), float(new_zooms[0])),
        affine=affine,
        path=vol.path,
        stored_axcodes=vol.stored_axcodes,
    )


def dhw_affine(affine: np.ndarray) -> np.ndarray:
    """The NIfTI affine re-expressed for the (D, H, W) array (voxel (d, h, w) = NIfTI (k, j, i)): what MONAI's
    MetaTensor wants, so resampling keeps the volume's direction and origin."""
    affine = np.asarray(affine, dtype=float)
    return affine[:, [2, 1, 0, 3]]


def geometry(vol: Volume) -> dict:
    """Facts ``data.check`` compares between the modalities of a case: stored axis codes and the field of view
    (world RAS mm box covered by the voxels' outer edges), which reorientation does not change."""
    shape_ijk = np.asarray(vol.array.shape[::-1], dtype=float)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape_ijk], indexing="ij")).reshape(3, -1)
    world = vol.affine[:3, :3] @ corners + vol.affine[:3, 3:4]
    return {
        "axcodes": vol.stored_axcodes,
        "fov_mm": [
            [round(float(v), 2) for v in world.min(axis=1)],
            [round(float(v), 2) for v in world.max(axis=1)],
        ],
    }


def _has_orientation(img: nib.spatialimages.SpatialImage) -> bool:
    """Whether the file records its orientation: a NIfTI with qform or sform code > 0 (with both 0 nibabel's
    affine is the ANALYZE guess, x flipped), or any other format with an affine of its own (not plain ANALYZE)."""
    if isinstance(img, nib.Nifti1Pair):
        return int(img.header["qform_code"]) > 0 or int(img.header["sform_code"]) > 0
    return not isinstance(img, nib.AnalyzeImage)


def _read_image(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Decode the whole file now (nibabel reads lazily) and verify that all of it was there.

    A gzip file is decompressed in full first, which checks its CRC and length: nibabel alone stops at the last
    byte of the array and silently accepts a file cut in its gzip trailer. nibabel then raises if the (now
    in-memory or uncompressed) file holds fewer bytes than the header's shape and type need.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == _GZIP_MAGIC:
            try:
                raw = gzip.decompress(path.read_bytes())
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise DataError(
                    f"unreadable image: truncated or corrupt gzip data ({type(exc).__name__}: {exc})",
                    path=path,
                    fix=_REREAD,
                ) from None
            klass = next(
                (
                    k
                    for k in (nib.Nifti1Image, nib.Nifti2Image)
                    if k.header_class.may_contain_header(raw[: k.header_class.template_dtype.itemsize])
                ),
                None,
            )
            if klass is None:
                raise DataError(
                    "unreadable image: gzip file without a NIfTI-1/2 header inside", path=path, fix=_REREAD
                )
            img = klass.from_bytes(raw)
        elif path.name.endswith(".gz"):
            raise DataError(
                f"unreadable image: named {path.name} but not gzip-compressed (starts with {magic!r})",
                path=path,
                fix="give a NIfTI file (.nii or .nii.gz)",
            )
        else:
            img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        if isinstance(data, np.memmap):  # a private copy: nothing keeps the user's file mapped
            data = np.array(data)
    except DataError:
        raise
    except (EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"unreadable image: truncated or damaged ({type(exc).__name__}: {exc})".replace("\n", " "),
            path=path,
            fix=_REREAD,
        ) from None
    except (
        Exception
    ) as exc:  # ImageFileError, HeaderDataError, ValueError, ...: not an image nibabel can read
        raise DataError(
            f"unreadable image ({type(exc).__name__}: {exc})".replace("\n", " "), path=path, fix=_REREAD
        ) from None
    return img, data


def load_volume(
    path: str | Path,
    dtype: np.dtype | type = np.float32,
    check: bool = True,
    orientation: str | None = NO_REORIENTATION,
) -> Volume:
    """Load a NIfTI file as (D, H, W), read and verified in full; raise one DataError naming the file for a
    missing, truncated, corrupt or non-NIfTI file, a non-3D image, an unusable spacing or affine, and (``check``)
    voxel data that is no MR image (``check_voxels``). ``orientation`` (e.g. ``RAS``): ``reorient`` on load."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file is missing", path=path)
    img, data = _read_image(path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"not a 3D image: array shape {tuple(data.shape)}", path=path)
    if check and (np.iscomplexobj(data) or data.dtype == np.bool_):  # before the cast to float hides it
        check_voxels(data, path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if len(zooms) != 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"voxel spacing {zooms} in the header is not three positive numbers", path=path)
    affine = np.asarray(img.affine, dtype=float)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError("the header's affine (voxel-to-world matrix) is not finite and invertible", path=path)
    norms = tuple(float(n) for n in np.linalg.norm(affine[:3, :3], axis=0))
    if not np.allclose(zooms, norms, rtol=1e-3, atol=1e-4):  # e.g. pixdim 0, which nibabel turns into 1 mm
        raise DataError(
            f"voxel spacing in the header {tuple(round(z, 4) for z in zooms)} disagrees with its affine's "
            f"{tuple(round(n, 4) for n in norms)} mm (i, j, k): the geometry is ambiguous",
            path=path,
            fix="rewrite the file with consistent pixdim and qform/sform (e.g. with SimpleITK or nibabel)",
        )
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0))).astype(dtype, copy=False)
    vol = Volume(
        array=array,
        spacing=(zooms[2], zooms[1], zooms[0]),
        affine=affine,
        path=path,
        stored_axcodes=axcodes(affine) if _has_orientation(img) else "",
    )
    if check:
        check_volume(vol)
    return reorient(vol, orientation)


def check_voxels(data: np.ndarray, path: str | Path | None = None) -> None:
    """Reject voxel data that is not an MR intensity image, whatever reader decoded it (NIfTI here, SimpleITK in
    ``prepare``): complex or boolean data, NaN/inf, empty, constant, or only two values (a mask given as an image).

    Raises DataError naming ``path``; one shared rule so ``data.check``, training, ``prepare`` and ``predict`` agree.
    """
    a = np.asarray(data)
    if np.iscomplexobj(a):
        raise DataError(f"complex-valued image ({a.dtype}): store the magnitude as a real image", path=path)
    if a.dtype == np.bool_:
        raise DataError("boolean image: this is a mask, not an MR image", path=path)
    if a.size == 0 or min(a.shape) < 1:
        raise DataError(f"empty image of shape {a.shape}", path=path)
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            n_bad = int(a.size - np.count_nonzero(finite))
            what = "every voxel is NaN/inf" if n_bad == a.size else f"contains {n_bad} NaN/inf voxels"
            raise DataError(what, path=path)
    lo, hi = a.min(), a.max()
    if lo == hi:
        raise DataError(f"constant image (every voxel = {lo.item()!r})", path=path)
    if np.count_nonzero((a == lo) | (a == hi)) == a.size:
        raise DataError(
            f"only two values ({lo.item()!r} and {hi.item()!r}): a mask or label map, not an MR image",
            path=path,
        )


def check_volume(vol: Volume) -> None:
    """Reject volumes that would poison training silently (see ``check_voxels``)."""
    check_voxels(vol.array, vol.path)


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
    """Content hash of a file (blake2b, 16 bytes): keys caches and finds exact duplicate modality files.

    Remembered per process by the file's identity and stat (device, inode, size, modification and change times),
    so a run that scans a data set several times (duplicate check, cache keys, prepare_data then setup) reads each
    file once; any write to the file changes its stat and so its key.
    """
    st = os.stat(path)
    return _digest(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, chunk)


@functools.lru_cache(maxsize=1 << 16)
def _digest(path: str, dev: int, ino: int, size: int, mtime_ns: int, ctime_ns: int, chunk: int) -> str:
    del dev, ino, size, mtime_ns, ctime_ns  # only the cache key
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
