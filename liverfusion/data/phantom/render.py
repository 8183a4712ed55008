"""Rendering one case (in a worker process): the lesion, the liver around it, its vessels and edge, and the
acquisition (bias field, Rician noise, int16) of each phase.

A case is drawn on a canvas larger than the written crop by the largest per-phase shift: the fields that persist
across phases (lesion shape and patterns, textures, vessels, liver edge) are drawn once on the canvas, and each
phase reads its own shifted window of them.

The order of the random draws is part of the data set: every helper draws from the case's one generator, in the
order of :func:`render_case` (anatomy, lesion shape, lesion patterns, textures, vessels, liver edge, atypical
phases, shifts; then per phase: contrast jitter, bias field, noise). Reordering them changes every written byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from liverfusion.data.phantom.plan import CasePlan, case_rng
from liverfusion.data.phantom.spec import class_names, spacing_mm, spec_dict

_COMPARTMENTS = ("core", "rim", "scar", "capsule")  # the contrasts that enhancement, jitter and fat shift


@dataclass
class _Scene:
    """The canvas-sized fields of one case, shared by its phases (each phase reads its own shifted window)."""

    shape: tuple[int, ...]  # the written crop (D, H, W)
    smax: tuple[int, ...]  # the largest shift per axis in voxels: the canvas margin
    rho: np.ndarray  # normalised lesion radius, < 1 inside
    occ: np.ndarray  # lesion occupancy (soft margin)
    nodule: np.ndarray  # (1, H, W) peripheral nodule profile (angular)
    scar_w: np.ndarray  # stellate scar weight
    cap_w: np.ndarray  # capsule weight
    lesion_tex: np.ndarray
    liver_tex: np.ndarray
    vessel: np.ndarray  # vessel weight, kept clear of the lesion
    outside: np.ndarray  # weight of what lies beyond the liver edge


def render_case(spec: Mapping, plan: CasePlan, seed: int) -> tuple[dict, dict, dict]:
    """Render the phases of one case: returns (images {phase: int16 (D,H,W)}, masks {phase: uint8}, metadata)."""
    spec = spec if isinstance(spec, dict) else spec_dict(spec)
    rng = case_rng(seed, plan.pool, plan.patient_index, plan.lesion_index)
    phases, names = spec["phases"], class_names(spec)
    cls_name = names[plan.class_index]
    anatomy = _draw_anatomy(rng, spec["classes"][cls_name]["anatomy"])
    scene = _draw_scene(rng, spec, anatomy)
    atypical = _atypical_phases(rng, spec["cohort"], phases, names, cls_name)
    shifts = {p: [int(rng.integers(-s, s + 1)) for s in scene.smax] for p in phases}
    images, masks = {}, {}
    for phase in phases:
        vals = _phase_contrasts(rng, spec, atypical.get(phase, cls_name), phase, anatomy, plan.patient)
        images[phase], masks[phase] = _render_phase(
            rng, spec, scene, phase, vals, shifts[phase], plan.patient
        )
    return images, masks, _case_meta(plan, cls_name, anatomy, atypical, shifts)


def _case_meta(plan: CasePlan, cls_name: str, anatomy: dict, atypical: dict, shifts: dict) -> dict:
    """The row of cases.csv: ground truth and the nuisance draws a reader may want to condition on."""
    return {
        "case": plan.case_id,
        "patient": plan.patient_id,
        "pool": "labelled" if plan.pool == 0 else "unlabelled",
        "label": plan.label,
        "class": cls_name,
        "atypical": ";".join(f"{p}={c}" for p, c in atypical.items()),
        "radius_mm": round(anatomy["radius_mm"], 3),
        "capsule": int(anatomy["capsule"]),
        "scar": int(anatomy["scar"]),
        "fat_fraction": round(anatomy["fat_fraction"], 3),
        "enhancement": round(plan.patient["enhancement"], 3),
        "shifts": ";".join(f"{p}={s[0]},{s[1]},{s[2]}" for p, s in shifts.items()),
    }


# ---- small helpers ----


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Unit-variance spatially correlated noise (texture fields)."""
    field_ = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), sigma=sigma_vox, mode="reflect"
    )
    std = float(field_.std())
    return field_ / std if std > 0 else field_


def _uniform(rng: np.random.Generator, pair: Sequence[float]) -> float:
    return float(rng.uniform(float(pair[0]), float(pair[1])))


# ---- what persists across the phases of a case ----


def _draw_anatomy(rng: np.random.Generator, anat_cfg: Mapping) -> dict:
    """The lesion's class-linked anatomy: size, shape, margin, rim, capsule, scar, nodules, fat."""
    return {
        "radius_mm": _uniform(rng, anat_cfg["radius_mm"]),
        "elongation": _uniform(rng, anat_cfg["elongation"]),
        "lobulation": _uniform(rng, anat_cfg["lobulation"]),
        "margin_mm": _uniform(rng, anat_cfg["margin_mm"]),
        "rim_frac": _uniform(rng, anat_cfg["rim_frac"]),
        "capsule": bool(rng.random() < float(anat_cfg["capsule_prob"])),
        "capsule_mm": _uniform(rng, anat_cfg["capsule_mm"]),
        "scar": bool(rng.random() < float(anat_cfg["scar_prob"])),
        "scar_frac": _uniform(rng, anat_cfg["scar_frac"]),
        "nodules": int(rng.integers(int(anat_cfg["nodules"][0]), int(anat_cfg["nodules"][1]) + 1)),
        "fat_fraction": _uniform(rng, anat_cfg["fat_fraction"])
        if rng.random() < float(anat_cfg["fat_prob"])
        else 0.0,
    }


def _draw_scene(rng: np.random.Generator, spec: dict, anatomy: dict) -> _Scene:
    """Lesion, textures, vessels and liver edge on the canvas."""
    geo, lesion_cfg, liver_cfg = spec["geometry"], spec["lesion"], spec["liver"]
    shape = tuple(int(s) for s in geo["shape"])
    spacing = np.array(spacing_mm(spec))
    smax = tuple(int(round(float(m) / sp)) for m, sp in zip(geo["max_shift_mm"], spacing))
    canvas = tuple(n + 2 * s for n, s in zip(shape, smax))
    coords, rho, theta, dist_mm = _lesion_shape(rng, geo, lesion_cfg, anatomy, canvas, spacing)
    occ = _sigmoid(-dist_mm / anatomy["margin_mm"] * 2.0)
    nodule, scar_w, cap_w = _lesion_patterns(rng, lesion_cfg, anatomy, rho, theta)
    lesion_tex = _smooth_noise(rng, canvas, [float(lesion_cfg["texture_sigma_mm"]) / s for s in spacing])
    liver_tex = _smooth_noise(rng, canvas, [float(liver_cfg["texture_sigma_mm"]) / s for s in spacing])
    vessel = _vessels(rng, spec["vessels"], coords, canvas, spacing, dist_mm)
    outside = _liver_edge(rng, liver_cfg, coords, canvas, anatomy)
    return _Scene(shape, smax, rho, occ, nodule, scar_w, cap_w, lesion_tex, liver_tex, vessel, outside)


def _lesion_shape(
    rng: np.random.Generator,
    geo: Mapping,
    lesion_cfg: Mapping,
    anatomy: dict,
    canvas: tuple[int, ...],
    spacing: np.ndarray,
) -> tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray, np.ndarray]:
    """The lesion's place and lobulated ellipsoid outline: the canvas coordinates in mm about its centre
    (z, y, x), its normalised radius rho (< 1 inside), the in-plane angle theta, and the approximate signed
    distance to its surface in mm."""
    radius, el = anatomy["radius_mm"], anatomy["elongation"]
    z_scale = _uniform(rng, geo["z_scale"])
    angle = float(rng.uniform(0.0, np.pi))
    jitter = np.array([float(rng.uniform(-j, j)) for j in geo["centre_jitter_mm"]]) / spacing
    centre = (np.array(canvas, dtype=float) - 1.0) / 2.0 + jitter
    z = ((np.arange(canvas[0]) - centre[0]) * spacing[0])[:, None, None].astype(np.float32)
    y = ((np.arange(canvas[1]) - centre[1]) * spacing[1])[None, :, None].astype(np.float32)
    x = ((np.arange(canvas[2]) - centre[2]) * spacing[2])[None, None, :].astype(np.float32)
    ca, sa = math.cos(angle), math.sin(angle)
    u = (x * ca + y * sa) / (radius * el)
    v = (-x * sa + y * ca) / (radius / el)
    w = z / (radius * z_scale)
    rho0 = np.sqrt(u * u + v * v + w * w)
    theta = np.arctan2(v, u)
    harmonics = [int(h) for h in lesion_cfg["lobulation_harmonics"]]
    lob = rng.normal(size=len(harmonics))
    lob *= anatomy["lobulation"] / max(float(np.linalg.norm(lob)), 1e-6)
    lob_phase = rng.uniform(0.0, 2 * np.pi, size=len(harmonics))
    boundary = 1.0 + sum(a * np.cos(h * theta + ph) for a, h, ph in zip(lob, harmonics, lob_phase))
    rho = (rho0 / np.maximum(boundary, 0.5)).astype(np.float32)
    dist_mm = (rho - 1.0) * radius
    return (z, y, x), rho, theta, dist_mm


def _lesion_patterns(
    rng: np.random.Generator, lesion_cfg: Mapping, anatomy: dict, rho: np.ndarray, theta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peripheral nodules (an angular profile), the stellate scar and the capsule, as weights in [0, 1]."""
    blend = float(lesion_cfg["blend"])
    nod_angles = rng.uniform(-np.pi, np.pi, size=anatomy["nodules"])
    width = float(lesion_cfg["nodule_width_rad"])
    nodule = np.zeros_like(theta)
    for a in nod_angles:
        nodule = np.maximum(nodule, np.exp((np.cos(theta - a) - 1.0) / (width * width)))
    spokes = int(rng.integers(int(lesion_cfg["scar_spokes"][0]), int(lesion_cfg["scar_spokes"][1]) + 1))
    spoke_phase = float(rng.uniform(0, 2 * np.pi))
    scar_w = np.zeros_like(rho)
    if anatomy["scar"]:
        arms = np.maximum(np.cos(spokes * theta + spoke_phase), 0.0)
        star = anatomy["scar_frac"] * (1.0 + float(lesion_cfg["scar_star"]) * arms)
        scar_w = _sigmoid((star - rho) / blend)
    cap_w = np.zeros_like(rho)
    if anatomy["capsule"]:
        thick = min(anatomy["capsule_mm"] / anatomy["radius_mm"], 0.4)
        cap_w = _sigmoid((rho - (1.0 - thick)) / float(lesion_cfg["capsule_blend"]))
    return nodule, scar_w, cap_w


def _vessels(
    rng: np.random.Generator,
    ves_cfg: Mapping,
    coords: tuple[np.ndarray, ...],
    canvas: tuple[int, ...],
    spacing: np.ndarray,
    dist_mm: np.ndarray,
) -> np.ndarray:
    """Straight tubes through the canvas, displaced from the lesion by ``clearance_mm``."""
    vessel = np.zeros(canvas, dtype=np.float32)
    n_ves = int(rng.integers(int(ves_cfg["count"][0]), int(ves_cfg["count"][1]) + 1))
    extent = np.array(canvas) * spacing / 2.0
    for _ in range(n_ves):
        p0 = rng.uniform(-extent, extent)
        d = rng.normal(size=3)
        d[0] *= float(ves_cfg["through_plane"])
        d /= np.linalg.norm(d)
        rel = [c - p for c, p in zip(coords, p0)]
        along = rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]
        dist2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - along**2
        r_v = _uniform(rng, ves_cfg["radius_mm"])
        wall = float(ves_cfg["edge_mm"])
        vessel = np.maximum(vessel, _sigmoid((r_v - np.sqrt(np.maximum(dist2, 0.0))) / wall))
    vessel *= _sigmoid((dist_mm - float(ves_cfg["clearance_mm"])) / float(ves_cfg["edge_mm"]))
    return vessel


def _liver_edge(
    rng: np.random.Generator, liver_cfg: Mapping, coords: tuple[np.ndarray, ...], canvas: tuple, anatomy: dict
) -> np.ndarray:
    """For a share of the cases, fat or another organ beyond a plane past the lesion (else zeros)."""
    outside = np.zeros(canvas, dtype=np.float32)
    if rng.random() < float(liver_cfg["edge_share"]):
        z, y, x = coords
        n = rng.normal(size=3)
        n[0] *= float(liver_cfg["edge_through_plane"])
        n /= np.linalg.norm(n)
        reach = anatomy["radius_mm"] * anatomy["elongation"] * (1.0 + anatomy["lobulation"] * 2.0)
        offset = reach + float(liver_cfg["edge_gap_mm"]) + _uniform(rng, liver_cfg["edge_extra_mm"])
        outside = _sigmoid((z * n[0] + y * n[1] + x * n[2] - offset) / float(liver_cfg["edge_softness_mm"]))
    return outside


def _atypical_phases(
    rng: np.random.Generator, coh: Mapping, phases: Sequence[str], names: list[str], cls_name: str
) -> dict[str, str]:
    """Atypical presentation: for a share of the cases some phases borrow another class's appearance."""
    atypical: dict[str, str] = {}
    if rng.random() < float(coh["atypical_share"]):
        k = int(rng.integers(int(coh["atypical_phases"][0]), int(coh["atypical_phases"][1]) + 1))
        others = [n for n in names if n != cls_name]
        for p in rng.choice(len(phases), size=k, replace=False):
            atypical[phases[int(p)]] = others[int(rng.integers(len(others)))]
    return atypical


# ---- one phase ----


def _phase_values(spec: dict, cls_name: str, phase: str, anatomy: dict) -> dict:
    """Compartment contrasts of one class in one phase, tissue defaults filled in."""
    entry = spec["classes"][cls_name]["appearance"][phase]
    core = float(entry["core"])
    return {
        "core": core,
        "rim": float(entry.get("rim", core)),
        "rim_frac": float(entry.get("rim_frac", anatomy["rim_frac"])),
        "nodular": float(entry.get("nodular", 0.0)),
        "scar": float(entry.get("scar", spec["scar"][phase])),
        "capsule": float(entry.get("capsule", spec["capsule"][phase])),
    }


def _phase_contrasts(
    rng: np.random.Generator, spec: dict, src: str, phase: str, anatomy: dict, pat: dict
) -> dict:
    """This case's compartment contrasts in ``phase``: class ``src``'s appearance, mixed toward a neighbouring
    phase by the patient's arterial timing, scaled by the patient's enhancement, jittered, shifted by fat."""
    vals = _phase_values(spec, src, phase, anatomy)
    timing = spec["patient"].get("timing") or {}
    if timing and phase == timing["phase"] and pat["timing_mix"] != 0.0:
        other = timing["late"] if pat["timing_mix"] > 0 else timing["early"]
        mix = abs(pat["timing_mix"])
        ovals = _phase_values(spec, src, other, anatomy)
        vals = {k: (1.0 - mix) * vals[k] + mix * ovals[k] for k in vals}
    if phase in set(spec.get("enhanced_phases", [])):
        for k in _COMPARTMENTS:
            vals[k] *= pat["enhancement"]
    lesion_cfg = spec["lesion"]
    common = float(rng.normal(0.0, float(lesion_cfg["contrast_jitter"])))
    rim_extra = float(rng.normal(0.0, float(lesion_cfg["rim_jitter"])))
    fat_shift = anatomy["fat_fraction"] * float(spec["fat"]["phase_effect"][phase])
    for k in _COMPARTMENTS:
        vals[k] += common + fat_shift
    vals["rim"] += rim_extra
    return vals


def _render_phase(
    rng: np.random.Generator,
    spec: dict,
    scene: _Scene,
    phase: str,
    vals: dict,
    shift: Sequence[int],
    pat: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """(int16 image, uint8 lesion mask) of one phase: its shifted window of the scene, acquired."""
    sl = tuple(slice(s + d, s + d + n) for s, d, n in zip(scene.smax, shift, scene.shape))
    contrast = _lesion_contrast(spec["lesion"], scene, vals, sl)
    bias = _bias_field(rng, spec["acquisition"], scene.shape)
    liver_cfg = spec["liver"]
    base = float(liver_cfg["intensity"][phase]) * pat["gain"][phase]
    tissue = base * bias * (1.0 + float(liver_cfg["texture_sd"]) * scene.liver_tex[sl])
    liver = _liver_signal(spec, scene, phase, pat, tissue, sl)
    lesion = tissue * np.maximum(1.0 + contrast, 0.02)
    o = scene.occ[sl]
    img = liver * (1.0 - o) + lesion * o
    out = scene.outside[sl]
    img = img * (1.0 - out) + base * bias * float(liver_cfg["outside"][phase]) * out
    image = _acquire(rng, img, pat["noise_rel"][phase] * base, scene.shape)
    return image, (scene.rho[sl] < 1.0).astype(np.uint8)


def _lesion_contrast(lesion_cfg: Mapping, scene: _Scene, vals: dict, sl: tuple[slice, ...]) -> np.ndarray:
    """Relative lesion contrast per voxel: core to rim (nodular where the class is), scar, capsule, texture."""
    r = scene.rho[sl]
    sl2 = (slice(None), sl[1], sl[2])  # theta-only fields are (1, H, W)
    rim_w = _sigmoid((r - (1.0 - vals["rim_frac"])) / float(lesion_cfg["blend"]))
    if vals["nodular"] > 0:
        rim_w = rim_w * (1.0 - vals["nodular"] + vals["nodular"] * scene.nodule[sl2])
    contrast = vals["core"] + (vals["rim"] - vals["core"]) * rim_w
    contrast = contrast + (vals["scar"] - contrast) * scene.scar_w[sl]
    contrast = contrast + (vals["capsule"] - contrast) * scene.cap_w[sl]
    return contrast + float(lesion_cfg["texture_sd"]) * scene.lesion_tex[sl]


def _liver_signal(
    spec: dict, scene: _Scene, phase: str, pat: dict, tissue: np.ndarray, sl: tuple[slice, ...]
) -> np.ndarray:
    """Liver parenchyma: the tissue signal, shifted by the patient's steatosis, with its vessels."""
    liver = tissue * (1.0 + pat["steatosis"] * float(spec["fat"]["phase_effect"][phase]))
    ves = scene.vessel[sl]
    return liver * (1.0 - ves) + tissue * (1.0 + float(spec["vessels"]["contrast"][phase])) * ves


def _bias_field(rng: np.random.Generator, acq: Mapping, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth multiplicative coil bias over the crop (weaker through plane)."""
    bias_c = rng.normal(size=5) * float(acq["bias_amplitude"]) / math.sqrt(5.0)
    grid = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    gz, gy, gx = grid[0][:, None, None], grid[1][None, :, None], grid[2][None, None, :]
    bz = float(acq["bias_through_plane"])
    return np.exp(
        bias_c[0] * gx + bias_c[1] * gy + bias_c[2] * bz * gz + bias_c[3] * gx * gy + bias_c[4] * gx * gx
    )


def _acquire(rng: np.random.Generator, img: np.ndarray, sigma: float, shape: tuple[int, ...]) -> np.ndarray:
    """Rician noise of scale ``sigma`` (the magnitude of a complex signal with Gaussian noise), then int16."""
    n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2**2)
    return np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)
