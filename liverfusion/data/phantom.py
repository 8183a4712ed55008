"""The embedded multi-phase liver lesion phantom: an LLD-MMRI-shaped data set that *needs* multi-phase fusion.

Why it exists: the real LLD-MMRI data cannot be shipped, yet the pipeline (MDA pairs, SimSiam, CGC fusion) must be
runnable and testable end to end, and a test must be able to tell a fusion model from a single-phase one. The
phantom writes the LLD-MMRI crop layout (``images/<case>/<Phase>.nii.gz``, ``labels.txt``) so the real reader is
exercised, plus sidecars that training never reads (``masks/<case>/<Phase>.nii.gz``: one uint8 lesion mask per
phase, aligned with that phase's shifted crop; ``cases.csv``: ground truth per case; ``phantom.json``: provenance).

How it needs fusion: each of the 7 classes follows its textbook enhancement pattern (conf/phantom/default.yaml), but
in any one phase several classes look alike (e.g. hemangioma and cyst are both very bright on T2WI, hemangioma,
ICC, abscess and metastasis all rim-enhance in C+A, HCC and FNH both enhance intensely), so only the combination of
phases names the class. Per-lesion per-phase jitter, patient enhancement strength, arterial timing, per-phase gain,
bias field, Rician noise, liver texture, vessels, liver edges and atypical phases blur each single phase further.
Anatomy that persists across the phases of a case (size, elongation, lobulation, margin, rim width, capsule, scar)
is drawn from class-linked but overlapping ranges: a phase-invariant signal for a weight-sharing encoder that does
not name the class by itself.

Expected ceiling (default spec, 700 labelled cases, 5-fold patient-grouped CV of a standardised logistic regression
on 2 features per phase -- lesion-to-liver contrast and rim-minus-core contrast, see :func:`fusion_probe`): all 8
phases (16 features) reach macro-F1 0.925-0.944 on the tuning seeds, the best single phase (C+A or DWI) 0.48-0.53,
the unenhanced T1 phases about 0.25-0.30, lesion size alone about 0.10. Test seed 20231: 0.929 vs 0.545 (C+A).
Per-seed tables are in docs/phantom.md.
Tuning seeds (used while choosing the numbers in default.yaml): 101, 102, 103, 104. The CLI's default seed is 7;
tests/test_phantom.py checks the fusion gap with seed 20231, which no tuning used.

Determinism: every case draws from ``SeedSequence(seed, spawn_key=(pool, patient, lesion))`` and every patient from
``SeedSequence(seed, spawn_key=(pool, patient))``, never from process order, so any worker count writes the same
bytes; nibabel's gzip writer uses mtime 0 and no file name (checked by a test).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import ndimage

from liverfusion import __version__
from liverfusion.data.io import load_volume, save_volume
from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.atomic import atomic_write_text
from liverfusion.utils.locks import FileLock

log = logging.getLogger(__name__)

FORMAT = "liverfusion-phantom"
FORMAT_VERSION = 1
SPEC_DIR = Path(__file__).resolve().parent.parent / "conf" / "phantom"
POOLS = ("P", "U")  # case-name prefix of the labelled pool and of the unlabelled pre-training pool

__all__ = [
    "CasePlan",
    "fusion_probe",
    "generate_phantom",
    "load_phantom_spec",
    "measure_lesion_features",
    "plan_cases",
    "read_phantom_features",
    "render_case",
    "spec_hash",
    "validate_spec",
]


# ----------------------------------------------------------------------------------------------------------------
# Spec loading and validation
# ----------------------------------------------------------------------------------------------------------------


def _to_plain(cfg: Any) -> dict:
    """DictConfig or mapping -> plain nested dict (resolving interpolations)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"phantom spec must be a mapping, got {type(cfg).__name__}")
    return json.loads(json.dumps(cfg))


def load_phantom_spec(name_or_path: str | Path) -> dict:
    """Load a spec by name (a file in liverfusion/conf/phantom/) or by path to a YAML file; validated."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = SPEC_DIR / f"{text}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))
        raise ConfigError(f"phantom spec {text!r} not found (neither a YAML file nor one of {known})")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"phantom spec {path}: invalid YAML ({exc})") from None
    return validate_spec(spec, source=str(path))


def _range(value: Any, key: str) -> tuple[float, float]:
    if not (
        isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
    ):
        raise ConfigError(f"phantom spec: {key} must be a [lo, hi] pair of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise ConfigError(f"phantom spec: {key} has lo > hi ({lo} > {hi})")
    return lo, hi


def _number(value: Any, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"phantom spec: {key} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _per_phase(table: Any, phases: Sequence[str], key: str) -> None:
    if not isinstance(table, Mapping):
        raise ConfigError(f"phantom spec: {key} must map every phase to a value")
    missing = [p for p in phases if p not in table]
    if missing:
        raise ConfigError(f"phantom spec: {key} lacks phases {missing}")


_REQUIRED = {
    "geometry": ("shape", "field_of_view_mm", "max_shift_mm", "centre_jitter_mm", "z_scale"),
    "cohort": ("two_lesion_share", "second_same_class", "atypical_share", "atypical_phases"),
    "patient": ("enhancement_sd", "gain_sd", "steatosis_share", "steatosis_fraction"),
    "liver": (
        "intensity",
        "texture_sd",
        "texture_sigma_mm",
        "edge_share",
        "edge_gap_mm",
        "edge_extra_mm",
        "edge_softness_mm",
        "edge_through_plane",
        "outside",
    ),
    "fat": ("phase_effect",),
    "vessels": ("count", "radius_mm", "clearance_mm", "edge_mm", "through_plane", "contrast"),
    "acquisition": ("bias_amplitude", "bias_through_plane", "noise_rel"),
    "lesion": (
        "contrast_jitter",
        "rim_jitter",
        "texture_sd",
        "texture_sigma_mm",
        "blend",
        "capsule_blend",
        "nodule_width_rad",
        "lobulation_harmonics",
        "scar_spokes",
        "scar_star",
    ),
    "probe": ("core_erosion_vox", "ring_vox", "folds", "C"),
}
_ANATOMY_RANGES = (
    "radius_mm",
    "elongation",
    "lobulation",
    "margin_mm",
    "rim_frac",
    "capsule_mm",
    "scar_frac",
)
_ANATOMY_PROBS = ("capsule_prob", "scar_prob", "fat_prob")
_APPEARANCE_KEYS = {"core", "rim", "rim_frac", "nodular", "scar", "capsule"}


def validate_spec(spec: Any, source: str = "phantom spec") -> dict:
    """Check a spec's structure and ranges; returns it as a plain dict. Errors name the offending key."""
    spec = _to_plain(spec)
    for section in ("phases", "classes", "scar", "capsule", *_REQUIRED):
        if section not in spec:
            raise ConfigError(f"{source}: missing section {section!r}")
    for section, keys in _REQUIRED.items():
        missing = [k for k in keys if not isinstance(spec[section], Mapping) or k not in spec[section]]
        if missing:
            raise ConfigError(f"{source}: {section} lacks keys {missing}")
    geo, phases, classes = spec["geometry"], list(spec["phases"]), spec["classes"]
    if len(set(phases)) != len(phases) or not phases:
        raise ConfigError(f"{source}: phases must be a non-empty list of distinct names, got {phases}")
    shape = geo.get("shape")
    if not (
        isinstance(shape, Sequence) and len(shape) == 3 and all(isinstance(s, int) and s >= 8 for s in shape)
    ):
        raise ConfigError(f"{source}: geometry.shape must be three integers >= 8 (D, H, W), got {shape!r}")
    for key in ("field_of_view_mm", "max_shift_mm", "centre_jitter_mm"):
        val = geo.get(key)
        if not (
            isinstance(val, Sequence)
            and len(val) == 3
            and all(isinstance(v, int | float) and v >= 0 for v in val)
        ):
            raise ConfigError(f"{source}: geometry.{key} must be three non-negative numbers, got {val!r}")
    if min(geo["field_of_view_mm"]) <= 0:
        raise ConfigError(
            f"{source}: geometry.field_of_view_mm must be positive, got {geo['field_of_view_mm']!r}"
        )
    _range(geo.get("z_scale"), "geometry.z_scale")
    unknown = [p for p in spec.get("enhanced_phases", []) if p not in phases]
    if unknown:
        raise ConfigError(f"{source}: enhanced_phases {unknown} are not in phases")
    for key in (
        "liver.intensity",
        "liver.outside",
        "fat.phase_effect",
        "vessels.contrast",
        "acquisition.noise_rel",
    ):
        sec, sub = key.split(".")
        _per_phase(spec[sec].get(sub), phases, key)
    _per_phase(spec["scar"], phases, "scar")
    _per_phase(spec["capsule"], phases, "capsule")
    for p in phases:
        _range(spec["acquisition"]["noise_rel"][p], f"acquisition.noise_rel.{p}")
        _number(spec["liver"]["intensity"][p], f"liver.intensity.{p}", 1.0, 20000.0)
    timing = spec["patient"].get("timing") or {}
    for k in ("phase", "early", "late"):
        if timing and timing.get(k) not in phases:
            raise ConfigError(
                f"{source}: patient.timing.{k} must be one of the phases, got {timing.get(k)!r}"
            )
    coh = spec["cohort"]
    for k in ("two_lesion_share", "second_same_class", "atypical_share"):
        _number(coh.get(k), f"cohort.{k}", 0.0, 1.0)
    lo, hi = _range(coh.get("atypical_phases"), "cohort.atypical_phases")
    if lo < 1 or hi > len(phases):
        raise ConfigError(f"{source}: cohort.atypical_phases must lie in [1, {len(phases)}]")
    if not isinstance(classes, Mapping) or len(classes) < 2:
        raise ConfigError(f"{source}: classes must map at least two class names to their parameters")
    labels = []
    for name, cls in classes.items():
        where = f"classes.{name}"
        if not isinstance(cls, Mapping):
            raise ConfigError(f"{source}: {where} must be a mapping")
        labels.append(cls.get("label"))
        _number(cls.get("weight"), f"{where}.weight", 0.0)
        anatomy = cls.get("anatomy") or {}
        for k in _ANATOMY_RANGES:
            _range(anatomy.get(k), f"{where}.anatomy.{k}")
        _range(anatomy.get("nodules"), f"{where}.anatomy.nodules")
        _range(anatomy.get("fat_fraction"), f"{where}.anatomy.fat_fraction")
        for k in _ANATOMY_PROBS:
            _number(anatomy.get(k), f"{where}.anatomy.{k}", 0.0, 1.0)
        if anatomy["radius_mm"][0] <= 0:
            raise ConfigError(f"{source}: {where}.anatomy.radius_mm must be positive")
        app = cls.get("appearance")
        _per_phase(app, phases, f"{where}.appearance")
        for p in phases:
            entry = app[p]
            if not isinstance(entry, Mapping) or "core" not in entry:
                raise ConfigError(f"{source}: {where}.appearance.{p} must be a mapping with at least 'core'")
            bad = set(entry) - _APPEARANCE_KEYS
            if bad:
                raise ConfigError(f"{source}: {where}.appearance.{p} has unknown keys {sorted(bad)}")
            for k, v in entry.items():
                lo, hi = (0.0, 1.0) if k in ("rim_frac", "nodular") else (-1.0, 5.0)
                _number(v, f"{where}.appearance.{p}.{k}", lo, hi)
    if sorted(labels) != list(range(len(classes))):
        raise ConfigError(f"{source}: class labels must be 0..{len(classes) - 1}, each once; got {labels}")
    if sum(float(c["weight"]) for c in classes.values()) <= 0:
        raise ConfigError(f"{source}: class weights sum to zero")
    return spec


def spec_hash(spec: Mapping) -> str:
    """Stable content hash of a spec (canonical JSON): names the appearance model in phantom.json."""
    blob = json.dumps(_to_plain(spec), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def spacing_mm(spec: Mapping) -> tuple[float, float, float]:
    """Voxel spacing (sD, sH, sW): the field of view spread over the shape, as when crops are resized."""
    fov, shape = spec["geometry"]["field_of_view_mm"], spec["geometry"]["shape"]
    return tuple(float(f) / int(n) for f, n in zip(fov, shape))  # type: ignore[return-value]


def class_names(spec: Mapping) -> list[str]:
    """Class names in label order."""
    return [name for name, _ in sorted(spec["classes"].items(), key=lambda kv: kv[1]["label"])]


# ----------------------------------------------------------------------------------------------------------------
# Planning: who is who (cheap, main process)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CasePlan:
    """One lesion crop to render: identity, class and the patient-level draws it shares with its sibling lesion."""

    case_id: str
    patient_id: str
    pool: int
    patient_index: int
    lesion_index: int
    class_index: int
    label: int
    patient: dict = field(default_factory=dict)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def _patient_draws(spec: dict, rng: np.random.Generator) -> dict:
    pat, acq, phases = spec["patient"], spec["acquisition"], spec["phases"]
    timing = pat.get("timing") or {}
    fatty = rng.random() < float(pat["steatosis_share"])
    return {
        "enhancement": float(np.exp(rng.normal(0.0, float(pat["enhancement_sd"])))),
        "timing_mix": float(rng.uniform(-1.0, 1.0) * float(timing.get("max_mix", 0.0))),
        "gain": {p: float(np.exp(rng.normal(0.0, float(pat["gain_sd"])))) for p in phases},
        "noise_rel": {p: float(rng.uniform(*acq["noise_rel"][p])) for p in phases},
        "steatosis": float(rng.uniform(*pat["steatosis_fraction"])) if fatty else 0.0,
    }


def plan_cases(spec: Mapping, seed: int, n_cases: int, n_unlabelled: int = 0) -> list[CasePlan]:
    """Patients and their lesions, in name order. Patient ``i`` of a pool depends only on (seed, pool, i), so a
    smaller data set is a prefix of a larger one with the same seed."""
    spec = validate_spec(spec)
    names = class_names(spec)
    weights = np.array([float(spec["classes"][n]["weight"]) for n in names])
    weights = weights / weights.sum()
    coh = spec["cohort"]
    plans: list[CasePlan] = []
    for pool, count in enumerate((int(n_cases), int(n_unlabelled))):
        if count < 0:
            raise ConfigError(f"number of cases must be >= 0, got {count}")
        width = max(4, len(str(count)))
        made, i = 0, 0
        while made < count:
            rng = _rng(seed, pool, i)
            n_les = 2 if rng.random() < float(coh["two_lesion_share"]) else 1
            first = int(rng.choice(len(names), p=weights))
            second = (
                first
                if rng.random() < float(coh["second_same_class"])
                else int(rng.choice(len(names), p=weights))
            )
            patient = _patient_draws(spec, rng)
            pid = f"{POOLS[pool]}{i + 1:0{width}d}"
            for k, cls in enumerate((first, second)[: min(n_les, count - made)]):
                case_id = pid if k == 0 else f"{pid}_{k}"
                label = cls if pool == 0 else -1
                plans.append(CasePlan(case_id, pid, pool, i, k, cls, label, patient))
                made += 1
            i += 1
    return plans


# ----------------------------------------------------------------------------------------------------------------
# Rendering one case (worker process)
# ----------------------------------------------------------------------------------------------------------------


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


def render_case(spec: Mapping, plan: CasePlan, seed: int) -> tuple[dict, dict, dict]:
    """Render the phases of one case: returns (images {phase: int16 (D,H,W)}, masks {phase: uint8}, metadata)."""
    spec = spec if isinstance(spec, dict) else _to_plain(spec)
    rng = _rng(seed, plan.pool, plan.patient_index, plan.lesion_index)
    phases, names = spec["phases"], class_names(spec)
    geo, lesion_cfg, liver_cfg, ves_cfg = spec["geometry"], spec["lesion"], spec["liver"], spec["vessels"]
    cls_name = names[plan.class_index]
    anat_cfg = spec["classes"][cls_name]["anatomy"]
    pat = plan.patient

    shape = tuple(int(s) for s in geo["shape"])
    spacing = np.array(spacing_mm(spec))
    smax = tuple(int(round(float(m) / sp)) for m, sp in zip(geo["max_shift_mm"], spacing))
    canvas = tuple(n + 2 * s for n, s in zip(shape, smax))

    # --- anatomy: persists across phases ---
    anatomy = {
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
    radius = anatomy["radius_mm"]
    z_scale = _uniform(rng, geo["z_scale"])
    angle = float(rng.uniform(0.0, np.pi))
    jitter = np.array([float(rng.uniform(-j, j)) for j in geo["centre_jitter_mm"]]) / spacing
    centre = (np.array(canvas, dtype=float) - 1.0) / 2.0 + jitter
    z = ((np.arange(canvas[0]) - centre[0]) * spacing[0])[:, None, None].astype(np.float32)
    y = ((np.arange(canvas[1]) - centre[1]) * spacing[1])[None, :, None].astype(np.float32)
    x = ((np.arange(canvas[2]) - centre[2]) * spacing[2])[None, None, :].astype(np.float32)
    ca, sa = math.cos(angle), math.sin(angle)
    el = anatomy["elongation"]
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
    dist_mm = (rho - 1.0) * radius  # approximate signed distance to the lesion surface
    occ = _sigmoid(-dist_mm / anatomy["margin_mm"] * 2.0)
    blend = float(lesion_cfg["blend"])

    # nodules (peripheral nodular enhancement) and stellate scar, as angular profiles
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
        thick = min(anatomy["capsule_mm"] / radius, 0.4)
        cap_w = _sigmoid((rho - (1.0 - thick)) / float(lesion_cfg["capsule_blend"]))
    tex_vox = [float(lesion_cfg["texture_sigma_mm"]) / s for s in spacing]
    lesion_tex = _smooth_noise(rng, canvas, tex_vox)
    liver_tex = _smooth_noise(rng, canvas, [float(liver_cfg["texture_sigma_mm"]) / s for s in spacing])

    # --- vessels, displaced from the lesion ---
    coords = (z, y, x)
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

    # --- liver edge (fat / other organ beyond a plane) ---
    outside = np.zeros(canvas, dtype=np.float32)
    if rng.random() < float(liver_cfg["edge_share"]):
        n = rng.normal(size=3)
        n[0] *= float(liver_cfg["edge_through_plane"])
        n /= np.linalg.norm(n)
        reach = radius * el * (1.0 + anatomy["lobulation"] * 2.0)
        offset = reach + float(liver_cfg["edge_gap_mm"]) + _uniform(rng, liver_cfg["edge_extra_mm"])
        outside = _sigmoid((z * n[0] + y * n[1] + x * n[2] - offset) / float(liver_cfg["edge_softness_mm"]))

    # --- atypical presentation: some phases borrow another class's appearance ---
    atypical: dict[str, str] = {}
    coh = spec["cohort"]
    if rng.random() < float(coh["atypical_share"]):
        k = int(rng.integers(int(coh["atypical_phases"][0]), int(coh["atypical_phases"][1]) + 1))
        others = [n for n in names if n != cls_name]
        for p in rng.choice(len(phases), size=k, replace=False):
            atypical[phases[int(p)]] = others[int(rng.integers(len(others)))]

    shifts = {p: [int(rng.integers(-s, s + 1)) for s in smax] for p in phases}
    timing = spec["patient"].get("timing") or {}
    enhanced = set(spec.get("enhanced_phases", []))
    grid = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    gz, gy, gx = grid[0][:, None, None], grid[1][None, :, None], grid[2][None, None, :]
    images, masks = {}, {}
    for phase in phases:
        src = atypical.get(phase, cls_name)
        vals = _phase_values(spec, src, phase, anatomy)
        if timing and phase == timing["phase"] and pat["timing_mix"] != 0.0:
            other = timing["late"] if pat["timing_mix"] > 0 else timing["early"]
            mix = abs(pat["timing_mix"])
            ovals = _phase_values(spec, src, other, anatomy)
            vals = {k: (1.0 - mix) * vals[k] + mix * ovals[k] for k in vals}
        if phase in enhanced:
            for k in ("core", "rim", "scar", "capsule"):
                vals[k] *= pat["enhancement"]
        common = float(rng.normal(0.0, float(lesion_cfg["contrast_jitter"])))
        rim_extra = float(rng.normal(0.0, float(lesion_cfg["rim_jitter"])))
        fat_shift = anatomy["fat_fraction"] * float(spec["fat"]["phase_effect"][phase])
        for k in ("core", "rim", "scar", "capsule"):
            vals[k] += common + fat_shift
        vals["rim"] += rim_extra
        bias_c = rng.normal(size=5) * float(spec["acquisition"]["bias_amplitude"]) / math.sqrt(5.0)

        dz, dy, dx = shifts[phase]
        sl = tuple(slice(s + d, s + d + n) for s, d, n in zip(smax, (dz, dy, dx), shape))
        r = rho[sl]
        sl2 = (slice(None), sl[1], sl[2])  # theta-only fields are (1, H, W)
        rim_w = _sigmoid((r - (1.0 - vals["rim_frac"])) / blend)
        if vals["nodular"] > 0:
            rim_w = rim_w * (1.0 - vals["nodular"] + vals["nodular"] * nodule[sl2])
        contrast = vals["core"] + (vals["rim"] - vals["core"]) * rim_w
        contrast = contrast + (vals["scar"] - contrast) * scar_w[sl]
        contrast = contrast + (vals["capsule"] - contrast) * cap_w[sl]
        contrast = contrast + float(lesion_cfg["texture_sd"]) * lesion_tex[sl]

        bz = float(spec["acquisition"]["bias_through_plane"])
        bias = np.exp(
            bias_c[0] * gx + bias_c[1] * gy + bias_c[2] * bz * gz + bias_c[3] * gx * gy + bias_c[4] * gx * gx
        )
        base = float(liver_cfg["intensity"][phase]) * pat["gain"][phase]
        tissue = base * bias * (1.0 + float(liver_cfg["texture_sd"]) * liver_tex[sl])
        liver = tissue * (1.0 + pat["steatosis"] * float(spec["fat"]["phase_effect"][phase]))
        ves = vessel[sl]
        liver = liver * (1.0 - ves) + tissue * (1.0 + float(ves_cfg["contrast"][phase])) * ves
        lesion = tissue * np.maximum(1.0 + contrast, 0.02)
        o = occ[sl]
        img = liver * (1.0 - o) + lesion * o
        out = outside[sl]
        img = img * (1.0 - out) + base * bias * float(liver_cfg["outside"][phase]) * out
        sigma = pat["noise_rel"][phase] * base
        n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
        img = np.sqrt((img + n1) ** 2 + n2**2)
        images[phase] = np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)
        masks[phase] = (r < 1.0).astype(np.uint8)

    meta = {
        "case": plan.case_id,
        "patient": plan.patient_id,
        "pool": "labelled" if plan.pool == 0 else "unlabelled",
        "label": plan.label,
        "class": cls_name,
        "atypical": ";".join(f"{p}={c}" for p, c in atypical.items()),
        "radius_mm": round(radius, 3),
        "capsule": int(anatomy["capsule"]),
        "scar": int(anatomy["scar"]),
        "fat_fraction": round(anatomy["fat_fraction"], 3),
        "enhancement": round(pat["enhancement"], 3),
        "shifts": ";".join(f"{p}={s[0]},{s[1]},{s[2]}" for p, s in shifts.items()),
    }
    return images, masks, meta


# ----------------------------------------------------------------------------------------------------------------
# Writing a data set
# ----------------------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(spec: dict, seed: int, root: str) -> None:
    _WORKER.update(spec=spec, seed=seed, root=Path(root))


def _write_case(plan: CasePlan) -> dict:
    spec, seed, root = _WORKER["spec"], _WORKER["seed"], _WORKER["root"]
    images, masks, meta = render_case(spec, plan, seed)
    spacing = spacing_mm(spec)
    for phase in spec["phases"]:
        save_volume(
            root / "images" / plan.case_id / f"{phase}.nii.gz", images[phase], spacing, dtype=np.int16
        )
        save_volume(root / "masks" / plan.case_id / f"{phase}.nii.gz", masks[phase], spacing, dtype=np.uint8)
    return meta


def _read_marker(folder: Path) -> dict | None:
    marker = folder / "phantom.json"
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and info.get("format") == FORMAT else None


def _request(spec: dict, seed: int, n_cases: int, n_unlabelled: int) -> dict:
    return {
        "spec_name": spec.get("name", ""),
        "spec_hash": spec_hash(spec),
        "seed": int(seed),
        "n_cases": int(n_cases),
        "n_unlabelled": int(n_unlabelled),
        "shape": list(spec["geometry"]["shape"]),
        "package_version": __version__,
    }


def _pool_map(func, items: list, workers: int, initargs: tuple | None, progress: bool, desc: str) -> list:
    """Map in worker processes (order of results = order of items); a tqdm bar on stderr."""
    from tqdm.auto import tqdm

    results: list = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress, leave=False)
    try:
        if workers <= 1:
            if initargs is not None:
                _init_worker(*initargs)
            for i, item in enumerate(items):
                results[i] = func(item)
                bar.update(1)
        else:
            # forkserver/spawn, not fork: the caller may hold threads (tqdm's monitor, torch pools)
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            chunk = max(1, min(8, len(items) // (workers * 8) or 1))
            init = _init_worker if initargs is not None else None
            with ctx.Pool(workers, initializer=init, initargs=initargs or ()) as pool:
                for i, res in enumerate(pool.imap(func, items, chunksize=chunk)):
                    results[i] = res
                    bar.update(1)
    finally:
        bar.close()
    return results


def generate_phantom(
    out_dir: str | Path,
    cfg: Mapping | str | Path = "default",
    seed: int = 7,
    n_cases: int = 450,
    n_unlabelled: int = 0,
    workers: int = 1,
    shape: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a phantom data set to ``out_dir`` and return its summary (the content of phantom.json).

    ``cfg`` is a spec (dict/DictConfig) or a spec name/path. ``shape`` (D, H, W) overrides the spec's.
    Existing ``out_dir``: empty -> used; a phantom with the same request (spec hash, seed, counts, shape, version)
    -> skipped, its summary returned, unless ``overwrite`` (a phantom.json whose files are not all there is a
    DataError, never used); another phantom -> ConfigError unless ``overwrite``; anything else -> refused
    (DataError), never deleted. The set is built in a sibling temporary folder and renamed into place, so
    ``out_dir`` never holds a half-written phantom.

    Concurrency: the whole call holds a lock (``.<name>.lock`` next to ``out_dir``), so processes asking for the
    same phantom at once (multirun jobs, DDP ranks, benchmark workers) write it once: the others wait, then find it
    and return its summary. Temporary folders of a killed writer are removed by the next one. A read-only parent
    folder (no lock possible) still serves a complete matching phantom.
    """
    spec = load_phantom_spec(cfg) if isinstance(cfg, str | Path) else validate_spec(cfg)
    if shape is not None:
        spec["geometry"]["shape"] = [int(s) for s in shape]
        spec = validate_spec(spec)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir).expanduser().resolve()
    request = _request(spec, seed, n_cases, n_unlabelled)
    lock = FileLock(out.parent / f".{out.name}.lock", what=f"phantom {out} (another process is writing it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError:
        previous = _existing(out, request, overwrite)
        if previous is not None:  # read-only location: reading needs no lock, the folder is complete
            return previous
        raise
    try:
        previous = _existing(out, request, overwrite)
        if previous is not None:
            return previous
        _remove_leftovers(out)
        return _write_phantom(out, spec, request, seed, n_cases, n_unlabelled, workers, progress)
    finally:
        lock.release()


def _existing(out: Path, request: dict, overwrite: bool) -> dict | None:
    """The summary of the phantom already at ``out`` when it is the one requested and complete; None when ``out``
    is to be (re)written; an error when it must not be."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError("output path exists and is not a folder", path=out)
    if not any(out.iterdir()):
        return None
    previous = _read_marker(out)
    if previous is None:
        raise DataError(
            "output folder is not empty and is not a liverfusion phantom (no phantom.json): refusing to "
            "write into it; choose an empty or new folder",
            path=out,
        )
    if overwrite:
        return None
    if not all(previous.get(k) == v for k, v in request.items()):
        diff = sorted(k for k, v in request.items() if previous.get(k) != v)
        raise ConfigError(
            f"{out} holds a phantom made with different settings ({', '.join(diff)}); "
            "pass overwrite=true to replace it or choose another folder"
        )
    missing = _missing_files(out, previous)
    if missing:
        raise DataError(
            f"phantom folder is incomplete: {len(missing)} file(s) missing, e.g. {missing[0]}",
            path=out,
            fix="pass overwrite=true to write it again, or delete the folder",
        )
    return previous


def _missing_files(out: Path, info: Mapping) -> list[str]:
    """Files a phantom with marker ``info`` must hold and ``out`` lacks (relative names; cheap: stats only)."""
    missing = [name for name in ("labels.txt", "cases.csv") if not (out / name).is_file()]
    if missing:
        return missing
    cases = [line.split()[0] for line in (out / "labels.txt").read_text().splitlines() if line.strip()]
    want = int(info.get("n_cases", 0)) + int(info.get("n_unlabelled", 0))
    if len(cases) != want:
        return [f"labels.txt lists {len(cases)} cases, phantom.json {want}"]
    for case in cases:
        for phase in info.get("phases", []):
            for sub in ("images", "masks"):
                rel = f"{sub}/{case}/{phase}.nii.gz"
                if not (out / rel).is_file():
                    missing.append(rel)
    return missing


def _leftover(out: Path, name: str) -> bool:
    """Whether sibling ``name`` is a temporary folder (``mkdtemp``'s 8 random characters) of a phantom at ``out``."""
    return any(
        re.fullmatch(re.escape(f".{out.name}.{kind}-") + r"[a-z0-9_]{8}", name) for kind in ("partial", "old")
    )


def _remove_leftovers(out: Path) -> None:
    """Delete temporary folders of writers that were killed (only called while holding the phantom's lock)."""
    for sibling in out.parent.iterdir():
        if sibling.is_dir() and not sibling.is_symlink() and _leftover(out, sibling.name):
            log.info("removing %s, left by an interrupted phantom writer", sibling)
            shutil.rmtree(sibling, ignore_errors=True)


def _write_phantom(
    out: Path,
    spec: dict,
    request: dict,
    seed: int,
    n_cases: int,
    n_unlabelled: int,
    workers: int,
    progress: bool,
) -> dict:
    plans = plan_cases(spec, seed, n_cases, n_unlabelled)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the data set should follow the user's umask
    try:
        metas = _pool_map(_write_case, plans, workers, (spec, int(seed), str(tmp)), progress, "phantom")
        labels = "".join(f"{m['case']} {m['label']}\n" for m in metas)
        atomic_write_text(tmp / "labels.txt", labels)
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, fieldnames=list(metas[0].keys()) if metas else ["case"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(metas)
        atomic_write_text(tmp / "cases.csv", buf.getvalue())
        names = class_names(spec)
        labelled = [m for m in metas if m["pool"] == "labelled"]
        patients = {m["patient"] for m in metas}
        summary = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **request,
            "n_patients": len(patients),
            "two_lesion_patients": sum(1 for m in metas if m["case"].endswith("_1")),
            "class_counts": {n: sum(1 for m in labelled if m["class"] == n) for n in names},
            "class_names": names,
            "phases": list(spec["phases"]),
            "spacing_mm": list(spacing_mm(spec)),
            "layout": {
                "images": "images/<case>/<Phase>.nii.gz (int16)",
                "masks": "masks/<case>/<Phase>.nii.gz (uint8, aligned with that phase; not for training)",
                "labels": "labels.txt: '<case> <label>', -1 = unlabelled",
                "truth": "cases.csv: per-case ground truth and nuisance draws",
            },
            "spec": spec,
        }
        # the marker last: a folder with phantom.json is complete (and the whole folder is renamed into place)
        atomic_write_text(tmp / "phantom.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The fusion probe: simple per-phase features measured from the written files
# ----------------------------------------------------------------------------------------------------------------


def measure_lesion_features(
    image: np.ndarray, mask: np.ndarray, core_erosion_vox: int = 2, ring_vox: Sequence[int] = (2, 6)
) -> tuple[float, float]:
    """(lesion-to-liver contrast, rim-minus-core contrast), both divided by the liver signal.

    core = mask eroded in-plane ``core_erosion_vox`` times, rim = mask - core (core = whole mask when erosion empties
    it), liver = median of the in-plane ring between dilations ``ring_vox[0]`` and ``ring_vox[1]`` of the mask.
    """
    m = np.asarray(mask) > 0
    if not m.any():
        raise DataError("lesion mask is empty")
    st = np.zeros((3, 3, 3), dtype=bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_erosion(m, st, iterations=int(core_erosion_vox)) if core_erosion_vox > 0 else m
    if not core.any():
        core = m
    rim = m & ~core
    if not rim.any():
        rim = m
    inner = ndimage.binary_dilation(m, st, iterations=int(ring_vox[0]))
    outer = ndimage.binary_dilation(m, st, iterations=int(ring_vox[1]))
    ring = outer & ~inner
    if not ring.any():
        raise DataError("no liver ring around the lesion mask")
    img = np.asarray(image, dtype=np.float64)
    liver = float(np.median(img[ring]))
    if liver <= 0:
        raise DataError("liver ring has no signal")
    return (float(img[m].mean()) - liver) / liver, (float(img[rim].mean()) - float(img[core].mean())) / liver


def _case_features(args: tuple[str, str, list[str], int, list[int]]) -> tuple[np.ndarray, int]:
    root, case, phases, erosion, ring = args
    feats = np.zeros((len(phases), 2))
    size = 0
    for j, phase in enumerate(phases):
        img = load_volume(Path(root) / "images" / case / f"{phase}.nii.gz").array
        mask = load_volume(Path(root) / "masks" / case / f"{phase}.nii.gz", check=False).array
        try:
            feats[j] = measure_lesion_features(img, mask, erosion, ring)
        except DataError as exc:
            raise DataError(
                exc.reason, path=Path(root) / "masks" / case / f"{phase}.nii.gz", case=case
            ) from None
        size = max(size, int((mask > 0).sum()))
    return feats, size


@dataclass
class PhantomFeatures:
    """Per-case probe features of the labelled cases of a written phantom."""

    cases: list[str]
    patients: list[str]
    labels: np.ndarray
    phases: list[str]
    features: np.ndarray  # (n_cases, n_phases, 2): contrast, rim-minus-core
    lesion_voxels: np.ndarray  # (n_cases,)


def read_phantom_features(root: str | Path, workers: int = 1, progress: bool = False) -> PhantomFeatures:
    """Measure the probe features of every labelled case from the written NIfTI files and masks."""
    root = Path(root)
    info = _read_marker(root)
    if info is None:
        raise DataError("not a liverfusion phantom (phantom.json missing or foreign)", path=root)
    probe = info["spec"]["probe"]
    phases = list(info["phases"])
    with open(root / "cases.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["label"]) >= 0]
    args = [
        (str(root), r["case"], phases, int(probe["core_erosion_vox"]), list(probe["ring_vox"])) for r in rows
    ]
    out = _pool_map(_case_features, args, workers, None, progress, "features")
    return PhantomFeatures(
        cases=[r["case"] for r in rows],
        patients=[r["patient"] for r in rows],
        labels=np.array([int(r["label"]) for r in rows]),
        phases=phases,
        features=np.stack([o[0] for o in out]) if out else np.zeros((0, len(phases), 2)),
        lesion_voxels=np.array([o[1] for o in out]),
    )


def fusion_probe(root: str | Path, workers: int = 1, feats: PhantomFeatures | None = None) -> dict:
    """Patient-grouped cross-validated macro-F1 of a standardised logistic regression on the probe features:
    all phases together, each phase alone, and lesion size alone. Shows how much the phantom needs fusion."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = Path(root)
    info = _read_marker(root)
    if info is None:
        raise DataError("not a liverfusion phantom (phantom.json missing or foreign)", path=root)
    probe = info["spec"]["probe"]
    feats = feats or read_phantom_features(root, workers=workers)
    y, groups = feats.labels, np.array(feats.patients)
    cv = StratifiedGroupKFold(n_splits=int(probe["folds"]), shuffle=True, random_state=0)

    def score(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=float(probe["C"]), max_iter=5000))
        with warnings.catch_warnings():  # tiny sets: sklearn warns once per call about sparse classes
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            pred = cross_val_predict(model, x, y, groups=groups, cv=cv)
        return float(f1_score(y, pred, average="macro"))

    n = len(y)
    per_phase = {p: score(feats.features[:, j, :]) for j, p in enumerate(feats.phases)}
    best = max(per_phase, key=per_phase.get)
    size = np.log(feats.lesion_voxels.reshape(n, 1).astype(float))
    return {
        "n_cases": n,
        "smallest_class": int(np.bincount(y).min()) if n else 0,  # below ~60 the figures are noisy
        "all_phases": score(feats.features.reshape(n, -1)),
        "per_phase": per_phase,
        "best_single_phase": best,
        "best_single_phase_f1": per_phase[best],
        "size_only": score(size),
        "best_phase_plus_size": score(
            np.concatenate([feats.features[:, feats.phases.index(best), :], size], 1)
        ),
    }


def summary_text(summary: Mapping) -> str:
    """One-paragraph human summary of a phantom.json."""
    counts = ", ".join(f"{k} {v}" for k, v in summary["class_counts"].items())
    return (
        f"phantom {summary['spec_name']} ({summary['spec_hash']}), seed {summary['seed']}: {summary['n_cases']} "
        f"labelled + {summary['n_unlabelled']} unlabelled cases of {summary['n_patients']} patients "
        f"({summary['two_lesion_patients']} with two lesions), shape {'x'.join(map(str, summary['shape']))}; "
        f"classes: {counts}"
    )
