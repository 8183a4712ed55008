"""A Case is one lesion (or one whole-volume study) of one patient with its modality files: torchio's Subject idea.

Several cases may belong to one patient (LLD-MMRI names a patient's second lesion ``<patient>_1``), so every split
is made on ``patient``, never on ``case_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Case:
    case_id: str
    patient_id: str
    images: dict[str, Path]
    """modality name -> file; only modalities whose file exists (missing ones are absent or listed in ``missing``)."""
    label: int | None = None
    """class index into the data set's class names; None = unlabelled (pre-training only)."""
    dataset: str = ""
    missing: set[str] = field(default_factory=set)
    """modalities declared by the data set that this case lacks (no file, a flagged copy of another modality, ...)."""
    mask: Path | None = None
    """optional lesion/organ mask file (never used as a training input)."""
    notes: list[str] = field(default_factory=list)

    @property
    def available(self) -> list[str]:
        return [m for m in self.images if m not in self.missing]

    @property
    def labelled(self) -> bool:
        return self.label is not None
