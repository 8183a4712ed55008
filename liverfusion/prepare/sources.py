"""What a reader hands to the pipeline: patients -> studies -> series, with pixel data read lazily.

Keys (``PatientSource.key``, ``StudySource.key``) are source identifiers (folder names, DICOM PatientID): they may
identify a person and therefore never reach the output; only pseudonyms derived from them do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk


@dataclass
class LesionBox:
    """A box in the voxel index space of one series (ITK order x, y, z; inclusive bounds, as in Annotation.json)."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    category: Any = None
    error: str | None = None
    """Set when the annotation of this box is malformed: only this lesion's phase is lost."""


@dataclass
class SeriesSource:
    text: str
    """What the rules match: DICOM SeriesDescription, a file name without extension, an LLD-MMRI phase."""
    load: Callable[..., sitk.Image]
    """``load(check=False)`` reads the pixels; ``check=True`` (a modality, not a mask) also applies the shared voxel
    rule ``liverfusion.data.io.check_voxels`` to the voxels as the file stores them."""
    order: Any = 0
    """Sort key among series claiming one modality (SeriesNumber, file name) for rules.on_duplicate."""
    info: dict[str, Any] = field(default_factory=dict)
    """Identifier-free facts for the log (number of files, slice checks, ...)."""
    problems: list[str] = field(default_factory=list)
    """Found while scanning (missing slices, unreadable files, ...): the series cannot be used."""
    warnings: list[str] = field(default_factory=list)
    boxes: dict[str, LesionBox] = field(default_factory=dict)
    """LLD-MMRI: lesion key -> this series' own box."""
    path: str | None = None
    """The file (NIfTI, LLD-MMRI) or folder (DICOM) the pixels come from, named in errors about them."""


@dataclass
class StudySource:
    key: str
    series: list[SeriesSource]
    label_key: str = ""
    """Key into the labels CSV (folder name, PatientID, ...)."""
    order: Any = 0
    warnings: list[str] = field(default_factory=list)
    label_raw: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    centres: list[dict[str, Any]] = field(default_factory=list)
    """roi.mode=centre: physical centres (LPS mm) with optional per-lesion label."""


@dataclass
class PatientSource:
    key: str
    studies: list[StudySource]
    identifying: set[str] = field(default_factory=set)
    """Values (DICOM tag values, folder names) that must not appear in any output byte."""
    warnings: list[str] = field(default_factory=list)


@dataclass
class Inventory:
    """Everything a reader found under the input root."""

    patients: list[PatientSource]
    n_files: int = 0
    warnings: list[str] = field(default_factory=list)
    identifying: set[str] = field(default_factory=set)
    """Identifying values not tied to one patient (e.g. institution names)."""


def group_patients(studies: list[tuple[str, StudySource, set[str]]]) -> list[PatientSource]:
    """Gather (patient key, study, identifying values) triples into patients, keeping first-seen order."""
    patients: dict[str, PatientSource] = {}
    for key, study, ident in studies:
        p = patients.setdefault(key, PatientSource(key=key, studies=[]))
        p.studies.append(study)
        p.identifying |= ident
    for p in patients.values():
        p.studies.sort(key=lambda s: (str(s.order), s.key))
    return list(patients.values())
