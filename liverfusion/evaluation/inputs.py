"""New patients' cases for ``predict``: a folder of case folders ``<case>/<modality>.nii.gz`` (also what
:mod:`~liverfusion.evaluation.dicom_input` makes of a DICOM tree), or an LLD-MMRI release (its ``images/`` folder, or the release root holding it), read as a :class:`~liverfusion.data.layouts.Layout`
so a case goes through the same missing-modality and duplicate-copy rules as in training.

File names are matched to the checkpoint's modality names ignoring case and treating spaces and underscores alike
(``in_phase.nii.gz`` is ``In Phase``); ``aliases`` maps other names (``{t2: T2WI}``). A NIfTI file that matches
no modality is an error naming it (a wrong file silently left out would change the prediction); files matching an
``ignore`` pattern (masks, segmentations) and non-NIfTI files are skipped. Nothing under the input is written.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from liverfusion.data.case import Case
from liverfusion.data.layouts.base import Layout, patient_from_case
from liverfusion.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def name_key(name: str) -> str:
    """How file names and modality names are compared: case-insensitive, runs of spaces/underscores as one ``_``."""
    return re.sub(r"[\s_]+", "_", str(name).strip().lower())


def nifti_stem(path: Path) -> str | None:
    """The file name without ``.nii.gz`` / ``.nii``, or None for a file that is no NIfTI."""
    lower = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def case_root(input_dir: Path) -> Path:
    """The folder whose sub-folders are the cases: ``input`` itself, or its ``images/`` (an LLD-MMRI root)."""
    if not input_dir.is_dir():
        raise DataError(
            "input folder does not exist", path=input_dir, fix="pass input=<a folder of case folders>"
        )
    images = input_dir / "images"
    if images.is_dir() and not any(nifti_stem(p) for p in input_dir.iterdir() if p.is_file()):
        has_cases = any(p.is_dir() for p in images.iterdir())
        if has_cases:
            return images
    return input_dir


class CaseFolderLayout(Layout):
    """Unlabelled case folders named after their case; modality files matched by name (see the module doc)."""

    def __init__(
        self,
        root: str | Path,
        modalities: Sequence[str],
        aliases: Mapping[str, str] | None = None,
        ignore: Sequence[str] = (),
        **kwargs: Any,
    ):
        kwargs.setdefault("on_missing_modality", "mask")
        kwargs.setdefault("name", "predict")
        super().__init__(root, modalities, (), **kwargs)
        self.keys: dict[str, str] = {}
        for m in self.modalities:
            key = name_key(m)
            if key in self.keys:
                raise ConfigError(
                    f"modalities {self.keys[key]!r} and {m!r} cannot be told apart by file name"
                )
            self.keys[key] = m
        for raw, target in dict(aliases or {}).items():
            if str(target) not in self.modalities:
                raise ConfigError(
                    f"aliases.{raw}: {target!r} is not one of the model's modalities {self.modalities}",
                    fix="map each file name to one of those names",
                )
            key = name_key(raw)
            if key in self.keys and self.keys[key] != str(target):
                raise ConfigError(
                    f"aliases.{raw}: the name already means modality {self.keys[key]!r}",
                    fix="drop the alias or rename the files",
                )
            self.keys[key] = str(target)
        self.ignore = [str(p).lower() for p in ignore]

    def _expected(self) -> str:
        aliases = sorted(k for k, v in self.keys.items() if name_key(v) != k)
        text = ", ".join(f"{m}.nii.gz" for m in self.modalities)
        return text + (f" (aliases: {', '.join(aliases)})" if aliases else "")

    def _scan(self) -> list[Case]:
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            loose = [p.name for p in self.root.iterdir() if p.is_file() and nifti_stem(p)]
            raise DataError(
                "no case folders" + (f" (it holds NIfTI files {loose[:3]} directly)" if loose else ""),
                path=self.root,
                fix="put each case's files in a folder of its own: <input>/<case>/<modality>.nii.gz",
            )
        return [self._case(folder) for folder in folders]

    def _case(self, folder: Path) -> Case:
        images: dict[str, Path] = {}
        skipped: list[str] = []
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            stem = nifti_stem(path)
            if stem is None or any(fnmatch.fnmatch(path.name.lower(), pat) for pat in self.ignore):
                skipped.append(path.name)
                continue
            modality = self.keys.get(name_key(stem))
            if modality is None:
                raise DataError(
                    f"file name {path.name!r} is none of the model's modalities",
                    path=path,
                    case=folder.name,
                    fix=f"name the files {self._expected()}, map the name with aliases={{{stem}: <modality>}}, "
                    "or add it to ignore",
                )
            if modality in images:
                raise DataError(
                    f"two files for modality {modality!r}: {images[modality].name} and {path.name}",
                    path=folder,
                    case=folder.name,
                    fix="keep one file per modality in each case folder",
                )
            images[modality] = path
        if skipped:
            log.debug("case %s: skipped %s", folder.name, skipped)
        if not images:
            if has_dicom_files(folder):
                raise DataError(
                    "case folder has no usable modality file: it holds DICOM (files or series folders)",
                    path=folder,
                    case=folder.name,
                    fix="predict a DICOM tree on its own: input=<the DICOM tree> rules=<prepare rule set> "
                    "(or convert it first: python -m liverfusion.prepare kind=dicom rules=<name> input=<tree> "
                    "out=<folder>, then input=<folder>/subjects)",
                )
            raise DataError(
                "case folder has no usable modality file",
                path=folder,
                case=folder.name,
                fix=f"expected files named {self._expected()}",
            )
        try:
            patient = patient_from_case(folder.name, self.patient_regex)
        except DataError:
            patient = folder.name
        return Case(case_id=folder.name, patient_id=patient, images=images)


def has_dicom_files(folder: Path, limit: int = 20) -> bool:
    """A few files under ``folder`` carry the DICOM preamble magic (``DICM`` at byte 128)."""
    seen = 0
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        seen += 1
        try:
            with open(path, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
        except OSError:
            pass
        if seen >= limit:
            break
    return False
