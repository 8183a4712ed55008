"""``python -m liverfusion.data.init <folder> out=conf/data/<name>.yaml``: a working data yaml for a folder of cases.

Scans the folder once (no pixels are read; one header per modality for the volume size):

- where the case folders are: ``<folder>/subjects/``, ``<folder>/images/`` (LLD-MMRI, with ``labels.txt``) or
  ``<folder>`` itself;
- the modalities: the NIfTI file names found in at least half of the case folders (masks and segmentations left
  out); names are compared ignoring case and spaces vs underscores, as the loader does;
- the labels CSV (``labels=`` or the CSV in the folder) and its columns: the one naming the case folders, the label
  (a column called label, class, grade, diagnosis, target or outcome), the patient, and ``has_<modality>`` flags.

It writes the yaml with a comment on every guess, prints the guesses, and refuses to replace an existing file
unless ``overwrite=true``. Then check it: ``python -m liverfusion.data.check data=<name>`` (a ``conf/`` folder in
the working directory is searched without ``--config-dir``).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liverfusion.data.layouts.base import UNLABELLED_VALUES, name_key
from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.cli import cli_errors

NIFTI = (".nii.gz", ".nii")
MASK_WORDS = re.compile(r"(^|[_\-\s])(mask|seg|segmentation|label|labels|roi)([_\-\s.]|$)", re.I)
LABEL_NAMES = ("label", "labels", "class", "target", "diagnosis", "outcome", "grade", "y")
PATIENT_NAMES = ("patient", "patient_id", "patientid", "subject", "subject_id", "participant")
OPTIONS = ("out", "name", "labels", "overwrite")


@dataclass
class Guess:
    """What the scan found: the layout's settings and, for each, how it was guessed."""

    root: Path
    name: str
    kind: str  # generic | lldmmri
    subjects_dir: str
    modalities: list[str]
    extension: str
    n_cases: int
    labels_csv: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    patient_column: str | None = None
    class_names: list[str] = field(default_factory=list)
    missing_flags: dict[str, str] = field(default_factory=dict)
    mask_file: str | None = None
    shape: list[int] = field(default_factory=lambda: [16, 64, 64])
    notes: list[str] = field(default_factory=list)


def _stem(path: Path) -> tuple[str, str] | None:
    lower = path.name.lower()
    for ext in NIFTI:
        if lower.endswith(ext):
            return path.name[: -len(ext)], ext
    return None


def _case_folders(root: Path) -> tuple[Path, list[Path]]:
    """The folder holding the case folders, and those folders (each with at least one NIfTI file)."""
    for base in (root / "subjects", root / "images", root):
        if not base.is_dir():
            continue
        cases = sorted(
            p
            for p in base.iterdir()
            if p.is_dir() and not p.name.startswith(".") and any(_stem(f) for f in p.iterdir() if f.is_file())
        )
        if cases:
            return base, cases
    raise DataError(
        "no case folders with NIfTI files found (looked in subjects/, images/ and the folder itself)",
        path=root,
        fix="lay the data out as <folder>/<case>/<modality>.nii.gz (or convert it with python -m liverfusion.prepare)",
    )


def _modalities(cases: list[Path], notes: list[str]) -> tuple[list[str], str, str | None]:
    """The modality names (most common spelling of each), the file extension, the mask file name if any."""
    spellings: dict[str, Counter] = {}
    per_case: Counter = Counter()
    exts: Counter = Counter()
    masks: Counter = Counter()
    for case in cases:
        seen = set()
        for f in case.iterdir():
            stem_ext = _stem(f) if f.is_file() else None
            if stem_ext is None:
                continue
            stem, ext = stem_ext
            if MASK_WORDS.search(stem):
                masks[f.name] += 1
                continue
            key = name_key(stem)
            spellings.setdefault(key, Counter())[stem] += 1
            exts[ext] += 1
            seen.add(key)
        per_case.update(seen)
    half = len(cases) / 2
    kept = [k for k, n in sorted(per_case.items(), key=lambda kv: (-kv[1], kv[0])) if n >= half]
    left = sorted(k for k, n in per_case.items() if n < half)
    if not kept:
        raise DataError(
            "no modality file name is shared by half of the case folders",
            path=cases[0].parent,
            fix="name each case's files alike: <case>/<modality>.nii.gz",
        )
    names = [spellings[k].most_common(1)[0][0] for k in kept]
    for k in kept:
        if per_case[k] < len(cases):
            notes.append(
                f"modality {spellings[k].most_common(1)[0][0]!r} is missing in {len(cases) - per_case[k]} case(s): "
                "on_missing_modality: mask trains them with a modality mask"
            )
    if left:
        notes.append(
            f"left out (in fewer than half the cases): {', '.join(spellings[k].most_common(1)[0][0] for k in left)}"
        )
    mask = masks.most_common(1)[0][0] if masks else None
    return names, exts.most_common(1)[0][0], mask


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
            return [c for c in (reader.fieldnames or []) if c], rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"unreadable CSV ({exc})", path=path) from None


def _pick_csv(root: Path, given: str | None, case_names: set[str]) -> Path | None:
    if given:
        path = Path(given).expanduser()
        path = path if path.is_absolute() else (Path.cwd() / path)
        if not path.is_file():
            raise DataError("labels CSV not found", path=path)
        return path.resolve()
    found = sorted(root.glob("*.csv"))
    if not found:
        return None
    scored = []
    for path in found:
        columns, rows = _read_csv(path)
        best = max((sum(r.get(c, "") in case_names for r in rows) for c in columns), default=0)
        scored.append((best, path.name == "labels.csv", path))
    scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return scored[0][2] if scored[0][0] else None


def _named(columns: Sequence[str], wanted: Sequence[str], exclude: set[str]) -> str | None:
    by_key = {name_key(c): c for c in columns if c not in exclude}
    for w in wanted:  # an exact name first, then a name that contains it (neoplasm_histologic_grade)
        if w in by_key:
            return by_key[w]
    for w in wanted:
        if len(w) < 3:
            continue
        for key, col in by_key.items():
            if re.search(rf"(^|_){re.escape(w)}(_|$)", key):
                return col
    return None


def _labels(guess: Guess, csv_path: Path, case_names: set[str]) -> None:
    columns, rows = _read_csv(csv_path)
    coverage = {c: sum(r.get(c, "") in case_names for r in rows) for c in columns}
    id_column = max(columns, key=lambda c: coverage[c]) if columns else None
    if id_column is None or coverage[id_column] == 0:
        raise DataError(
            f"no column of the CSV names the case folders (columns: {columns})",
            path=csv_path,
            fix="add a column holding each case folder's name",
        )
    listed = {r[id_column] for r in rows}
    if len(case_names - listed):
        guess.notes.append(
            f"{len(case_names - listed)} case folder(s) are not in the CSV: GenericLayout loads only listed cases"
        )
    guess.labels_csv = csv_path.name if csv_path.parent == guess.root else str(csv_path)
    guess.id_column = id_column
    guess.patient_column = _named(columns, PATIENT_NAMES, {id_column})
    guess.label_column = _named(columns, LABEL_NAMES, {id_column, guess.patient_column or ""})
    if guess.label_column is None:
        guess.notes.append(
            "no label column found: an unlabelled data set (pre-training only); set label_column"
        )
    else:
        values = {r.get(guess.label_column, "") for r in rows}
        values = {v for v in values if v.lower() not in UNLABELLED_VALUES}
        numeric = all(re.fullmatch(r"-?\d+(\.0)?", v) for v in values)
        guess.class_names = sorted(
            {v[:-2] if v.endswith(".0") else v for v in values}, key=lambda v: (int(v) if numeric else 0, v)
        )
        if len(guess.class_names) > 20:
            guess.notes.append(
                f"label column {guess.label_column!r} has {len(guess.class_names)} values: is it a class?"
            )
    for m in guess.modalities:
        col = _named(columns, (f"has_{name_key(m)}",), {id_column})
        if col is not None:
            guess.missing_flags[m] = col


def _shape(case: Path, modalities: list[str], ext: str) -> list[int] | None:
    """A volume size for the cache (D, H, W): each axis as stored, capped (32 slices, 96 pixels) and rounded
    down to a multiple of 8 / 16, from one header."""
    try:
        import nibabel as nib

        from liverfusion.data.layouts.base import match_file

        img = nib.load(str(match_file(case, f"{modalities[0]}{ext}", case.name)))
        x, y, z = (int(s) for s in img.shape[:3])
    except Exception:  # noqa: BLE001  a guess only: the data check reads every file properly
        return None
    d = max(8, min(32, z) // 8 * 8)
    h, w = (max(16, min(96, s) // 16 * 16) for s in (y, x))
    return [d, h, w]


def scan(folder: str | Path, name: str | None = None, labels: str | None = None) -> Guess:
    """Look at ``folder`` and guess its layout (see the module doc)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError("folder does not exist", path=root)
    root = root.resolve()
    base, cases = _case_folders(root)
    notes: list[str] = []
    modalities, ext, mask = _modalities(cases, notes)
    data_name = re.sub(r"[^A-Za-z0-9_]+", "_", name or root.name).strip("_").lower() or "mine"
    kind = "lldmmri" if base.name == "images" and (root / "labels.txt").is_file() else "generic"
    guess = Guess(
        root=root,
        name=data_name,
        kind=kind,
        subjects_dir="." if base == root else base.name,
        modalities=modalities,
        extension=ext,
        n_cases=len(cases),
        mask_file=mask,
        notes=notes,
    )
    case_names = {c.name for c in cases}
    if kind == "lldmmri":
        from liverfusion.data.layouts.lldmmri import read_label_lines

        values = sorted(
            {v for _, v in read_label_lines(root / "labels.txt") if v.lower() not in UNLABELLED_VALUES}
        )
        guess.class_names = sorted(values, key=lambda v: (int(v) if v.lstrip("-").isdigit() else 0, v))
        guess.notes.append(
            "LLD-MMRI layout (images/ + labels.txt): class names are the label codes; rename them"
        )
    else:
        csv_path = _pick_csv(root, labels, case_names)
        if csv_path is None:
            raise DataError(
                "no labels CSV naming the case folders was found",
                path=root,
                fix="write one (a column with each case folder's name, a label column) and pass labels=<csv>",
            )
        _labels(guess, csv_path, case_names)
    guess.shape = _shape(cases[0], modalities, ext) or guess.shape
    return guess


def _v(value: Any) -> str:
    """A YAML scalar or flow list (JSON is YAML; non-ASCII kept as it is)."""
    return json.dumps(value, ensure_ascii=False)


def render(guess: Guess) -> str:
    """The data yaml of a guess, each guessed value with its comment."""
    lines = [
        f"# Written by `python -m liverfusion.data.init {guess.root}` from a scan of {guess.n_cases} case folders.",
        "# Every value below is a guess: check it, then `python -m liverfusion.data.check data="
        + guess.name
        + "`.",
        "# Keys are explained in conf/data/template.yaml (the package's); anything not set here comes from _base.",
        "defaults:",
        "  - _base",
        "layout:",
    ]
    if guess.kind == "lldmmri":
        lines += [
            "  _target_: liverfusion.data.layouts.LLDMMRILayout",
            f"  root: {_v(str(guess.root))}",
            f"  name: {_v(guess.name)}",
            f"  modalities: {_v(guess.modalities)}   # phase file names found in the case folders",
            f"  class_names: {_v(guess.class_names)}   # the codes of labels.txt, in order (rename them freely)",
            "  labels_file: labels.txt",
        ]
    else:
        lines += [
            "  _target_: liverfusion.data.layouts.GenericLayout",
            f"  root: {_v(str(guess.root))}",
            f"  name: {_v(guess.name)}               # the cache's and the report's name for it",
            f"  subjects_dir: {_v(guess.subjects_dir)}   # the folder holding the case folders",
            f"  modalities: {_v(guess.modalities)}   # file names found in at least half of the case folders",
            f'  file_pattern: "{{modality}}{guess.extension}"',
            f"  labels_csv: {_v(guess.labels_csv)}",
            f"  id_column: {_v(guess.id_column)}      # the CSV column naming the case folders",
            f"  label_column: {_v(guess.label_column)}   # guessed from its name (null: unlabelled)",
            f"  patient_column: {_v(guess.patient_column)}   # null: the patient is read from the case id",
            f"  class_names: {_v(guess.class_names)}   # the label column's values, sorted",
        ]
        if guess.missing_flags:
            lines.append(
                f"  missing_flags: {_v(guess.missing_flags)}   # 0/false in the column: the modality is missing"
            )
        if guess.mask_file:
            lines.append(f"  mask_file: {_v(guess.mask_file)}")
    lines += [
        "  on_missing_modality: mask   # a case without one of its modalities trains with a modality mask",
        "  clinical: true              # privacy on (ids hashed, no images to W&B): set false only for public data",
        "preprocess:",
        f"  shape: {_v(guess.shape)}   # D, H, W: from one file's size, capped and rounded",
        "  mode: resize                # spacing (+ target_spacing: [sD, sH, sW] mm) when voxel sizes matter",
        "  normalize: percentile",
        "split:",
        "  n_folds: 5",
        "  test_fraction: 0.2          # 0: nested CV (fold k tests, fold k+1 validates)",
    ]
    return "\n".join(lines) + "\n"


def summary(guess: Guess, out: Path) -> list[str]:
    """What was guessed, for the console."""
    lines = [
        f"wrote {out} (use it as data={guess.name}):",
        f"  layout:      {'LLDMMRILayout' if guess.kind == 'lldmmri' else 'GenericLayout'}, {guess.n_cases} case "
        f"folders under {guess.root / guess.subjects_dir if guess.subjects_dir != '.' else guess.root}",
        f"  modalities:  {', '.join(guess.modalities)} ({guess.extension})",
    ]
    if guess.kind == "generic":
        lines += [
            f"  labels:      {guess.labels_csv}: case column {guess.id_column!r}, label column "
            f"{guess.label_column!r}, patient column {guess.patient_column!r}",
            f"  classes:     {', '.join(guess.class_names) or '(none: unlabelled)'}",
        ]
        if guess.missing_flags:
            lines.append(f"  flags:       {', '.join(f'{m} <- {c}' for m, c in guess.missing_flags.items())}")
    if guess.mask_file:
        lines.append(f"  mask:        {guess.mask_file}")
    lines.append(f"  volumes:     {'x'.join(str(s) for s in guess.shape)} (D x H x W)")
    lines += [f"  note: {n}" for n in guess.notes]
    lines.append(f"next: python -m liverfusion.data.check data={guess.name}")
    return lines


def parse_options(options: Sequence[str]) -> dict[str, str]:
    """``key=value`` arguments; an unknown key is refused by name."""
    values: dict[str, str] = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or key not in OPTIONS:
            raise ConfigError(
                f"command line: {opt!r} is not one of {', '.join(k + '=' for k in OPTIONS)}",
                fix="e.g. python -m liverfusion.data.init /data/study out=conf/data/study.yaml",
            )
        values[key] = value
    return values


def init(
    folder: str | Path,
    out: str | Path | None = None,
    name: str | None = None,
    labels: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, Guess]:
    """Scan ``folder`` and write its data yaml to ``out`` (default ``conf/data/<name>.yaml``)."""
    from liverfusion.utils.atomic import atomic_write_text

    if out is not None and name is None:
        name = Path(out).stem
    guess = scan(folder, name=name, labels=labels)
    target = Path(out) if out is not None else Path("conf") / "data" / f"{guess.name}.yaml"
    if target.exists() and not overwrite:
        raise ConfigError(
            f"{target}: already exists", fix="pass overwrite=true to replace it, or another out="
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, render(guess))
    return target, guess


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    from liverfusion.utils.help_pages import build_parser

    args = build_parser("init").parse_args(argv)
    opts = parse_options(args.options)
    overwrite = opts.get("overwrite", "false").lower() in ("1", "true", "yes")
    target, guess = init(args.folder, opts.get("out"), opts.get("name"), opts.get("labels"), overwrite)
    print("\n".join(summary(guess, target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
