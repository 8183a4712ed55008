"""What every layout shares: label parsing, case -> patient mapping, duplicate-modality detection, validation."""

from __future__ import annotations

import abc
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from liverfusion.data.case import Case
from liverfusion.data.io import file_digest
from liverfusion.errors import ConfigError, DataError

DEFAULT_PATIENT_REGEX = r"^(?P<patient>.+?)(?:_\d+)?$"
"""LLD-MMRI convention: a patient's second lesion is ``<patient>_1``, the third ``<patient>_2``, ..."""

UNLABELLED_VALUES = {"", "-1", "nan", "none", "na", "n/a"}


def name_key(name: str) -> str:
    """How a file name is compared with the name a layout expects: case-insensitive, and runs of spaces and
    underscores count as one ``_`` (a re-post names ``In Phase.nii.gz`` ``in_phase.nii.gz``)."""
    return re.sub(r"[\s_]+", "_", str(name).strip().lower())


def folder_files(folder: Path) -> list[Path] | None:
    """The files of a case folder (None when it cannot be listed): list once, match every modality against it."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if e.is_file()]
    except OSError:
        return None


def match_file(
    folder: Path, expected: str, case: str, what: str = "", files: Sequence[Path] | None = None
) -> Path:
    """The file of ``folder`` named ``expected`` up to ``name_key`` (``folder / expected`` itself when no file
    matches: the layout then reports it missing). Two files of the case matching the same name is an error:
    which one is the modality cannot be guessed. ``files``: the folder's :func:`folder_files`, when the caller
    matches several names in one folder."""
    exact = folder / expected
    entries = folder_files(folder) if files is None else files
    if entries is None:
        return exact
    want = name_key(expected)
    found = sorted(p for p in entries if name_key(p.name) == want)
    if len(found) > 1:
        names = ", ".join(repr(p.name) for p in found)
        raise DataError(
            f"files {names} all match {what or repr(expected)} (names are compared ignoring case and spaces vs "
            "underscores)",
            path=folder,
            case=case,
            fix="keep one of them in the case folder (move the other out)",
        )
    return found[0] if found else exact


def patient_from_case(case_id: str, regex: str = DEFAULT_PATIENT_REGEX) -> str:
    """Patient id of a case by a regex with a ``patient`` group (or the first group)."""
    m = re.match(regex, case_id)
    if m is None:
        raise DataError(f"case id does not match patient_regex {regex!r}", case=case_id)
    return m.groupdict().get("patient") or m.group(1)


class LabelSpec:
    """Turns a raw label value into a class index; empty or -1 means unlabelled, anything else unknown is an error.

    ``label_map`` maps raw values (as strings) to class names or indices, for data whose codes are not 0..K-1
    (e.g. LGG grade codes 1/2).
    """

    def __init__(self, class_names: Sequence[str], label_map: Mapping[Any, Any] | None = None):
        self.class_names = [str(c) for c in class_names]
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"class_names has duplicates: {self.class_names}")
        self.label_map = {str(k).strip(): v for k, v in (label_map or {}).items()}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def parse(self, raw: Any, case: str, path: Path | str | None = None) -> int | None:
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            return None
        text = str(raw).strip()
        if text.lower() in UNLABELLED_VALUES:
            return None
        if text.endswith(".0") and text[:-2].lstrip("-").isdigit():  # CSV readers turn 1 into 1.0
            text = text[:-2]
        if text in self.label_map:
            value = self.label_map[text]
            if value is None or str(value).strip().lower() in UNLABELLED_VALUES:
                return None
            text = str(value).strip()
        if text in self.class_names:
            return self.class_names.index(text)
        if text.lstrip("-").isdigit() and 0 <= int(text) < self.num_classes:
            return int(text)
        raise DataError(
            f"unknown label {raw!r}: expected one of {self.class_names} (or 0..{self.num_classes - 1}; "
            "empty or -1 for unlabelled)",
            path=path,
            case=case,
        )


class Layout(abc.ABC):
    """A data set on disk. ``scan()`` lists its cases; nothing under ``root`` is ever written."""

    def __init__(
        self,
        root: str | Path,
        modalities: Sequence[str],
        class_names: Sequence[str] = (),
        name: str | None = None,
        label_map: Mapping[Any, Any] | None = None,
        patient_regex: str = DEFAULT_PATIENT_REGEX,
        on_missing_modality: str = "error",
        detect_duplicates: bool = True,
        duplicate_source: Sequence[str] = (),
        clinical: bool = False,
    ):
        self.root = Path(root).expanduser()
        self.modalities = [str(m) for m in modalities]
        if not self.modalities:
            raise ConfigError("a layout needs at least one modality")
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"modalities has duplicates: {self.modalities}")
        self.labels = LabelSpec(class_names, label_map)
        self.name = name or self.root.name
        self.patient_regex = patient_regex
        if on_missing_modality not in {"error", "mask", "skip"}:
            raise ConfigError(f"on_missing_modality must be error, mask or skip, not {on_missing_modality!r}")
        self.on_missing_modality = on_missing_modality
        self.detect_duplicates = detect_duplicates
        self.duplicate_source = list(duplicate_source or [])
        self.clinical = clinical
        self.skipped: list[tuple[str, str]] = []

    @property
    def class_names(self) -> list[str]:
        return self.labels.class_names

    def scan(self) -> list[Case]:
        """All cases, validated: existing root, unique case ids, missing/duplicated modalities resolved."""
        if not self.root.is_dir():
            raise DataError("data folder does not exist", path=self.root)
        self.skipped = []
        cases = []
        for case in self._scan():
            case.dataset = case.dataset or self.name
            if self._resolve_missing(case):
                cases.append(case)
        counts = Counter(c.case_id for c in cases)
        dups = sorted(k for k, v in counts.items() if v > 1)
        if dups:
            raise DataError(f"duplicate case ids: {dups[:10]}", path=self.root)
        if not cases:
            raise DataError(
                "no cases found (check the layout settings: folder names, file names, labels file)",
                path=self.root,
            )
        return cases

    @abc.abstractmethod
    def _scan(self) -> list[Case]:
        """Layout-specific listing; may leave ``missing`` empty."""

    def _resolve_missing(self, case: Case) -> bool:
        """Fill ``case.missing``; return False when the case is to be left out."""
        for m in self.modalities:
            if m not in case.images or not case.images[m].is_file():
                case.missing.add(m)
                case.notes.append(f"modality {m!r} has no file")
        if self.detect_duplicates:
            self._mark_duplicates(case)
        absent = [m for m in self.modalities if m in case.missing]
        if absent and self.on_missing_modality == "error":
            where = case.images.get(absent[0]) or (self.root / case.case_id)
            raise DataError(
                f"missing modality {absent[0]!r} ({'; '.join(case.notes)}); set on_missing_modality=mask to "
                "train with a modality mask, or skip to leave such cases out",
                path=where,
                case=case.case_id,
            )
        if len(absent) == len(self.modalities):
            raise DataError("case has none of the configured modalities", path=self.root, case=case.case_id)
        if absent and self.on_missing_modality == "skip":
            self.skipped.append((case.case_id, f"missing {absent}"))
            return False
        return True

    def _mark_duplicates(self, case: Case) -> None:
        """A modality file byte-identical to another of the same case is a filler copy (LGG fills gaps with FLAIR)."""
        digests: dict[str, list[str]] = {}
        for m in self.modalities:
            if m in case.images and case.images[m].is_file():  # flagged files too: report what the flag says
                digests.setdefault(file_digest(case.images[m]), []).append(m)
        for group in digests.values():
            if len(group) < 2:
                continue
            keep = next((m for m in self.duplicate_source if m in group), group[0])
            for m in group:
                if m != keep:
                    case.missing.add(m)
                    case.notes.append(f"modality {m!r} is an exact copy of {keep!r}: treated as missing")

    def describe(self) -> dict[str, Any]:
        return {
            "layout": type(self).__name__,
            "name": self.name,
            "root": str(self.root),
            "modalities": self.modalities,
            "class_names": self.class_names,
        }
