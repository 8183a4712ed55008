"""Labels and region-of-interest centres from the user's CSV files, joined to studies by their source key.

The labels CSV is input (it may hold identifiers); only the pseudonymous case/patient ids, the label and the columns
listed in ``labels.keep_columns`` reach the output ``labels.csv``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from liverfusion.errors import ConfigError, DataError
from liverfusion.prepare.sources import Inventory, PatientSource


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError("CSV file is missing", path=path)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises ParserError, UnicodeDecodeError, EmptyDataError, ...
        raise DataError(f"unreadable CSV ({type(exc).__name__}: {exc})", path=path) from None


def _index(table: pd.DataFrame, key_column: str, path: Path) -> dict[str, pd.Series]:
    if key_column not in table.columns:
        raise DataError(
            f"key column {key_column!r} not in the CSV (columns: {list(table.columns)})", path=path
        )
    keys = table[key_column].astype(str).str.strip()
    dups = sorted(set(keys[keys.duplicated()]))
    if dups:
        raise DataError(f"{len(dups)} key(s) appear more than once in column {key_column!r}", path=path)
    return {k: row for k, (_, row) in zip(keys, table.iterrows())}


def normalise_raw(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    if text.endswith(".0") and text[:-2].lstrip("-").isdigit():
        text = text[:-2]
    return text


def attach_labels(inv: Inventory, cfg: Mapping[str, Any]) -> None:
    """Fill ``label_raw``/``extra`` of each study; regroup patients by ``labels.patient_column`` when set."""
    if not cfg.get("csv"):
        return
    path = Path(str(cfg["csv"])).expanduser()
    table = read_table(path)
    key_column = cfg.get("key_column")
    if not key_column:
        raise ConfigError(
            "labels.csv is set: labels.key_column must name the column holding the source case key"
        )
    label_column = cfg.get("label_column")
    patient_column = cfg.get("patient_column")
    keep = [str(c) for c in (cfg.get("keep_columns") or [])]
    for col in [c for c in (label_column, patient_column) if c] + keep:
        if col not in table.columns:
            raise DataError(f"column {col!r} not in the CSV (columns: {list(table.columns)})", path=path)
    index = _index(table, str(key_column), path)
    regrouped: dict[str, PatientSource] = {}
    for patient in inv.patients:
        for study in patient.studies:
            row = index.get(study.label_key)
            new_key = patient.key
            if row is None:
                study.warnings.append("no row in the labels CSV: prepared unlabelled")
            else:
                study.label_raw = normalise_raw(row[label_column]) if label_column else None
                study.extra = {c: str(row[c]) for c in keep}
                if patient_column and str(row[patient_column]).strip():
                    new_key = str(row[patient_column]).strip()
            target = regrouped.setdefault(new_key, PatientSource(key=new_key, studies=[]))
            target.studies.append(study)
            target.identifying |= patient.identifying | ({patient.key} if new_key != patient.key else set())
            target.warnings += [w for w in patient.warnings if w not in target.warnings]
    inv.patients = list(regrouped.values())


def map_label(raw: Any, mapping: Mapping[Any, Any] | None) -> tuple[str, str | None]:
    """(output label, warning): mapped through ``labels.map`` when given; empty string = unlabelled."""
    text = normalise_raw(raw)
    if text == "" or text.lower() in {"nan", "none", "na", "n/a"}:
        return "", None
    if not mapping:
        return text, None
    table = {normalise_raw(k): v for k, v in mapping.items()}
    if text not in table:
        return "", f"label value {text!r} is not in labels.map {sorted(table)}: prepared unlabelled"
    value = table[text]
    return ("" if value is None else normalise_raw(value)), None


def attach_centres(inv: Inventory, cfg: Mapping[str, Any]) -> None:
    """roi.mode=centre: lesion centres (physical mm) per study from ``roi.centres_csv``, several rows per key allowed."""
    path = Path(str(cfg.get("centres_csv") or "")).expanduser()
    if not cfg.get("centres_csv"):
        raise ConfigError("roi.mode=centre needs roi.centres_csv (columns: key, x, y, z in mm)")
    table = read_table(path)
    key_col = str(cfg["centres_key_column"])
    xyz = [str(c) for c in cfg["centres_columns"]]
    label_col = cfg.get("centres_label_column")
    for col in [key_col, *xyz] + ([label_col] if label_col else []):
        if col not in table.columns:
            raise DataError(
                f"column {col!r} not in the centres CSV (columns: {list(table.columns)})", path=path
            )
    flip = -1.0 if str(cfg["centres_frame"]).upper() == "RAS" else 1.0
    by_key: dict[str, list[dict[str, Any]]] = {}
    for i, row in table.iterrows():
        try:
            x, y, z = (float(row[c]) for c in xyz)
        except ValueError:
            raise DataError(f"row {i + 2}: non-numeric centre", path=path) from None
        entry = {"point_lps": [flip * x, flip * y, z]}
        if label_col:
            entry["label_raw"] = normalise_raw(row[label_col])
        by_key.setdefault(str(row[key_col]).strip(), []).append(entry)
    for patient in inv.patients:
        for study in patient.studies:
            study.centres = by_key.get(study.label_key, [])
