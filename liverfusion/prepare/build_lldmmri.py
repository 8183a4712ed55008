"""The LLD-MMRI builder: one case per lesion of a raw-release study, each phase cropped on its own annotation box
with the official margins, real geometry kept.

Steps (:func:`build_lldmmri`): load the matched phases (checking their spacing against Annotation.json), then per
lesion: crop every phase that has a box for it, refuse the lesion when a required phase is missing, optionally
resample onto the reference phase's crop grid, and take the category most phases agree on as the label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import SimpleITK as sitk

from liverfusion.errors import DataError
from liverfusion.prepare import geometry as geo
from liverfusion.prepare.building import BuiltCase, Context, cast_output, load_modality, reference_name
from liverfusion.prepare.lldmmri_raw import official_crop_box
from liverfusion.prepare.qa import Panel
from liverfusion.prepare.roi import crop_with_pad
from liverfusion.prepare.rules import StudyMatch
from liverfusion.prepare.settings import setting
from liverfusion.prepare.sources import SeriesSource, StudySource


def build_lldmmri(
    ctx: Context, study: StudySource, match: StudyMatch, warnings: list[str]
) -> tuple[list[BuiltCase], list[dict[str, Any]]]:
    """One case per lesion; each phase cropped on its own box (official margins), real geometry kept."""
    lcfg = setting(ctx.cfg, "lldmmri")
    margin = [int(v) for v in lcfg["margin"]]
    images, phase_warn = _load_phases(study, match, float(lcfg["spacing_tolerance"]))
    keys = sorted(
        {k for i in match.chosen.values() for k in study.series[i].boxes}, key=lambda k: (len(k), k)
    )
    if not keys:
        raise DataError("no lesion box in any usable phase")
    ref = reference_name(ctx, list(images) or list(match.chosen))
    out: list[BuiltCase] = []
    failures: list[dict[str, Any]] = []
    for key in keys:
        case_warn = list(warnings) + list(phase_warn)
        vols, mod_recs, panels, categories = _crop_phases(ctx, study, match, images, key, margin, case_warn)
        if not vols:
            failures.append(
                {"lesion": key, "reason": "; ".join(ctx.scrub(w) for w in case_warn) or "no phase"}
            )
            continue
        missing = [m for m in ctx.rules.required if m not in vols]
        if missing:
            failures.append(
                {"lesion": key, "reason": f"required phase(s) {missing} missing: " + "; ".join(case_warn)}
            )
            continue
        vols = _on_reference_crop(ctx, vols, mod_recs, ref)
        label = _category(categories, case_warn)
        rec = {"modalities": mod_recs, "roi": {"mode": "lldmmri_box", "lesion": key, "margin_dhw": margin}}
        out.append(BuiltCase(key, vols, label, {}, rec, case_warn, panels))
    return out, failures


def _load_phases(
    study: StudySource, match: StudyMatch, tol: float
) -> tuple[dict[str, sitk.Image], list[str]]:
    """The matched phases' pixels; a phase that cannot be read is left out of every lesion (warned)."""
    images: dict[str, sitk.Image] = {}
    phase_warn: list[str] = []
    for mod, idx in match.chosen.items():
        s = study.series[idx]
        try:
            images[mod] = load_modality(s)
        except DataError as exc:
            phase_warn.append(f"{mod}: {exc}: phase left out")
            continue
        phase_warn += _spacing_warnings(mod, s, images[mod], tol)
    return images, phase_warn


def _spacing_warnings(mod: str, s: SeriesSource, img: sitk.Image, tol: float) -> list[str]:
    """Annotation.json's pixel spacing and slice thickness against the image header (relative tolerance)."""
    out = []
    sp = img.GetSpacing()
    ps, st = s.info.get("pixel_spacing"), s.info.get("slice_thickness")
    try:
        if ps is not None and max(abs(float(a) - b) / b for a, b in zip(list(ps)[:2], sp[:2])) > tol:
            out.append(
                f"{mod}: pixel_spacing {list(ps)} in Annotation.json differs from the image header {list(sp[:2])}"
            )
        if st is not None and abs(float(st) - sp[2]) / sp[2] > tol:
            out.append(
                f"{mod}: slice_thickness {st} in Annotation.json differs from the slice spacing {sp[2]:.3g}"
            )
    except (TypeError, ValueError):
        out.append(f"{mod}: pixel_spacing/slice_thickness in Annotation.json are not numbers")
    return out


def _crop_phases(
    ctx: Context,
    study: StudySource,
    match: StudyMatch,
    images: Mapping[str, sitk.Image],
    key: str,
    margin: list[int],
    case_warn: list[str],
) -> tuple[dict[str, sitk.Image], dict[str, Any], list[Panel], list[Any]]:
    """Every phase with a usable box for lesion ``key``, cropped and reoriented: (volumes, records, QA panels,
    the categories the boxes name); phases without one are left out with a warning in ``case_warn``."""
    lcfg = setting(ctx.cfg, "lldmmri")
    pad_slices = bool(lcfg["pad_slices"])
    orientation = setting(ctx.cfg, "geometry.orientation")
    vols: dict[str, sitk.Image] = {}
    panels: list[Panel] = []
    mod_recs: dict[str, Any] = {}
    categories: list[Any] = []
    for mod, img in images.items():
        box = study.series[match.chosen[mod]].boxes.get(key)
        if box is None:
            case_warn.append(f"{mod}: no box for this lesion: phase left out")
            continue
        if box.error:
            case_warn.append(f"{mod}: {box.error}: phase left out")
            continue
        try:
            crop_box, w = official_crop_box(box, img.GetSize(), margin, pad_slices)
            crop = crop_with_pad(img, crop_box, float(lcfg["pad_value"]))
        except DataError as exc:
            case_warn.append(f"{mod}: {exc.reason}: phase left out")
            continue
        case_warn += [f"{mod}: {x}" for x in w]
        categories.append(box.category)
        rec = {
            "source": {"text": study.series[match.chosen[mod]].text, "geometry": geo.describe(img)},
            "annotation_box": {"lo_xyz": list(box.lo), "hi_xyz_inclusive": list(box.hi)},
            "crop": crop_box.to_dict(),
            "steps": [],
        }
        crop, step = geo.reorient(crop, orientation)
        if step:
            rec["steps"].append(step)
        vols[mod] = crop
        mod_recs[mod] = rec
        panels.append(Panel(mod, img, crop_box, crop))
    return vols, mod_recs, panels, categories


def _on_reference_crop(
    ctx: Context, vols: dict[str, sitk.Image], mod_recs: dict[str, Any], ref: str
) -> dict[str, sitk.Image]:
    """With ``geometry.resample`` other than none, every phase onto the reference phase's crop grid; then the
    output data type, and each phase's output geometry recorded."""
    g = setting(ctx.cfg, "geometry")
    dtype = str(setting(ctx.cfg, "output.dtype"))
    if g["resample"] != "none" and ref in vols:
        grid = vols[ref] if g["resample"] == "reference" else geo.spacing_grid(vols[ref], g["spacing"])
        for mod in list(vols):
            if not geo.same_grid(vols[mod], grid):
                vols[mod] = geo.resample_onto(vols[mod], grid, str(g["interpolation"]), dtype=dtype)
                mod_recs[mod]["steps"].append(f"resampled onto the {ref} crop grid")
    vols = {m: cast_output(v, dtype) for m, v in vols.items()}
    for m in vols:
        mod_recs[m]["output"] = geo.describe(vols[m])
    return vols


def _category(categories: list[Any], case_warn: list[str]) -> str | None:
    """The category most phases' boxes name (warned when they disagree); None when none names one."""
    counts = Counter(str(x) for x in categories if x is not None)
    label = counts.most_common(1)[0][0] if counts else None
    if len(counts) > 1:
        case_warn.append(f"phases disagree on the category {dict(counts)}: using {label}")
    return label
