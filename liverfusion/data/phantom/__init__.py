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

Package layout, one concept per module: :mod:`.spec` (load, validate, hash), :mod:`.plan` (who is who),
:mod:`.render` (one case: lesion, liver, vessels, acquisition), :mod:`.generate` (writing a set: worker processes,
lock, marker), :mod:`.probe` (the fusion probe). ``liverfusion.data.layouts.phantom`` is its reader.
"""

from liverfusion.data.phantom.generate import FORMAT, FORMAT_VERSION, generate_phantom, summary_text
from liverfusion.data.phantom.plan import POOLS, CasePlan, plan_cases
from liverfusion.data.phantom.probe import (
    PhantomFeatures,
    fusion_probe,
    measure_lesion_features,
    read_phantom_features,
)
from liverfusion.data.phantom.render import render_case
from liverfusion.data.phantom.spec import (
    SPEC_DIR,
    class_names,
    load_phantom_spec,
    spacing_mm,
    spec_hash,
    validate_spec,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "POOLS",
    "SPEC_DIR",
    "CasePlan",
    "PhantomFeatures",
    "class_names",
    "fusion_probe",
    "generate_phantom",
    "load_phantom_spec",
    "measure_lesion_features",
    "plan_cases",
    "read_phantom_features",
    "render_case",
    "spacing_mm",
    "spec_hash",
    "summary_text",
    "validate_spec",
]
