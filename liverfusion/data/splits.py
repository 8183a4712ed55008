"""Patient-level, class-stratified, seeded splits, saved to a file and reusable by path.

Patients (not cases) are assigned to a fixed test split (optional) and to k folds. For fold ``k``:
- with a test split, fold k is the validation fold and the other folds train;
- without one (nested CV, e.g. LGG), fold k is the test fold, fold (k+1) mod K validates and the rest train.
Unlabelled patients never enter the folds; they are listed under ``unlabelled`` for pre-training only.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from liverfusion.data.case import Case
from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.atomic import atomic_write_text

SPLIT_FORMAT = "liverfusion-splits/1"


@dataclass
class Splits:
    seed: int
    n_folds: int
    folds: list[list[str]]
    test: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    source: str = "generated"

    @property
    def nested(self) -> bool:
        return not self.test

    def partition(self, fold: int) -> dict[str, list[str]]:
        """Patient ids of train / val / test for one fold."""
        if not 0 <= fold < self.n_folds:
            raise ConfigError(
                f"fold {fold} out of range: this split has {self.n_folds} folds (0..{self.n_folds - 1})"
            )
        if self.nested:
            val_fold = (fold + 1) % self.n_folds if self.n_folds > 1 else fold
            train = [p for i, f in enumerate(self.folds) if i not in (fold, val_fold) for p in f]
            return {"train": train, "val": list(self.folds[val_fold]), "test": list(self.folds[fold])}
        train = [p for i, f in enumerate(self.folds) if i != fold for p in f]
        return {"train": train, "val": list(self.folds[fold]), "test": list(self.test)}

    def save(self, path: str | Path) -> Path:
        payload = {"format": SPLIT_FORMAT, **asdict(self)}
        return atomic_write_text(path, json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        path = Path(path)
        if not path.is_file():
            raise DataError("split file is missing", path=path)
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"split file is not valid JSON ({exc})", path=path) from None
        if payload.pop("format", None) != SPLIT_FORMAT:
            raise DataError(f"not a liverfusion split file (expected format {SPLIT_FORMAT})", path=path)
        splits = cls(**payload)
        check_disjoint(splits, path=path)
        return splits


def patient_labels(cases: Sequence[Case]) -> dict[str, int | None]:
    """A patient's stratification label: the most frequent label of its lesions (ties -> lowest class)."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for c in cases:
        by_patient.setdefault(c.patient_id, [])
        if c.label is not None:
            by_patient[c.patient_id].append(c.label)
    out: dict[str, int | None] = {}
    for p, labels in by_patient.items():
        out[p] = min(Counter(labels).most_common(), key=lambda kv: (-kv[1], kv[0]))[0] if labels else None
    return out


def make_splits(
    cases: Sequence[Case], n_folds: int = 5, test_fraction: float = 0.0, seed: int = 0, stratify: bool = True
) -> Splits:
    """Stratified patient-level k-fold with an optional held-out test fraction."""
    if n_folds < 2:
        raise ConfigError(f"n_folds must be >= 2, got {n_folds}")
    labels = patient_labels(cases)
    labelled = sorted(p for p, y in labels.items() if y is not None)
    unlabelled = sorted(p for p, y in labels.items() if y is None)
    if not labelled:  # an unlabelled pool (pre-training only): no folds to fill
        return Splits(seed=seed, n_folds=n_folds, folds=[[] for _ in range(n_folds)], unlabelled=unlabelled)
    if len(labelled) < n_folds:
        raise DataError(f"only {len(labelled)} labelled patients: too few for {n_folds} folds")
    y = np.array([labels[p] for p in labelled])
    strat_ok = stratify and np.bincount(y).min(initial=0) >= 2 if y.size else False
    test: list[str] = []
    pool = labelled
    if test_fraction > 0:
        pool, test = train_test_split(
            labelled, test_size=test_fraction, random_state=seed, stratify=y if strat_ok else None
        )
        pool, test = sorted(pool), sorted(test)
    y_pool = np.array([labels[p] for p in pool])
    counts = np.bincount(y_pool)
    if stratify and counts[counts > 0].min() >= n_folds:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:  # a class with fewer patients than folds cannot be stratified: plain shuffled k-fold
        from sklearn.model_selection import KFold

        splitter = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = [sorted(pool[i] for i in idx) for _, idx in splitter.split(np.zeros(len(pool)), y_pool)]
    splits = Splits(seed=seed, n_folds=n_folds, folds=folds, test=test, unlabelled=unlabelled)
    check_disjoint(splits)
    return splits


def splits_from_case_lists(
    cases: Sequence[Case],
    train_lists: Sequence[Sequence[str]],
    val_lists: Sequence[Sequence[str]],
    seed: int = 0,
) -> Splits:
    """Splits given as per-fold case lists (LLD-MMRI ``train_foldK``/``val_foldK``), lifted to patients.

    The lists of fold k give its validation cases; fold k's validation patients become ``folds[k]``.
    """
    patient_of = {c.case_id: c.patient_id for c in cases}
    folds = []
    for k, val in enumerate(val_lists):
        unknown = [c for c in list(val) + list(train_lists[k]) if c not in patient_of]
        if unknown:
            raise DataError(f"fold {k} lists cases that are not in the data set: {unknown[:5]}")
        val_p = {patient_of[c] for c in val}
        train_p = {patient_of[c] for c in train_lists[k]}
        both = sorted(val_p & train_p)
        if both:
            raise DataError(f"fold {k}: patients in both train and val: {both[:5]}")
        folds.append(sorted(val_p))
    labels = patient_labels(cases)
    used = {p for f in folds for p in f} | {patient_of[c] for tl in train_lists for c in tl}
    test = sorted(p for p, y in labels.items() if y is not None and p not in used)
    unlabelled = sorted(p for p, y in labels.items() if y is None)
    return Splits(
        seed=seed, n_folds=len(folds), folds=folds, test=test, unlabelled=unlabelled, source="files"
    )


def check_disjoint(splits: Splits, path: str | Path | None = None) -> None:
    """No patient may sit in two folds, or in a fold and the test split."""
    seen: dict[str, str] = {}
    groups = [(f"fold {i}", f) for i, f in enumerate(splits.folds)] + [("test", splits.test)]
    for name, members in groups:
        for p in members:
            if p in seen:
                raise DataError(f"patient {p!r} is in two splits: {seen[p]} and {name}", path=path)
            seen[p] = name


def check_cases_against_splits(cases: Sequence[Case], partition: dict[str, list[str]]) -> None:
    """Every case of a patient lands in the same split; a patient in two parts is an error naming it."""
    where: dict[str, str] = {}
    for part, patients in partition.items():
        for p in patients:
            if p in where and where[p] != part:
                raise DataError(f"patient {p!r} is in two splits: {where[p]} and {part}")
            where[p] = part
    known = {c.patient_id for c in cases}
    missing = sorted(p for p in where if p not in known)
    if missing:
        raise DataError(f"split file names patients that are not in the data set: {missing[:5]}")
