"""Run discovery and grouping: the runs under a folder (``test/summary.json``) and the arms they form.

Runs are grouped into arms by the Hydra overrides that vary between them (``.hydra/overrides.yaml``, leaving out
``data.fold`` and ``seed``, which are replicates, and keys whose value is fixed by the fold), else by fusion / init /
fine-tune mode / label fraction. Each folder given to the report is its own arm family, named by ``--names``, its
experiment, a folder name that says something, or what its runs are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from liverfusion.errors import DataError
from liverfusion.evaluation import PredictionSet, read_predictions_csv

log = logging.getLogger(__name__)

REPLICATE_KEYS = ("data.fold", "seed")
GENERIC_FOLDERS = {"runs", "run", "multiruns", "multirun", "train", "logs", "report", "finetune", "outputs"}
"""Folder names that say nothing about an arm: never used as its name."""


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    metrics: dict[str, float]
    overrides: list[str] | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def fold(self) -> int | None:
        return self.summary.get("fold")

    def predictions(self) -> PredictionSet:
        return read_predictions_csv(self.path / "test" / "predictions.csv")

    def features(self) -> tuple[np.ndarray, np.ndarray] | None:
        f = self.path / "test" / "features.npz"
        if not f.is_file():
            return None
        with np.load(f, allow_pickle=False) as z:
            feats = z["encoder_features"] if z["encoder_features"].size else z["features"]
            return feats, z["labels"]


@dataclass
class Arm:
    name: str
    runs: list[Run]


def _read_overrides(run: Path) -> list[str] | None:
    f = run / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None
    import yaml

    values = yaml.safe_load(f.read_text()) or []
    return [str(v) for v in values]


def _read_config(run: Path) -> dict[str, Any]:
    f = run / "config_resolved.yaml"
    if not f.is_file():
        return {}
    import yaml

    return yaml.safe_load(f.read_text()) or {}


def find_runs(root: str | Path) -> list[Run]:
    """Every run under ``root`` (or ``root`` itself) that has test outputs."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("report folder does not exist", path=root)
    runs = []
    for summary in sorted(root.rglob("test/summary.json")):
        path = summary.parent.parent
        data = json.loads(summary.read_text())
        metrics = data.get("metrics") or {}
        if not metrics:
            log.warning("%s has no labelled test metrics: left out", path)
            continue
        runs.append(Run(path, data, metrics, _read_overrides(path), _read_config(path)))
    return runs


def _is_replicate(override: str) -> bool:
    return _key(override) in REPLICATE_KEYS


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _fold_bound_keys(runs: Sequence[Run]) -> set[str]:
    """Override keys whose value is fixed by the fold (e.g. a per-fold encoder path): replicates, not arms."""
    values: dict[str, dict[Any, set[str]]] = {}
    for r in runs:
        for o in r.overrides or []:
            values.setdefault(_key(o), {}).setdefault(r.fold, set()).add(o)
    bound = set()
    for key, by_fold in values.items():
        varies = len(set().union(*by_fold.values())) > 1
        if varies and None not in by_fold and all(len(v) == 1 for v in by_fold.values()):
            bound.add(key)
    return bound


def _descriptor(run: Run) -> str:
    s = run.summary
    parts = [str(s.get("fusion", "?")), str(s.get("init", "?")), str(s.get("finetune_mode", "?"))]
    lf = s.get("label_fraction")
    if lf is not None and float(lf) < 1.0:
        parts.append(f"labels={float(lf):g}")
    return "-".join(parts)


def experiment_name(runs: Sequence[Run]) -> str | None:
    """The experiment all ``runs`` share (``+experiment=NAME``, else the run's ``task_name``), or None."""
    names = set()
    for r in runs:
        name = None
        for o in r.overrides or []:
            if _key(o) == "experiment":
                name = o.split("=", 1)[1]
        task = r.config.get("task_name") if isinstance(r.config, dict) else None
        names.add(name or (str(task) if task and task != "train" else None))
    return next(iter(names)) if len(names) == 1 and None not in names else None


def _generic_folder(name: str) -> bool:
    """``runs``, ``multiruns``, ... or a Hydra time stamp (``2026-01-01_00-00-00``, ``12-30-59``)."""
    import re

    return name.lower() in GENERIC_FOLDERS or bool(re.fullmatch(r"[\d_.:-]+", name))


def family_name(folder: str | Path, runs: Sequence[Run]) -> str:
    """What a folder's runs are called when no ``--names`` are given: their experiment, else the folder's name
    unless it is a generic one (``runs``, a time stamp), else what the runs are (fusion-init-fine-tune mode)."""
    exp = experiment_name(runs)
    if exp:
        return exp
    name = Path(folder).expanduser().resolve().name
    return _descriptor(runs[0]) if _generic_folder(name) else name


def unique_labels(labels: Sequence[str], folders: Sequence[str | Path]) -> list[str]:
    """Labels made unique (two folders of one experiment): the folder's name, else a number, appended."""
    out = list(labels)
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            name = Path(folders[i]).expanduser().resolve().name
            out[i] = f"{lab} [{name}]" if not _generic_folder(name) else f"{lab} [{i + 1}]"
    if len(set(out)) < len(out):
        out = [f"{lab} [{i + 1}]" for i, lab in enumerate(labels)]
    return out


def group_runs(runs: Sequence[Run], label: str) -> list[Arm]:
    """Group the runs of one folder into arms (see the module docstring)."""
    if not runs:
        return []
    keys: list[tuple[str, ...]] = []
    if all(r.overrides is not None for r in runs):
        fold_bound = _fold_bound_keys(runs)
        sets = [
            tuple(o for o in r.overrides if not _is_replicate(o) and _key(o) not in fold_bound) for r in runs
        ]
        common = set(sets[0]).intersection(*map(set, sets[1:]))
        keys = [tuple(o for o in s if o not in common) for s in sets]
    else:
        keys = [(_descriptor(r),) for r in runs]
    if len({_descriptor(r) for r in runs}) > 1 and len(set(keys)) == 1:
        keys = [(_descriptor(r),) for r in runs]
    if len(set(keys)) == 1:  # one arm: named by its family (label, experiment), not by what its runs share
        keys = [()] * len(runs)
    arms: dict[tuple[str, ...], list[Run]] = {}
    for k, r in zip(keys, runs):
        arms.setdefault(k, []).append(r)
    out = []
    for k, members in arms.items():
        k = tuple(part for part in k if part != label)  # the descriptor already named the family
        name = label if not k else (f"{label}: {', '.join(k)}" if label else ", ".join(k))
        name = name or experiment_name(members) or _descriptor(members[0])
        out.append(Arm(name, sorted(members, key=lambda r: (r.fold is None, r.fold or 0, str(r.path)))))
    return out


def file_slug(name: str) -> str:
    """An arm name as it appears in the report's file names (``confusion_<slug>.png``, ...)."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return out.strip("_")[:80] or "arm"
