"""The generic layout: ``<root>/<subjects_dir>/<case>/<file>`` + a labels CSV with configurable columns.

Modality file names are matched ignoring case and spaces vs underscores (``T1 Post.nii.gz`` is ``t1_post``); two
files of one case matching the same modality is an error naming both.

This is what ``liverfusion.prepare`` writes, and how the LGG set loads with nothing but ``conf/data/lgg.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from liverfusion.data.case import Case
from liverfusion.data.layouts.base import Layout, folder_files, match_file, patient_from_case
from liverfusion.errors import DataError


class GenericLayout(Layout):
    def __init__(
        self,
        root: str | Path,
        modalities: Sequence[str],
        class_names: Sequence[str] = (),
        labels_csv: str = "labels.csv",
        id_column: str = "case",
        label_column: str | None = "label",
        patient_column: str | None = "patient",
        subjects_dir: str = "subjects",
        file_pattern: str = "{modality}.nii.gz",
        modality_files: Mapping[str, str] | None = None,
        missing_flags: Mapping[str, str] | None = None,
        mask_file: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(root, modalities, class_names, **kwargs)
        self.labels_csv = labels_csv
        self.id_column = id_column
        self.label_column = label_column
        self.patient_column = patient_column
        self.subjects_dir = subjects_dir
        self.file_pattern = file_pattern
        self.modality_files = dict(modality_files or {})
        self.missing_flags = dict(missing_flags or {})
        self.mask_file = mask_file

    def _scan(self) -> list[Case]:
        csv_path = self.root / self.labels_csv
        if not csv_path.is_file():
            raise DataError("labels CSV is missing", path=csv_path)
        try:
            table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        except Exception as exc:
            raise DataError(f"unreadable CSV ({exc})", path=csv_path) from None
        needed = [self.id_column] + [c for c in (self.label_column, self.patient_column) if c]
        needed += list(self.missing_flags.values())
        absent = [c for c in needed if c not in table.columns]
        if absent:
            raise DataError(f"columns {absent} not in the CSV (it has {list(table.columns)})", path=csv_path)
        subjects = self.root / self.subjects_dir
        cases = []
        for _, row in table.iterrows():
            case_id = str(row[self.id_column]).strip()
            if not case_id:
                continue
            folder = subjects / case_id
            if not folder.is_dir():
                raise DataError("case listed in the labels CSV has no folder", path=folder, case=case_id)
            label = (
                self.labels.parse(row[self.label_column], case_id, csv_path) if self.label_column else None
            )
            patient = str(row[self.patient_column]).strip() if self.patient_column else ""
            files = folder_files(folder)
            images = {
                m: match_file(
                    folder,
                    self.modality_files.get(m, self.file_pattern.format(modality=m)),
                    case_id,
                    f"modality {m!r}",
                    files,
                )
                for m in self.modalities
            }
            case = Case(
                case_id=case_id,
                patient_id=patient or patient_from_case(case_id, self.patient_regex),
                images=images,
                label=label,
                mask=self._mask(folder, case_id),
            )
            for modality, column in self.missing_flags.items():
                if str(row[column]).strip() in {"0", "0.0", "false", "False"}:
                    case.missing.add(modality)
                    case.notes.append(f"modality {modality!r} flagged missing by column {column!r}")
            cases.append(case)
        return cases

    def _mask(self, folder: Path, case_id: str) -> Path | None:
        if not self.mask_file:
            return None
        path = match_file(folder, self.mask_file, case_id, "the mask file")
        return path if path.is_file() else None
