"""Patient-level, class-stratified, seeded splits, saved to a file and reusable by path.

Patients (not cases) are assigned to a fixed test split (optional) and to k folds. For fold ``k``:
- with a test split, fold k is the validation fold and the other folds train;
- without one (nested CV, e.g. LGG), fold k is the test fold, fold (k+1) mod K validates and the rest train.
Unlabelled patients never enter the folds; they are listed under ``unlabelled`` for pre-training only.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from liverfusion.data.case import Case
from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

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
        """Read a split file; every key, type and count is checked so a bad file is one error naming it."""
        path = Path(path)
        if not path.is_file():
            raise DataError("split file is missing", path=path)
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"split file is not valid JSON ({exc})", path=path) from None
        if not isinstance(payload, dict) or payload.pop("format", None) != SPLIT_FORMAT:
            raise DataError(f"not a liverfusion split file (expected format {SPLIT_FORMAT})", path=path)
        splits = cls(**_check_payload(payload, path))
        check_disjoint(splits, path=path)
        return splits


def _check_payload(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """The keys and types of a split file (a hand-edited file must not reach ``Splits`` half-valid)."""
    known = {f.name: f for f in fields(Splits)}
    unknown = sorted(set(payload) - set(known))
    if unknown:
        raise DataError(
            f"unknown key(s) {unknown} in the split file; known keys: {['format', *known]}",
            path=path,
            fix="remove them (Splits.save writes a valid file)",
        )
    required = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    absent = [n for n in required if n not in payload]
    if absent:
        raise DataError(f"split file lacks the key(s) {absent}", path=path)

    def bad(key: str, what: str) -> DataError:
        return DataError(f"{key!r} must be {what}, got {payload[key]!r}"[:300], path=path)

    def ids(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(p, str) and p for p in value)

    seed, n_folds, folds = payload["seed"], payload["n_folds"], payload["folds"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise bad("seed", "an integer >= 0")
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise bad("n_folds", "an integer >= 2")
    if not isinstance(folds, list) or not all(ids(f) for f in folds):
        raise bad("folds", "a list of lists of patient ids (strings)")
    if len(folds) != n_folds:
        raise DataError(f"'n_folds' is {n_folds} but 'folds' holds {len(folds)} folds", path=path)
    for key in ("test", "unlabelled"):
        if key in payload and not ids(payload[key]):
            raise bad(key, "a list of patient ids (strings)")
    if "source" in payload and not isinstance(payload["source"], str):
        raise bad("source", "a string")
    return payload


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
        n_test = math.ceil(test_fraction * len(labelled))  # as sklearn counts it
        if len(labelled) - n_test < n_folds:
            raise ConfigError(
                f"data.split.test_fraction={test_fraction} leaves {len(labelled) - n_test} of {len(labelled)} "
                f"labelled patients for {n_folds} folds",
                fix="lower data.split.test_fraction or data.split.n_folds",
            )
        n_classes = len(set(y.tolist()))
        strat_ok = strat_ok and min(n_test, len(labelled) - n_test) >= n_classes
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
    splits = Splits(
        seed=seed, n_folds=len(folds), folds=folds, test=test, unlabelled=unlabelled, source="files"
    )
    check_disjoint(splits)  # the release's validation lists must not share a patient
    return splits


def check_disjoint(splits: Splits, path: str | Path | None = None) -> None:
    """No patient may sit in two folds, in a fold and the test split, or in the pre-training pool
    (``unlabelled``) and a fold or the test split: pre-training must never see a held-out patient."""
    seen: dict[str, str] = {}
    groups = [(f"fold {i}", f) for i, f in enumerate(splits.folds)]
    groups += [("test", splits.test), ("unlabelled", splits.unlabelled)]
    for name, members in groups:
        for p in members:
            if p in seen:
                where = f"twice in {name}" if seen[p] == name else f"in two splits: {seen[p]} and {name}"
                raise DataError(f"patient {p!r} is {where}", path=path)
            seen[p] = name


def check_cases_against_splits(
    cases: Sequence[Case], partition: dict[str, list[str]], path: str | Path | None = None
) -> None:
    """Every case of a patient lands in the same split; a patient in two parts is an error naming it.
    ``path``: the split file the partition came from (named in the errors)."""
    where: dict[str, str] = {}
    for part, patients in partition.items():
        for p in patients:
            if p in where and where[p] != part:
                raise DataError(f"patient {p!r} is in two splits: {where[p]} and {part}", path=path)
            where[p] = part
    known = {c.patient_id for c in cases}
    missing = sorted(p for p in where if p not in known)
    if missing:
        raise DataError(
            f"split file names {len(missing)} patient(s) that are not in the data set: {_first(missing)}",
            path=path,
            fix="use the split file written for this data set, or drop those ids from it",
        )


def check_coverage(
    cases: Sequence[Case], splits: Splits, path: str | Path, allow_missing: bool = False
) -> list[str]:
    """A user's split file must place every labelled patient of the data set in a fold or the test split: one it
    leaves out would silently shrink training and evaluation. ``allow_missing`` accepts that, with a warning.
    Returns the labelled patients left out."""
    labels = patient_labels(cases)
    placed = {p for f in splits.folds for p in f} | set(splits.test)
    missing = sorted(p for p, y in labels.items() if y is not None and p not in placed)
    if missing:
        as_unlabelled = len(set(missing) & set(splits.unlabelled))
        note = f" ({as_unlabelled} of them listed as unlabelled)" if as_unlabelled else ""
        what = (
            f"the split file leaves {len(missing)} of the data set's {sum(y is not None for y in labels.values())} "
            f"labelled patients out of its folds and test split{note}: {_first(missing)}"
        )
        if not allow_missing:
            raise DataError(
                what,
                path=path,
                fix="add them to the split file, or set data.split.allow_missing=true to leave them out",
            )
        log.warning("%s: %s; left out (data.split.allow_missing=true)", path, what)
    listed = placed | set(splits.unlabelled)
    absent = sorted(p for p, y in labels.items() if y is None and p not in listed)
    if absent:
        log.warning(
            "%s: %d unlabelled patient(s) of the data set are not in the split file and give no pre-training "
            "pairs: %s",
            path,
            len(absent),
            _first(absent),
        )
    return missing


def _first(ids: Sequence[str], n: int = 5) -> str:
    return str(list(ids[:n]))[:-1] + (", ...]" if len(ids) > n else "]")
