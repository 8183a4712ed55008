"""The LLD-MMRI crop release layout, which the embedded phantom writes too, so the demo exercises the real reader.

``<root>/images/<case>/<Phase>.nii.gz`` and ``<root>/labels.txt`` with lines ``<case> <label>`` (-1 = unlabelled).
The release's cross-validation lists ``train_foldK.txt`` / ``val_foldK.txt`` hold lines of the same form.
Phase file names are matched ignoring case and spaces vs underscores (a re-post's ``In_Phase.nii.gz`` is
``In Phase``); two files of one case matching the same phase is an error naming both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from liverfusion.data.case import Case
from liverfusion.data.layouts.base import Layout, folder_files, match_file, patient_from_case
from liverfusion.errors import DataError

LLD_MMRI_PHASES = ["T2WI", "DWI", "In Phase", "Out Phase", "C-pre", "C+A", "C+V", "C+Delay"]
LLD_MMRI_CLASSES = ["hemangioma", "ICC", "abscess", "metastasis", "cyst", "FNH", "HCC"]


def read_label_lines(path: Path) -> list[tuple[str, str]]:
    """Lines ``<case> <label>``; blank lines and ``#`` comments are skipped; a malformed line is an error."""
    if not path.is_file():
        raise DataError("labels file is missing", path=path)
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) != 2:
            raise DataError(f"line {lineno} is not '<case> <label>': {line!r}", path=path)
        rows.append((parts[0], parts[1]))
    return rows


class LLDMMRILayout(Layout):
    def __init__(
        self,
        root: str | Path,
        modalities: Sequence[str] = tuple(LLD_MMRI_PHASES),
        class_names: Sequence[str] = tuple(LLD_MMRI_CLASSES),
        labels_file: str = "labels.txt",
        images_dir: str = "images",
        mask_dir: str | None = None,
        mask_modality: str | None = None,
        extension: str = ".nii.gz",
        **kwargs,
    ):
        super().__init__(root, modalities, class_names, **kwargs)
        self.labels_file = labels_file
        self.images_dir = images_dir
        self.mask_dir = mask_dir
        self.mask_modality = mask_modality
        self.extension = extension

    def _scan(self) -> list[Case]:
        labels_path = self.root / self.labels_file
        image_root = self.root / self.images_dir
        if not image_root.is_dir():
            raise DataError(f"images folder {self.images_dir!r} is missing", path=image_root)
        rows = read_label_lines(labels_path)
        listed = {case for case, _ in rows}
        cases = []
        for case_id, raw in rows:
            folder = image_root / case_id
            if not folder.is_dir():
                raise DataError(
                    "case listed in the labels file has no image folder", path=folder, case=case_id
                )
            cases.append(self._case(case_id, self.labels.parse(raw, case_id, labels_path), folder))
        for folder in sorted(p for p in image_root.iterdir() if p.is_dir() and p.name not in listed):
            case = self._case(folder.name, None, folder)
            case.notes.append("not in the labels file: unlabelled")
            cases.append(case)
        return cases

    def _case(self, case_id: str, label: int | None, folder: Path) -> Case:
        files = folder_files(folder)
        images = {
            m: match_file(folder, f"{m}{self.extension}", case_id, f"phase {m!r}", files)
            for m in self.modalities
        }
        mask = None
        if self.mask_dir:
            name = self.mask_modality or self.modalities[0]
            candidate = self.root / self.mask_dir / case_id / f"{name}{self.extension}"
            mask = candidate if candidate.is_file() else None
        return Case(
            case_id=case_id,
            patient_id=patient_from_case(case_id, self.patient_regex),
            images=images,
            label=label,
            mask=mask,
        )

    def fold_file(self, kind: str, fold: int) -> Path:
        """Path of the release's ``train_foldK.txt`` / ``val_foldK.txt`` (in the root or next to the labels)."""
        for base in (self.root, (self.root / self.labels_file).parent):
            p = base / f"{kind}_fold{fold}.txt"
            if p.is_file():
                return p
        raise DataError(f"fold file {kind}_fold{fold}.txt not found", path=self.root)
