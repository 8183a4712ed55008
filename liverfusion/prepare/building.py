"""What the builders of every layout share: the run context, the built case, loading a matched series, the
reference modality and the output data type.

A builder (``build_general``, ``build_lldmmri``) turns one matched study into ``BuiltCase``s; the orchestrator
(:mod:`liverfusion.prepare.app`) names, writes and records them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import SimpleITK as sitk

from liverfusion.errors import ConfigError, DataError
from liverfusion.prepare import geometry as geo
from liverfusion.prepare.privacy import Scrubber
from liverfusion.prepare.qa import Panel
from liverfusion.prepare.rules import RuleSet
from liverfusion.prepare.settings import setting
from liverfusion.prepare.sources import SeriesSource

_OUTPUT_DTYPES = {
    "float32": sitk.sitkFloat32,
    "int16": sitk.sitkInt16,
    "uint16": sitk.sitkUInt16,
    "uint8": sitk.sitkUInt8,
}


@dataclass
class Context:
    cfg: dict[str, Any]
    rules: RuleSet
    scrub: Scrubber
    reference: str | None = None


@dataclass
class BuiltCase:
    key: str
    """Lesion key (LLD-MMRI) or running number within the study."""
    volumes: dict[str, sitk.Image]
    label_raw: Any
    extra: dict[str, Any]
    record: dict[str, Any]
    warnings: list[str]
    panels: list[Panel]


def load_modality(s: SeriesSource) -> sitk.Image:
    """Pixels of a series used as a modality, through the shared voxel rule (``check_voxels``): a mask, a constant
    or all-NaN volume, complex or boolean data given as an MR image is a DataError naming the file."""
    if s.problems:
        raise DataError("; ".join(s.problems), path=s.path)
    return s.load(check=True)


def load_mask(s: SeriesSource) -> sitk.Image:
    """A region-of-interest mask: read like any series, but two values are what a mask should have."""
    if s.problems:
        raise DataError("; ".join(s.problems), path=s.path)
    return s.load()


def reference_name(ctx: Context, available: list[str]) -> str:
    """The modality whose grid the others are put on (``geometry.reference``, else the rule set's); kept on
    ``ctx`` for the QA figure."""
    g = setting(ctx.cfg, "geometry")
    ref = g.get("reference") or ctx.rules.reference or (ctx.rules.required[0] if ctx.rules.required else None)
    if ref is None:
        ref = available[0]
    ctx.reference = ref
    return ref


def cast_output(img: sitk.Image, dtype: str) -> sitk.Image:
    """``img`` in the data type of ``output.dtype`` (``keep``: as read)."""
    if dtype in ("keep", "", None):
        return img
    if dtype not in _OUTPUT_DTYPES:
        raise ConfigError(f"output.dtype must be keep or one of {sorted(_OUTPUT_DTYPES)}, not {dtype!r}")
    pixel = _OUTPUT_DTYPES[dtype]
    return sitk.Cast(img, pixel) if dtype == "float32" else geo.cast_like(img, pixel)
