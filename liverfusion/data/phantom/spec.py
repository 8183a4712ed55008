"""The phantom's spec: loading (by name or path) and validation, its content hash, and the few values derived
from it that every stage reads (voxel spacing, class names in label order).

A spec is the whole appearance model (conf/phantom/default.yaml; docs/phantom.md explains each block). It is
checked once, up front, so that a bad key fails with its name before a single case is drawn.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from liverfusion.errors import ConfigError
from liverfusion.utils.plain import to_plain

SPEC_DIR = Path(__file__).resolve().parents[2] / "conf" / "phantom"

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
_PER_PHASE_TABLES = (
    "liver.intensity",
    "liver.outside",
    "fat.phase_effect",
    "vessels.contrast",
    "acquisition.noise_rel",
)
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


def spec_dict(cfg: Any) -> dict:
    """A spec (DictConfig or mapping) as a plain nested dict of its own: validation and rendering never change the
    caller's object."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"phantom spec must be a mapping, got {type(cfg).__name__}")
    return to_plain(cfg)


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


def validate_spec(spec: Any, source: str = "phantom spec") -> dict:
    """Check a spec's structure and ranges; returns it as a plain dict. Errors name the offending key."""
    spec = spec_dict(spec)
    _check_sections(spec, source)
    phases = list(spec["phases"])
    if len(set(phases)) != len(phases) or not phases:
        raise ConfigError(f"{source}: phases must be a non-empty list of distinct names, got {phases}")
    _check_geometry(spec["geometry"], source)
    _check_phase_tables(spec, phases, source)
    _check_cohort(spec["cohort"], phases, source)
    _check_classes(spec["classes"], phases, source)
    return spec


def _check_sections(spec: dict, source: str) -> None:
    for section in ("phases", "classes", "scar", "capsule", *_REQUIRED):
        if section not in spec:
            raise ConfigError(f"{source}: missing section {section!r}")
    for section, keys in _REQUIRED.items():
        missing = [k for k in keys if not isinstance(spec[section], Mapping) or k not in spec[section]]
        if missing:
            raise ConfigError(f"{source}: {section} lacks keys {missing}")


def _check_geometry(geo: Mapping, source: str) -> None:
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


def _check_phase_tables(spec: dict, phases: list, source: str) -> None:
    """The tables with one entry per phase, and the phase names other sections refer to."""
    unknown = [p for p in spec.get("enhanced_phases", []) if p not in phases]
    if unknown:
        raise ConfigError(f"{source}: enhanced_phases {unknown} are not in phases")
    for key in _PER_PHASE_TABLES:
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


def _check_cohort(coh: Mapping, phases: list, source: str) -> None:
    for k in ("two_lesion_share", "second_same_class", "atypical_share"):
        _number(coh.get(k), f"cohort.{k}", 0.0, 1.0)
    lo, hi = _range(coh.get("atypical_phases"), "cohort.atypical_phases")
    if lo < 1 or hi > len(phases):
        raise ConfigError(f"{source}: cohort.atypical_phases must lie in [1, {len(phases)}]")


def _check_classes(classes: Any, phases: list, source: str) -> None:
    if not isinstance(classes, Mapping) or len(classes) < 2:
        raise ConfigError(f"{source}: classes must map at least two class names to their parameters")
    labels = []
    for name, cls in classes.items():
        where = f"classes.{name}"
        if not isinstance(cls, Mapping):
            raise ConfigError(f"{source}: {where} must be a mapping")
        labels.append(cls.get("label"))
        _number(cls.get("weight"), f"{where}.weight", 0.0)
        _check_anatomy(cls.get("anatomy") or {}, where, source)
        _check_appearance(cls.get("appearance"), phases, where, source)
    if sorted(labels) != list(range(len(classes))):
        raise ConfigError(f"{source}: class labels must be 0..{len(classes) - 1}, each once; got {labels}")
    if sum(float(c["weight"]) for c in classes.values()) <= 0:
        raise ConfigError(f"{source}: class weights sum to zero")


def _check_anatomy(anatomy: Mapping, where: str, source: str) -> None:
    for k in _ANATOMY_RANGES:
        _range(anatomy.get(k), f"{where}.anatomy.{k}")
    _range(anatomy.get("nodules"), f"{where}.anatomy.nodules")
    _range(anatomy.get("fat_fraction"), f"{where}.anatomy.fat_fraction")
    for k in _ANATOMY_PROBS:
        _number(anatomy.get(k), f"{where}.anatomy.{k}", 0.0, 1.0)
    if anatomy["radius_mm"][0] <= 0:
        raise ConfigError(f"{source}: {where}.anatomy.radius_mm must be positive")


def _check_appearance(app: Any, phases: list, where: str, source: str) -> None:
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


def spec_hash(spec: Mapping) -> str:
    """Stable content hash of a spec (canonical JSON): names the appearance model in phantom.json."""
    blob = json.dumps(spec_dict(spec), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def spacing_mm(spec: Mapping) -> tuple[float, float, float]:
    """Voxel spacing (sD, sH, sW): the field of view spread over the shape, as when crops are resized."""
    fov, shape = spec["geometry"]["field_of_view_mm"], spec["geometry"]["shape"]
    return tuple(float(f) / int(n) for f, n in zip(fov, shape))  # type: ignore[return-value]


def class_names(spec: Mapping) -> list[str]:
    """Class names in label order."""
    return [name for name, _ in sorted(spec["classes"].items(), key=lambda kv: kv[1]["label"])]
