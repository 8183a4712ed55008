"""Case planning: who is who in a phantom, drawn cheaply in the main process before any pixel is rendered.

Patient ``i`` of a pool draws from ``SeedSequence(seed, spawn_key=(pool, i))`` only, so a smaller data set is a
prefix of a larger one with the same seed, and any worker count renders the same cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from liverfusion.data.phantom.spec import class_names, validate_spec
from liverfusion.errors import ConfigError

POOLS = ("P", "U")  # case-name prefix of the labelled pool and of the unlabelled pre-training pool


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


def case_rng(seed: int, *key: int) -> np.random.Generator:
    """The generator of one patient (key: pool, patient) or one lesion (pool, patient, lesion)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def _patient_draws(spec: dict, rng: np.random.Generator) -> dict:
    """What the lesions of one patient share: enhancement strength, arterial timing, per-phase gain and noise."""
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
            rng = case_rng(seed, pool, i)
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
