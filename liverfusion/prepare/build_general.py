"""The general builder: a DICOM or NIfTI study -> cases on a common grid, whole or cropped around lesions.

Steps (:func:`build_general`): load the matched series (and the region-of-interest mask), reorient, register
(where asked) and resample onto the reference grid, then one case of the whole volumes (``roi.mode=none``) or one
case per box (``roi.mode=mask``: mask components, ``centre``: the centres CSV), each modality cropped on the box
as it lies in that modality's grid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from liverfusion.errors import DataError
from liverfusion.prepare import geometry as geo
from liverfusion.prepare.building import (
    BuiltCase,
    Context,
    cast_output,
    load_mask,
    load_modality,
    reference_name,
)
from liverfusion.prepare.qa import Panel
from liverfusion.prepare.roi import (
    IndexBox,
    box_in_grid,
    centre_box,
    crop_with_pad,
    dhw_to_xyz,
    margin_voxels,
    mask_boxes,
)
from liverfusion.prepare.rules import MASK, StudyMatch
from liverfusion.prepare.settings import setting
from liverfusion.prepare.sources import StudySource

Box = tuple[IndexBox, dict[str, Any], Any]
"""A region of interest: the box in the grid of the image it was found on, its record, a label that overrides
the study's (a centre's own label) or None."""


@dataclass
class _Volumes:
    """A study's modalities on their common grid, with what cropping them needs."""

    images: dict[str, sitk.Image]
    records: dict[str, dict[str, Any]]
    mask: sitk.Image | None
    grid: sitk.Image | None  # the common grid; None with geometry.resample=none
    ref: str


def build_general(
    ctx: Context, study: StudySource, match: StudyMatch, warnings: list[str]
) -> tuple[list[BuiltCase], list[dict[str, Any]]]:
    """DICOM / NIfTI studies: whole volumes or crops around a mask / centres, on a common grid.

    Returns the cases and the boxes that failed (a box outside the reference or a required modality); a problem of
    the whole study raises DataError."""
    if match.missing_required:
        seen = [e["text"] for e in match.entries]
        raise DataError(f"required modality {match.missing_required} missing (series seen: {seen})")
    roi_mode = setting(ctx.cfg, "roi.mode")
    images, records = _load_images(ctx, study, match, warnings)
    mask = _load_roi_mask(study, match, roi_mode, warnings)
    vol = _on_common_grid(ctx, images, records, mask, warnings)
    r = setting(ctx.cfg, "roi")
    ref_img = vol.grid if vol.grid is not None else vol.images[vol.ref]
    boxes, ref_for_boxes = _roi_boxes(r, roi_mode, study, vol.mask, ref_img)
    save_mask = bool(r["save_mask"]) and vol.mask is not None
    shown_mask = _selected(vol.mask, r.get("mask_labels")) if vol.mask is not None else None
    if not boxes:
        return [_whole_case(study, vol, save_mask, shown_mask, warnings)], []
    out: list[BuiltCase] = []
    failures: list[dict[str, Any]] = []
    must_have = set(ctx.rules.required) | {vol.ref}
    pad = float(r["pad_value"])
    for k, (box, box_rec, label_override) in enumerate(boxes):
        case = _cropped_case(vol, box, ref_for_boxes, pad, must_have, save_mask, shown_mask, list(warnings))
        if isinstance(case, str):
            failures.append({"roi": box_rec["source"], "reason": case})
            continue
        vols, rec, case_warn, panels = case
        rec = {"modalities": rec, "roi": {"mode": roi_mode, **box_rec, "box": box.to_dict()}}
        label = study.label_raw if label_override in (None, "") else label_override
        out.append(BuiltCase(str(k), vols, label, dict(study.extra), rec, case_warn, panels))
    if not out:
        raise DataError("; ".join(f["reason"] for f in failures))
    return out, failures


# ---- loading ----


def _load_images(
    ctx: Context, study: StudySource, match: StudyMatch, warnings: list[str]
) -> tuple[dict[str, sitk.Image], dict[str, dict[str, Any]]]:
    """The matched series' pixels and records; an optional modality that cannot be read is left out (warned)."""
    g = setting(ctx.cfg, "geometry")
    required = set(ctx.rules.required)
    images: dict[str, sitk.Image] = {}
    records: dict[str, dict[str, Any]] = {}
    for mod, idx in match.chosen.items():
        s = study.series[idx]
        warnings += [f"{mod}: {w}" for w in s.warnings]
        try:
            img = load_modality(s)
        except DataError as exc:
            msg = f"{mod} (series {s.text!r}): {exc}"
            if mod in required or mod == g.get("reference"):
                raise DataError(msg) from None
            warnings.append(msg + ": modality left out")
            continue
        images[mod] = img
        records[mod] = {"source": {"text": s.text, **s.info, "geometry": geo.describe(img)}, "steps": []}
    if not images:
        raise DataError(
            "no series could be used (see the rule report: python -m liverfusion.prepare ... dry_run=true)"
        )
    warnings += _exact_copies(images)
    return images, records


def _load_roi_mask(
    study: StudySource, match: StudyMatch, roi_mode: str, warnings: list[str]
) -> sitk.Image | None:
    """The series matched by ``rules.masks``: required with ``roi.mode=mask``, else optional (a broken one is
    ignored, warned)."""
    mask = None
    if match.mask_index is not None:
        ms = study.series[match.mask_index]
        try:
            mask = load_mask(ms)
        except DataError as exc:
            if roi_mode == "mask":
                raise DataError(f"mask (series {ms.text!r}): {exc}") from None
            warnings.append(f"mask (series {ms.text!r}): {exc}: ignored")
    if roi_mode == "mask" and mask is None:
        raise DataError("roi.mode=mask but no series matched rules.masks")
    return mask


def _exact_copies(images: Mapping[str, sitk.Image]) -> list[str]:
    """Exports fill missing sequences with copies of another one (LGG: FLAIR): say so, the data layer masks them."""
    seen: dict[str, str] = {}
    out = []
    for name, img in images.items():
        digest = hashlib.blake2b(sitk.GetArrayViewFromImage(img).tobytes(), digest_size=16).hexdigest()
        key = f"{img.GetSize()}{digest}"
        if key in seen:
            out.append(f"{name} is a voxel-exact copy of {seen[key]} (a filler for a missing sequence?)")
        else:
            seen[key] = name
    return out


# ---- geometry: orientation, registration, common grid ----


def _on_common_grid(
    ctx: Context,
    images: dict[str, sitk.Image],
    records: dict[str, dict[str, Any]],
    mask: sitk.Image | None,
    warnings: list[str],
) -> _Volumes:
    """Reorient every volume, register the modalities of ``geometry.register`` to the reference, resample onto
    the reference grid (``geometry.resample``) and cast to ``output.dtype``."""
    g = setting(ctx.cfg, "geometry")
    orientation = g.get("orientation")
    for mod in images:
        images[mod], step = geo.reorient(images[mod], orientation)
        if step:
            records[mod]["steps"].append(step)
    if mask is not None:
        mask, _ = geo.reorient(mask, orientation)
    ref = reference_name(ctx, list(images))
    if ref not in images:
        raise DataError(f"reference modality {ref!r} is missing (have {sorted(images)})")
    resample = g["resample"]
    grid = None
    if resample == "reference":
        grid = images[ref]
    elif resample == "spacing":
        grid = geo.spacing_grid(images[ref], g["spacing"])
    interp = str(g["interpolation"])
    dtype = str(setting(ctx.cfg, "output.dtype"))
    min_cov = float(g["min_coverage"])
    transforms = _register(ctx, images, records, ref, warnings)
    if grid is not None:
        target = f"{ref} grid" if resample == "reference" else f"{g['spacing']} mm grid over {ref}"
        for mod in list(images):
            tx = transforms.get(mod)
            if tx is None and geo.same_grid(images[mod], grid):
                continue
            cov = geo.coverage(images[mod], grid, tx)
            records[mod]["coverage_of_grid"] = round(cov, 4)
            if cov < min_cov:
                warnings.append(
                    f"{mod}: covers only {cov:.0%} of the {ref} grid (geometry.min_coverage={min_cov:.0%})"
                )
            images[mod] = geo.resample_onto(images[mod], grid, interp, tx, dtype=dtype)
            records[mod]["steps"].append(f"resampled onto the {target} ({interp})")
        if mask is not None and not geo.same_grid(mask, grid):
            mask = geo.resample_mask(mask, grid)
    elif transforms:
        for mod, tx in transforms.items():
            images[mod] = geo.resample_onto(images[mod], images[mod], interp, tx, dtype=dtype)
    images = {m: cast_output(img, dtype) for m, img in images.items()}
    return _Volumes(images, records, mask, grid, ref)


def _register(
    ctx: Context,
    images: dict[str, sitk.Image],
    records: dict[str, dict[str, Any]],
    ref: str,
    warnings: list[str],
) -> dict[str, sitk.Transform]:
    """Rigid transforms of the modalities of ``geometry.register`` onto ``ref``; a failed or implausible one
    (above ``geometry.registration.max_*``) is warned and not used."""
    reg_cfg = dict(setting(ctx.cfg, "geometry.registration"))
    transforms: dict[str, sitk.Transform] = {}
    for mod in _registration_targets(ctx, list(images), ref):
        try:
            tx, info = geo.register_rigid(images[ref], images[mod], reg_cfg)
        except RuntimeError as exc:
            warnings.append(
                f"{mod}: rigid registration failed ({str(exc).strip().splitlines()[-1][:200]}): not registered"
            )
            continue
        shift = max(abs(t) for t in info["translation_mm_xyz"])
        turn = max(abs(a) for a in info["rotation_deg_xyz"])
        if shift > float(reg_cfg["max_translation_mm"]) or turn > float(reg_cfg["max_rotation_deg"]):
            info["accepted"] = False
            warnings.append(
                f"{mod}: registration result rejected (translation {shift:.1f} mm, rotation {turn:.1f} deg above "
                "geometry.registration.max_*): not registered"
            )
        else:
            info["accepted"] = True
            transforms[mod] = tx
            records[mod]["steps"].append(
                f"rigid registration to {ref}: rotation {info['rotation_deg_xyz']} deg, "
                f"translation {info['translation_mm_xyz']} mm"
            )
        records[mod]["registration"] = info
    return transforms


def _registration_targets(ctx: Context, names: list[str], ref: str) -> list[str]:
    wanted = setting(ctx.cfg, "geometry.register") or []
    if wanted == "all" or wanted == ["all"]:
        return [n for n in names if n != ref]
    return [n for n in names if n in set(wanted) and n != ref]


# ---- regions of interest and cases ----


def _roi_boxes(
    r: Mapping[str, Any], roi_mode: str, study: StudySource, mask: sitk.Image | None, ref_img: sitk.Image
) -> tuple[list[Box], sitk.Image | None]:
    """The boxes of ``roi.mode`` and the image whose grid they are in (none for ``roi.mode=none``)."""
    boxes: list[Box] = []
    if roi_mode == "mask":
        labels = r.get("mask_labels")
        found = mask_boxes(mask, labels, bool(r["components"]), int(r["min_component_voxels"]))
        if not found:
            raise DataError(f"mask is empty (roi.mask_labels={labels})")
        n = len(found)
        for k, b in enumerate(found):
            what = f"component {k + 1} of {n}" if r.get("components") else "whole mask"
            boxes.append(
                (_grow(b, mask, r), {"source": f"mask bounding box ({what})", "mask_box": b.to_dict()}, None)
            )
        return boxes, mask
    if roi_mode == "centre":
        if not study.centres:
            raise DataError("roi.mode=centre but the centres CSV has no row for this case")
        size = dhw_to_xyz(r.get("size") or [16, 64, 64])
        for k, centre in enumerate(study.centres):
            b = centre_box(ref_img, centre["point_lps"], [int(v) for v in size])  # type: ignore[union-attr]
            boxes.append((b, {"source": f"centre {k + 1} of {len(study.centres)}"}, centre.get("label_raw")))
        return boxes, ref_img
    return boxes, None


def _grow(box: IndexBox, image: sitk.Image, r: Mapping[str, Any]) -> IndexBox:
    margin = margin_voxels(image, r.get("margin"), r.get("margin_mm"))
    grown = box.expanded(margin)
    min_size = dhw_to_xyz(r.get("min_size"))
    return grown.at_least([int(v) for v in min_size]) if min_size else grown


def _selected(mask: sitk.Image, labels: Any) -> sitk.Image:
    """The voxels of ``mask`` that count for the region of interest, as 0/1 (for the QA outline)."""
    arr = sitk.GetArrayViewFromImage(mask)
    sel = np.isin(arr, list(labels)) if labels else arr != 0
    out = sitk.GetImageFromArray(sel.astype(np.uint8))
    out.CopyInformation(mask)
    return out


def _whole_case(
    study: StudySource,
    vol: _Volumes,
    save_mask: bool,
    shown_mask: sitk.Image | None,
    warnings: list[str],
) -> BuiltCase:
    """``roi.mode=none``: one case of the whole volumes (the mask kept only when it is on the common grid)."""
    on_grid = vol.grid is not None
    vols = dict(vol.images)
    if save_mask and on_grid:
        vols[MASK] = vol.mask
    rec = {
        "modalities": {m: {**vol.records[m], "output": geo.describe(img)} for m, img in vol.images.items()},
        "roi": {"mode": "none"},
    }
    panels = [Panel(m, img, None, img, shown_mask if on_grid else None) for m, img in vol.images.items()]
    return BuiltCase("0", vols, study.label_raw, dict(study.extra), rec, list(warnings), panels)


def _cropped_case(
    vol: _Volumes,
    box: IndexBox,
    ref_for_boxes: sitk.Image,
    pad: float,
    must_have: set[str],
    save_mask: bool,
    shown_mask: sitk.Image | None,
    case_warn: list[str],
) -> tuple[dict[str, sitk.Image], dict[str, Any], list[str], list[Panel]] | str:
    """Every modality cropped on ``box`` as it lies in that modality's grid: (volumes, modality records,
    warnings, QA panels), or the reason the box gives no case (outside a required modality)."""
    vols: dict[str, sitk.Image] = {}
    panels: list[Panel] = []
    mod_recs: dict[str, Any] = {}
    padded: list[str] = []
    outside: list[str] = []
    for m, img in vol.images.items():
        b = (
            box
            if (ref_for_boxes is img or geo.same_grid(ref_for_boxes, img))
            else box_in_grid(box, ref_for_boxes, img)
        )
        if b.outside(img.GetSize()):
            outside.append(m)
            continue
        if b.leaves(img.GetSize()):
            padded.append(m)
        vols[m] = crop_with_pad(img, b, pad)
        mod_recs[m] = {**vol.records[m], "output": geo.describe(vols[m]), "box": b.to_dict()}
        on_grid = shown_mask is not None and geo.same_grid(shown_mask, img)
        panels.append(Panel(m, img, b, vols[m], shown_mask if on_grid else None))
    lost = [m for m in outside if m in must_have]
    if lost or not vols:
        where = "every modality" if not vols else f"the image of {', '.join(lost)}"
        return (
            f"box {box.to_dict()} lies entirely outside {where} "
            f"(its grid: D, H, W = {list(ref_for_boxes.GetSize()[::-1])})"
        )
    for m in outside:
        case_warn.append(f"{m}: the box lies entirely outside this optional modality's volume: left out")
    if padded:
        which = "every modality" if len(padded) == len(vols) else ", ".join(padded)
        case_warn.append(f"box {box.to_dict()} reaches past the image border ({which}): padded with {pad:g}")
    if save_mask:
        mask = vol.mask
        mb = box if geo.same_grid(ref_for_boxes, mask) else box_in_grid(box, ref_for_boxes, mask)
        vols[MASK] = crop_with_pad(mask, mb, 0)
    return vols, mod_recs, case_warn, panels
