"""``run_prepare(cfg)``: export in, training-ready data set out. The Hydra wrapper lives in ``__main__``.

Flow: read and check the settings (:mod:`.settings`) -> scan the input (no pixels) -> labels/centres ->
pseudonyms -> per patient (:mod:`.patient`): match series to modalities, build the cases with the layout's builder
(:mod:`.build_general` for DICOM / NIfTI, :mod:`.build_lldmmri` for the LLD-MMRI release), write each case folder
atomically, QA PNG, marker -> labels.csv, prepare_log.json, private key file, privacy audit. A broken case is
recorded with its reason and the run goes on.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from omegaconf import DictConfig
from tqdm import tqdm

import liverfusion
from liverfusion.errors import ConfigError, DataError
from liverfusion.prepare.build_general import build_general
from liverfusion.prepare.build_lldmmri import build_lldmmri
from liverfusion.prepare.building import BuiltCase, Context, load_mask, load_modality
from liverfusion.prepare.dicom import scan_dicom_tree
from liverfusion.prepare.labels import attach_centres, attach_labels
from liverfusion.prepare.lldmmri_raw import scan_lldmmri
from liverfusion.prepare.nifti_folders import scan_nifti_folders
from liverfusion.prepare.output import OutputTree, diff_settings, write_labels_csv
from liverfusion.prepare.patient import build_study, process_patient
from liverfusion.prepare.privacy import Pseudonymizer, Scrubber, audit_outputs
from liverfusion.prepare.rules import MatchReport, RuleSet, match_study
from liverfusion.prepare.settings import (
    EXIT_FAILED_CASES,
    EXIT_PRIVACY,
    KINDS,
    ROI_MODES,
    RUNTIME_KEYS,
    make_folder,
    plain_settings,
    sanitized_config,
    setting,
    settings_fingerprint,
    validate,
)
from liverfusion.prepare.sources import Inventory, PatientSource
from liverfusion.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_FAILED_CASES",
    "EXIT_PRIVACY",
    "KINDS",
    "ROI_MODES",
    "RUNTIME_KEYS",
    "BuiltCase",
    "Context",
    "PrepareResult",
    "build_general",
    "build_lldmmri",
    "build_study",
    "dry_run_report",
    "load_mask",
    "load_modality",
    "process_patient",
    "run_prepare",
    "sanitized_config",
    "scan",
    "settings_fingerprint",
    "validate",
]


@dataclass
class PrepareResult:
    out: Path
    cases: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Warnings of the whole run; each case's own warnings are in its record (``cases[i]["warnings"]``)."""
    n_warnings: int = 0
    """Run warnings plus the warnings of every listed case: what ``strict=true`` fails on, with the failures."""
    exit_code: int = 0
    seconds: float = 0.0
    log_path: Path | None = None
    report: dict[str, Any] | None = None
    skipped: int = 0


@dataclass
class _Plan:
    """Who is prepared under which pseudonym, and what must never appear in the output."""

    planned: list[tuple[str, PatientSource]]
    """(pseudonymous id, patient) in id order, cut to ``limit``."""
    all_pids: list[str]
    """Every patient id of this input (also those beyond ``limit``)."""
    identifying: set[str]
    scrub: Scrubber
    failures: list[dict[str, Any]]


def scan(cfg: dict[str, Any], root: Path) -> Inventory:
    """The input's patients, studies and series of ``kind`` (headers only, no pixels)."""
    kind = cfg["kind"]
    min_len = int(setting(cfg, "privacy.min_value_length"))
    if kind == "dicom":
        tags = list(setting(cfg, "privacy.phi_tags"))
        return scan_dicom_tree(root, setting(cfg, "dicom"), tags, min_len)
    if kind == "nifti":
        return scan_nifti_folders(root, setting(cfg, "nifti"), min_len)
    return scan_lldmmri(root, setting(cfg, "lldmmri"))


def run_prepare(cfg: DictConfig | Mapping[str, Any]) -> PrepareResult:
    """Prepare a data set; returns what was done. Raises ConfigError/DataError only for problems of the whole run."""
    t0 = time.time()
    c = plain_settings(cfg)
    inp, out, key_path = validate(c)
    if c.get("threads"):
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(c["threads"]))
    rules = RuleSet.from_config(setting(c, "rules"), name="custom")
    if not rules.modality_rules:
        raise ConfigError("the rule set has no modality rules: pick one with rules=NAME or write your own")
    inv = _read_input(c, inp)
    ids = _pseudonymizer(c, key_path)
    plan = _plan_patients(c, inv, ids)
    ctx = Context(cfg=c, rules=rules, scrub=plan.scrub)
    result = PrepareResult(out=out)
    result.warnings = [plan.scrub(w) for w in inv.warnings]
    result.failures = plan.failures
    if c.get("dry_run"):
        return _dry_run(ctx, plan, ids, result, t0)

    tree = _open_output(c, out, result)
    processed = _process_patients(ctx, tree, plan.planned, result)
    records = _finished_records(tree, plan.all_pids, processed)
    result.cases = records
    extra_cols = list(setting(c, "labels.keep_columns") or [])
    labels_path = out / str(setting(c, "output.labels_csv"))
    write_labels_csv(labels_path, [{**r.get("extra", {}), **r} for r in records], extra_cols)
    ids.save()
    stale = [p.stem for p in tree.markers.glob("*.json") if p.stem not in set(plan.all_pids)]
    if stale:
        result.warnings.append(
            f"{len(stale)} patient(s) prepared by an earlier run are not in this input: left out of labels.csv"
        )
    for w in result.warnings:
        log.warning("%s", w)
    result.n_warnings = len(result.warnings) + sum(len(r.get("warnings", [])) for r in records)
    result.seconds = time.time() - t0
    log_record = _log_record(c, inp, inv, rules, ids, plan, result)
    _write_log(c, out, plan, log_record, result)
    _set_exit_code(c, result)
    log.info(
        "prepared %d case(s) of %d patient(s) (%d failed, %d warning(s), %d patient(s) skipped as finished) "
        "in %.1f s -> %s",
        len(records),
        len({r["patient"] for r in records}),
        len(result.failures),
        result.n_warnings,
        result.skipped,
        result.seconds,
        out,
    )
    return result


# ---- the steps of a run ----


def _read_input(c: dict[str, Any], inp: Path) -> Inventory:
    """Scan the input and attach labels (and centres for ``roi.mode=centre``); an input with no case fails."""
    inv = scan(c, inp)
    if not inv.patients:
        seen = f"{inv.n_files} file(s) of the kind seen" if inv.n_files else "nothing of the kind found"
        notes = "".join(f"; {w}" for w in inv.warnings)
        raise DataError(
            f"no case to prepare in this input folder (kind={c['kind']}: {seen}{notes})",
            path=inp,
            fix="check input=, kind= and the layout in docs/prepare.md",
        )
    attach_labels(inv, setting(c, "labels"))
    if setting(c, "roi.mode") == "centre":
        attach_centres(inv, setting(c, "roi"))
    return inv


def _pseudonymizer(c: dict[str, Any], key_path: Path) -> Pseudonymizer:
    return Pseudonymizer(
        mode=str(setting(c, "privacy.ids")),
        key_file=key_path,
        prefix=str(setting(c, "privacy.prefix") or ""),
        length=int(setting(c, "privacy.hash_length")),
        salt=setting(c, "privacy.salt"),
        mapping_csv=setting(c, "privacy.mapping_csv"),
    )


def _plan_patients(c: dict[str, Any], inv: Inventory, ids: Pseudonymizer) -> _Plan:
    """Pseudonyms for every patient, the identifying values to scrub, and the patients of this run."""
    identifying: set[str] = set(inv.identifying)
    for p in inv.patients:
        identifying |= p.identifying | {p.key}
        identifying |= {s.key for s in p.studies} | {s.label_key for s in p.studies}
    min_len = int(setting(c, "privacy.min_value_length"))
    identifying = {v for v in identifying if len(v) >= min_len}
    planned: list[tuple[str, PatientSource]] = []
    id_failures: list[dict[str, Any]] = []
    for n, p in enumerate(inv.patients):
        try:
            planned.append((ids.patient_id(p.key), p))
        except DataError as exc:
            id_failures.append({"patient": f"#{n + 1}", "reason": exc.reason})
    if ids.mode == "keep":
        identifying -= {p.key for _, p in planned} | {pid for pid, _ in planned}
    scrub = Scrubber(identifying, min_length=min_len)
    planned.sort(key=lambda t: t[0])
    all_pids = [pid for pid, _ in planned]
    pid_set = set(all_pids)
    clashes = sorted(p for p in all_pids if re.match(r"^(.+)_\d+$", p) and p.rsplit("_", 1)[0] in pid_set)
    if clashes:
        raise ConfigError(
            f"patient id(s) {clashes[:5]} look like a further lesion of another patient ('<patient>_<k>'): "
            "use privacy.ids=hash or a mapping with other names"
        )
    if c.get("limit"):
        planned = planned[: int(c["limit"])]
    return _Plan(planned, all_pids, identifying, scrub, id_failures)


def _dry_run(
    ctx: Context, plan: _Plan, ids: Pseudonymizer, result: PrepareResult, t0: float
) -> PrepareResult:
    """``dry_run=true``: the rule report (which series would be which modality) instead of the data set."""
    report = dry_run_report(ctx, plan.planned)
    result.report = report.to_dict()
    result.report["series_problems"] = _series_problems(plan.planned)
    make_folder(result.out)
    atomic_write_text(
        result.out / "prepare_dry_run.json", json.dumps(plan.scrub.deep(result.report), indent=1)
    )
    log.info("%s", plan.scrub(report.format_table()))
    ids.save()
    result.seconds = time.time() - t0
    return result


def dry_run_report(ctx: Context, planned: list[tuple[str, PatientSource]]) -> MatchReport:
    report = MatchReport()
    for pid, patient in planned:
        for n, study in enumerate(patient.studies):
            name = pid if len(patient.studies) == 1 else f"{pid} study {n + 1}"
            m = match_study(
                ctx.rules, [ctx.scrub(s.text) for s in study.series], [s.order for s in study.series], name
            )
            for entry, s in zip(m.entries, study.series):
                if s.problems:
                    entry["problems"] = [ctx.scrub(p) for p in s.problems]
                if s.warnings:
                    entry["warnings"] = [ctx.scrub(w) for w in s.warnings]
            report.add(m)
    return report


def _series_problems(planned: list[tuple[str, PatientSource]]) -> int:
    return sum(1 for _, p in planned for s in p.studies for x in s.series if x.problems)


def _open_output(c: dict[str, Any], out: Path, result: PrepareResult) -> OutputTree:
    """The output tree, refused when it holds cases of other settings (unless ``overwrite``); half-written
    case folders of an interrupted run are removed."""
    tree = OutputTree(out, qa_dir=str(setting(c, "output.qa_dir")))
    fingerprint = json.loads(json.dumps(settings_fingerprint(c), default=str))
    previous = tree.read_settings() if tree.state.is_dir() else None
    if previous is not None and previous != fingerprint and not c.get("overwrite"):
        changed = diff_settings(previous, fingerprint)
        raise ConfigError(
            f"{out} holds cases prepared with other settings (changed: {', '.join(changed[:8])}); "
            "use a new out folder or overwrite=true"
        )
    if c.get("overwrite") and tree.state.is_dir():
        tree.clear()
    make_folder(out)
    try:
        leftovers = tree.prepare()
    except OSError as exc:
        raise ConfigError(
            f"out={out}: cannot write the data set folders ({exc.strerror or exc}: {exc.filename})",
            fix="choose a folder you may write to",
        ) from None
    if leftovers:
        result.warnings.append(f"removed {leftovers} half-written case folder(s) left by an interrupted run")
    tree.write_settings(fingerprint)
    return tree


def _process_patients(
    ctx: Context, tree: OutputTree, planned: list[tuple[str, PatientSource]], result: PrepareResult
) -> set[str]:
    """Every planned patient not finished by an earlier run (all with ``overwrite``); returns those processed."""
    c = ctx.cfg
    processed: set[str] = set()
    bar = tqdm(planned, desc="prepare", unit="patient", disable=not c["progress"])
    for pid, patient in bar:
        bar.set_postfix_str(pid)
        if not c.get("overwrite") and tree.finished(pid) is not None:
            result.skipped += 1
            continue
        done, failures = process_patient(ctx, tree, pid, patient)
        processed.add(pid)
        result.failures += failures
        for f in failures:
            log.warning("%s: failed: %s", f.get("case") or f["patient"], f["reason"])
        for r in done:
            for w in r["warnings"]:
                log.warning("%s: %s", r["case"], w)
    bar.close()
    return processed


def _finished_records(tree: OutputTree, all_pids: list[str], processed: set[str]) -> list[dict[str, Any]]:
    """Every finished case of a patient in this input (also those of earlier runs and those beyond ``limit``)."""
    records: list[dict[str, Any]] = []
    for pid in all_pids:
        marker = tree.read_marker(pid)
        if marker:
            for r in marker.get("cases", []):
                if (tree.subjects / r["case"]).is_dir():
                    records.append(r if pid in processed else {**r, "from_earlier_run": True})
    records.sort(key=lambda r: r["case"])
    return records


def _log_record(
    c: dict[str, Any],
    inp: Path,
    inv: Inventory,
    rules: RuleSet,
    ids: Pseudonymizer,
    plan: _Plan,
    result: PrepareResult,
) -> dict[str, Any]:
    """The content of prepare_log.json (before scrubbing)."""
    records = result.cases
    return {
        "tool": "liverfusion.prepare",
        "version": liverfusion.__version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(result.seconds, 2),
        "inputs": {
            "kind": c["kind"],
            "root": str(inp),
            "files": inv.n_files,
            "patients": len(inv.patients),
            "studies": sum(len(p.studies) for p in inv.patients),
            "series": sum(len(s.series) for p in inv.patients for s in p.studies),
        },
        "config": sanitized_config(c),
        "rules": rules.describe(),
        "summary": {
            "cases": len(records),
            "patients": len({r["patient"] for r in records}),
            "failures": len(result.failures),
            "warnings": result.n_warnings,
            "skipped_finished_patients": result.skipped,
            "labels": dict(Counter(r["label"] for r in records)),
            "modalities": dict(Counter(m for r in records for m in r.get("modalities", {}))),
        },
        "warnings": result.warnings,
        "failures": result.failures,
        "cases": records,
        "privacy": {
            "ids": ids.mode,
            "key_file": "outside the data set (path not recorded)",
            "identifying_values_known": len(plan.identifying),
        },
    }


def _write_log(
    c: dict[str, Any], out: Path, plan: _Plan, log_record: dict[str, Any], result: PrepareResult
) -> None:
    """Write prepare_log.json, run the privacy audit over the outputs and record it there too."""
    scrub = plan.scrub
    result.log_path = out / "prepare_log.json"
    atomic_write_text(result.log_path, json.dumps(scrub.deep(log_record), indent=1, default=str))
    if not setting(c, "privacy.audit"):
        return
    audit = audit_outputs(out, plan.identifying)
    audit["hits"] = [scrub(h) for h in audit["hits"]]
    log_record["privacy"]["audit"] = audit
    atomic_write_text(result.log_path, json.dumps(scrub.deep(log_record), indent=1, default=str))
    if audit["hits"]:
        log.error(
            "privacy audit: identifying values found in %d output file(s): %s",
            len(audit["hits"]),
            audit["hits"][:5],
        )
        result.exit_code = EXIT_PRIVACY


def _set_exit_code(c: dict[str, Any], result: PrepareResult) -> None:
    """1 when every case failed, or with ``strict=true`` any failure or warning (the privacy code 3 stays)."""
    if result.exit_code:
        return
    if result.failures and not result.cases:
        result.exit_code = EXIT_FAILED_CASES
        log.error("no case could be prepared: every one failed (reasons above and in %s)", result.log_path)
    elif c.get("strict") and (result.failures or result.n_warnings):
        result.exit_code = EXIT_FAILED_CASES
        log.error(
            "strict=true: %d failure(s) and %d warning(s) fail this run (reasons above and in %s)",
            len(result.failures),
            result.n_warnings,
            result.log_path,
        )
