"""One patient of a prepare run: build each study's cases with the layout's builder, name them, write each case
folder, draw its QA figure, and record the patient's marker (what a later run skips as finished).
"""

from __future__ import annotations

import logging
from typing import Any

from liverfusion.errors import DataError
from liverfusion.prepare.build_general import build_general
from liverfusion.prepare.build_lldmmri import build_lldmmri
from liverfusion.prepare.building import BuiltCase, Context
from liverfusion.prepare.labels import map_label
from liverfusion.prepare.lldmmri_raw import lesion_case_suffix
from liverfusion.prepare.output import OutputTree
from liverfusion.prepare.qa import render_case
from liverfusion.prepare.rules import match_study
from liverfusion.prepare.settings import setting
from liverfusion.prepare.sources import PatientSource, StudySource

log = logging.getLogger(__name__)


def process_patient(
    ctx: Context, tree: OutputTree, pid: str, patient: PatientSource
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build, name and write every case of one patient; returns (case records, failures)."""
    c = ctx.cfg
    built: list[BuiltCase] = []
    failures: list[dict[str, Any]] = []
    for n, study in enumerate(patient.studies):
        where = pid if len(patient.studies) == 1 else f"{pid} (study {n + 1})"
        try:
            cases, lesion_failures = build_study(ctx, study, pid)
        except DataError as exc:
            failures.append({"patient": pid, "study": n + 1, "reason": ctx.scrub(exc.reason)})
            log.debug("%s failed: %s", where, ctx.scrub(exc.reason))
            continue
        built += cases
        failures += [
            {"patient": pid, "study": n + 1, **f, "reason": ctx.scrub(f["reason"])} for f in lesion_failures
        ]
    names: list[str] = []
    for i, case in enumerate(built):
        if c["kind"] == "lldmmri":
            names.append(pid + lesion_case_suffix(case.key))
        else:
            names.append(pid if i == 0 else f"{pid}_{i}")
    tree.remove_stale(pid, names)
    records = []
    for name, case in zip(names, built):
        try:
            files = tree.write_case(name, case.volumes)
        except (DataError, RuntimeError, OSError) as exc:
            reason = exc.reason if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            failures.append({"patient": pid, "case": name, "reason": ctx.scrub(f"writing failed: {reason}")})
            continue
        records.append(_case_record(ctx, tree, pid, name, case, files))
    tree.write_marker(pid, {"patient": pid, "cases": records, "failures": failures})
    return records, failures


def _case_record(
    ctx: Context, tree: OutputTree, pid: str, name: str, case: BuiltCase, files: Any
) -> dict[str, Any]:
    """The record of one written case (scrubbed), with its QA figure drawn (``output.qa``)."""
    c = ctx.cfg
    label, warning = map_label(case.label_raw, setting(c, "labels.map"))
    warnings = [ctx.scrub(w) for w in case.warnings + ([warning] if warning else [])]
    extra = {k: ctx.scrub(str(v)) for k, v in case.extra.items()}
    for k in [k for k in extra if extra[k] != str(case.extra[k])]:
        warnings.append(f"labels.keep_columns: column {k!r} holds an identifying value: redacted")
    record = {
        "case": name,
        "patient": pid,
        "label": label,
        "extra": extra,
        "files": files,
        **ctx.scrub.deep(case.record),
        "warnings": warnings,
    }
    if setting(c, "output.qa"):
        title = f"{name}   patient {pid}   label {label if label != '' else '-'}"
        try:
            render_case(
                tree.qa / f"{name}.png",
                title,
                case.panels,
                reference=ctx.reference,
                tile=int(setting(c, "qa.tile_pixels")),
                percentiles=tuple(setting(c, "qa.percentiles")),  # type: ignore[arg-type]
                checker_tiles=int(setting(c, "qa.checker_tiles")),
            )
            record["qa"] = f"{tree.qa.name}/{name}.png"
        except Exception as exc:  # a QA figure must never cost a prepared case
            warnings.append(f"QA figure failed: {type(exc).__name__}: {ctx.scrub(str(exc))}")
    return record


def build_study(ctx: Context, study: StudySource, pid: str) -> tuple[list[BuiltCase], list[dict[str, Any]]]:
    """Match a study's series to modalities and build its cases with the layout's builder."""
    match = match_study(ctx.rules, [s.text for s in study.series], [s.order for s in study.series], pid)
    if match.problems:
        raise DataError("; ".join(match.problems))
    warnings = list(study.warnings)
    for e in match.entries:
        if e["status"] == "ambiguous":
            warnings.append(f"series {e['text']!r} matches several rules {e['names']}: not used")
    if ctx.cfg["kind"] == "lldmmri":
        return build_lldmmri(ctx, study, match, warnings)
    return build_general(ctx, study, match, warnings)
