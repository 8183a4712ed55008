"""``run_prepare(cfg)``: export in, training-ready data set out. The Hydra wrapper lives in ``__main__``.

Flow: scan the input (no pixels) -> labels/centres -> pseudonyms -> per patient: match series to modalities, load,
reorient, register, resample, crop, write each case folder atomically, QA PNG, marker -> labels.csv, prepare_log.json,
private key file, privacy audit. A broken case is recorded with its reason and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError, MissingMandatoryValue
from tqdm import tqdm

import liverfusion
from liverfusion.errors import ConfigError, DataError
from liverfusion.prepare import geometry as geo
from liverfusion.prepare.dicom import DEFAULT_PHI_TAGS, scan_dicom_tree
from liverfusion.prepare.labels import attach_centres, attach_labels, map_label
from liverfusion.prepare.lldmmri_raw import lesion_case_suffix, official_crop_box, scan_lldmmri
from liverfusion.prepare.nifti_folders import scan_nifti_folders
from liverfusion.prepare.output import OutputTree, diff_settings, write_labels_csv
from liverfusion.prepare.privacy import Pseudonymizer, Scrubber, audit_outputs
from liverfusion.prepare.qa import Panel, render_case
from liverfusion.prepare.roi import (
    IndexBox,
    box_in_grid,
    centre_box,
    crop_with_pad,
    dhw_to_xyz,
    margin_voxels,
    mask_boxes,
)
from liverfusion.prepare.rules import MASK, MatchReport, RuleSet, StudyMatch, match_study
from liverfusion.prepare.sources import Inventory, PatientSource, SeriesSource, StudySource
from liverfusion.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

KINDS = ("dicom", "nifti", "lldmmri")
ROI_MODES = ("none", "mask", "centre")
RUNTIME_KEYS = ("input", "out", "dry_run", "strict", "overwrite", "progress", "limit", "threads", "hydra")
"""Settings that do not change what a case contains (left out of the data set's settings fingerprint)."""
EXIT_FAILED_CASES = 1
EXIT_PRIVACY = 3


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
class BuiltCase:
    key: str
    """Lesion key (LLD-MMRI) or running number within the study."""
    volumes: dict[str, sitk.Image]
    label_raw: Any
    extra: dict[str, Any]
    record: dict[str, Any]
    warnings: list[str]
    panels: list[Panel]


@dataclass
class Context:
    cfg: dict[str, Any]
    rules: RuleSet
    scrub: Scrubber
    reference: str | None = None


def _get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def to_plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        try:
            data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as exc:
            raise ConfigError(
                f"{exc.full_key}=... is required (python -m liverfusion.prepare input=EXPORT out=DATASET kind=...)"
            ) from None
        except (InterpolationResolutionError, InterpolationKeyError) as exc:
            raise ConfigError(f"config value cannot be resolved: {exc}") from None
    else:
        data = json.loads(json.dumps(cfg, default=str))
    data = dict(data)  # type: ignore[arg-type]
    data.pop("hydra", None)
    return data


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def validate(cfg: dict[str, Any]) -> tuple[Path, Path, Path]:
    """Paths and choices that cannot work fail here, before anything is read or written."""
    for key in ("input", "out"):
        if not cfg.get(key) or str(cfg[key]) == "???":
            raise ConfigError(
                f"{key}=... is required (python -m liverfusion.prepare input=EXPORT out=DATASET kind=...)"
            )
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, not {kind!r}")
    mode = _get(cfg, "roi.mode", "none")
    if mode not in ROI_MODES:
        raise ConfigError(f"roi.mode must be one of {ROI_MODES}, not {mode!r}")
    if kind == "lldmmri" and mode != "none":
        raise ConfigError("kind=lldmmri crops on the Annotation.json boxes: leave roi.mode=none")
    resample = _get(cfg, "geometry.resample", "reference")
    if resample not in ("reference", "spacing", "none"):
        raise ConfigError(f"geometry.resample must be reference, spacing or none, not {resample!r}")
    if resample == "spacing" and not _get(cfg, "geometry.spacing"):
        raise ConfigError("geometry.resample=spacing needs geometry.spacing=[sD,sH,sW] in mm")
    inp = Path(str(cfg["input"])).expanduser().resolve()
    out = Path(str(cfg["out"])).expanduser().resolve()
    if not inp.is_dir():
        raise DataError("input folder does not exist", path=inp)
    if _inside(out, inp):
        raise ConfigError(f"out={out} lies inside the input tree {inp}: the input is never written to")
    if _inside(inp, out):
        raise ConfigError(f"input={inp} lies inside out={out}: choose an output folder outside the export")
    key_file = _get(cfg, "privacy.key_file")
    key_path = (
        Path(str(key_file)).expanduser().resolve()
        if key_file
        else out.parent / f"{out.name}.private_ids.json"
    )
    if _inside(key_path, inp) or _inside(key_path, out):
        raise ConfigError(
            f"privacy.key_file={key_path} must lie outside both the input tree and the output folder"
        )
    _check_creatable(out, "out")
    _check_creatable(key_path.parent, "privacy.key_file")
    return inp, out, key_path


def _check_creatable(folder: Path, key: str) -> None:
    """A folder that cannot be made or written fails before anything is read (not as an OSError half-way)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    fix = "choose a folder you may write to"
    if not probe.is_dir():
        raise ConfigError(f"{key}={folder}: cannot be created: {probe} is a file, not a folder", fix=fix)
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == folder else f"cannot be created: {probe} is not writable"
        raise ConfigError(f"{key}={folder}: {what}", fix=fix)


def _make_folder(folder: Path, key: str = "out") -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{key}={folder}: the folder cannot be created ({exc.strerror or exc})",
            fix="choose a folder you may write to",
        ) from None


def scan(cfg: dict[str, Any], root: Path) -> Inventory:
    kind = cfg["kind"]
    min_len = int(_get(cfg, "privacy.min_value_length", 3))
    if kind == "dicom":
        tags = list(_get(cfg, "privacy.phi_tags", DEFAULT_PHI_TAGS))
        return scan_dicom_tree(root, _get(cfg, "dicom", {}), tags, min_len)
    if kind == "nifti":
        return scan_nifti_folders(root, _get(cfg, "nifti", {}), min_len)
    return scan_lldmmri(root, _get(cfg, "lldmmri", {}))


def settings_fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}
    priv = dict(data.get("privacy") or {})
    priv.pop("salt", None)
    priv.pop("key_file", None)
    data["privacy"] = priv
    out = dict(data.get("output") or {})
    out.pop("qa", None)
    data["output"] = out
    return data


def sanitized_config(cfg: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(cfg, default=str))
    if _get(data, "privacy.salt"):
        data["privacy"]["salt"] = "<set>"
    return data


# ---------------------------------------------------------------------------------------------------------------
def run_prepare(cfg: DictConfig | Mapping[str, Any]) -> PrepareResult:
    """Prepare a data set; returns what was done. Raises ConfigError/DataError only for problems of the whole run."""
    t0 = time.time()
    c = to_plain(cfg)
    inp, out, key_path = validate(c)
    if c.get("threads"):
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(c["threads"]))
    rules = RuleSet.from_config(_get(c, "rules", {}), name=str(_get(c, "rules.name", "custom")))
    if not rules.modality_rules:
        raise ConfigError("the rule set has no modality rules: pick one with rules=NAME or write your own")
    inv = scan(c, inp)
    if not inv.patients:
        seen = f"{inv.n_files} file(s) of the kind seen" if inv.n_files else "nothing of the kind found"
        notes = "".join(f"; {w}" for w in inv.warnings)
        raise DataError(
            f"no case to prepare in this input folder (kind={c['kind']}: {seen}{notes})",
            path=inp,
            fix="check input=, kind= and the layout in docs/prepare.md",
        )
    attach_labels(inv, _get(c, "labels", {}))
    if _get(c, "roi.mode") == "centre":
        attach_centres(inv, _get(c, "roi", {}))

    ids = Pseudonymizer(
        mode=str(_get(c, "privacy.ids", "hash")),
        key_file=key_path,
        prefix=str(_get(c, "privacy.prefix", "")),
        length=int(_get(c, "privacy.hash_length", 10)),
        salt=_get(c, "privacy.salt"),
        mapping_csv=_get(c, "privacy.mapping_csv"),
    )
    identifying: set[str] = set(inv.identifying)
    for p in inv.patients:
        identifying |= p.identifying | {p.key}
        identifying |= {s.key for s in p.studies} | {s.label_key for s in p.studies}
    min_len = int(_get(c, "privacy.min_value_length", 3))
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
    ctx = Context(cfg=c, rules=rules, scrub=scrub)
    result = PrepareResult(out=out)
    result.warnings = [scrub(w) for w in inv.warnings]
    result.failures = id_failures

    if c.get("dry_run"):
        report = dry_run_report(ctx, planned)
        result.report = report.to_dict()
        result.report["series_problems"] = _series_problems(ctx, planned)
        _make_folder(out)
        atomic_write_text(out / "prepare_dry_run.json", json.dumps(scrub.deep(result.report), indent=1))
        log.info("%s", scrub(report.format_table()))
        ids.save()
        result.seconds = time.time() - t0
        return result

    tree = OutputTree(out, qa_dir=str(_get(c, "output.qa_dir", "qa")))
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
    _make_folder(out)
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

    processed: set[str] = set()
    bar = tqdm(planned, desc="prepare", unit="patient", disable=not c.get("progress", True))
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
    # every finished case of a patient in this input (also those of earlier runs and those beyond `limit`)
    records: list[dict[str, Any]] = []
    for pid in all_pids:
        marker = tree.read_marker(pid)
        if marker:
            for r in marker.get("cases", []):
                if (tree.subjects / r["case"]).is_dir():
                    records.append(r if pid in processed else {**r, "from_earlier_run": True})
    records.sort(key=lambda r: r["case"])
    result.cases = records

    extra_cols = list(_get(c, "labels.keep_columns", []) or [])
    labels_path = out / str(_get(c, "output.labels_csv", "labels.csv"))
    write_labels_csv(labels_path, [{**r.get("extra", {}), **r} for r in records], extra_cols)
    ids.save()
    stale = [p.stem for p in tree.markers.glob("*.json") if p.stem not in set(all_pids)]
    if stale:
        result.warnings.append(
            f"{len(stale)} patient(s) prepared by an earlier run are not in this input: left out of labels.csv"
        )
    for w in result.warnings:
        log.warning("%s", w)
    result.n_warnings = len(result.warnings) + sum(len(r.get("warnings", [])) for r in records)
    result.seconds = time.time() - t0
    log_record = {
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
            "identifying_values_known": len(identifying),
        },
    }
    result.log_path = out / "prepare_log.json"
    log_text = json.dumps(scrub.deep(log_record), indent=1, default=str)
    atomic_write_text(result.log_path, log_text)
    if _get(c, "privacy.audit", True):
        audit = audit_outputs(out, identifying)
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
    if not result.exit_code:
        if result.failures and not records:
            result.exit_code = EXIT_FAILED_CASES
            log.error(
                "no case could be prepared: every one failed (reasons above and in %s)", result.log_path
            )
        elif c.get("strict") and (result.failures or result.n_warnings):
            result.exit_code = EXIT_FAILED_CASES
            log.error(
                "strict=true: %d failure(s) and %d warning(s) fail this run (reasons above and in %s)",
                len(result.failures),
                result.n_warnings,
                result.log_path,
            )
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


def _series_problems(ctx: Context, planned: list[tuple[str, PatientSource]]) -> int:
    return sum(1 for _, p in planned for s in p.studies for x in s.series if x.problems)


# ---------------------------------------------------------------------------------------------------------------
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
        label, warning = map_label(case.label_raw, _get(c, "labels.map"))
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
        if _get(c, "output.qa", True):
            title = f"{name}   patient {pid}   label {label if label != '' else '-'}"
            try:
                render_case(
                    tree.qa / f"{name}.png",
                    title,
                    case.panels,
                    reference=ctx.reference,
                    tile=int(_get(c, "qa.tile_pixels", 192)),
                    percentiles=tuple(_get(c, "qa.percentiles", [1.0, 99.0])),  # type: ignore[arg-type]
                    checker_tiles=int(_get(c, "qa.checker_tiles", 6)),
                )
                record["qa"] = f"{tree.qa.name}/{name}.png"
            except Exception as exc:  # a QA figure must never cost a prepared case
                warnings.append(f"QA figure failed: {type(exc).__name__}: {ctx.scrub(str(exc))}")
        records.append(record)
    tree.write_marker(pid, {"patient": pid, "cases": records, "failures": failures})
    return records, failures


def build_study(ctx: Context, study: StudySource, pid: str) -> tuple[list[BuiltCase], list[dict[str, Any]]]:
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


def load_modality(s: SeriesSource) -> sitk.Image:
    """Pixels of a series used as a modality, through the shared voxel rule (``check_voxels``): a mask, a constant
    or all-NaN volume, complex or boolean data given as an MR image is a DataError naming the file."""
    if s.problems:
        raise DataError("; ".join(s.problems), path=s.path)
    return s.load(check=True)


def load_mask(s: SeriesSource) -> sitk.Image:
    """A region-of-interest mask: read like any series, but two values are what a mask should have."""
    if s.problems:
        raise DataError("; ".join(s.problems), path=s.path)
    return s.load()


def _reference_name(ctx: Context, available: list[str]) -> str:
    g = _get(ctx.cfg, "geometry", {})
    ref = g.get("reference") or ctx.rules.reference or (ctx.rules.required[0] if ctx.rules.required else None)
    if ref is None:
        ref = available[0]
    ctx.reference = ref
    return ref


def _registration_targets(ctx: Context, names: list[str], ref: str) -> list[str]:
    wanted = _get(ctx.cfg, "geometry.register", []) or []
    if wanted == "all" or wanted == ["all"]:
        return [n for n in names if n != ref]
    return [n for n in names if n in set(wanted) and n != ref]


def _cast_output(img: sitk.Image, dtype: str) -> sitk.Image:
    if dtype in ("keep", "", None):
        return img
    table = {
        "float32": sitk.sitkFloat32,
        "int16": sitk.sitkInt16,
        "uint16": sitk.sitkUInt16,
        "uint8": sitk.sitkUInt8,
    }
    if dtype not in table:
        raise ConfigError(f"output.dtype must be keep or one of {sorted(table)}, not {dtype!r}")
    return sitk.Cast(img, table[dtype]) if dtype == "float32" else geo.cast_like(img, table[dtype])


def build_general(
    ctx: Context, study: StudySource, match: StudyMatch, warnings: list[str]
) -> tuple[list[BuiltCase], list[dict[str, Any]]]:
    """DICOM / NIfTI studies: whole volumes or crops around a mask / centres, on a common grid.

    Returns the cases and the boxes that failed (a box outside the reference or a required modality); a problem of
    the whole study raises DataError."""
    c = ctx.cfg
    g = _get(c, "geometry", {})
    required = set(ctx.rules.required)
    if match.missing_required:
        seen = [e["text"] for e in match.entries]
        raise DataError(f"required modality {match.missing_required} missing (series seen: {seen})")
    images: dict[str, sitk.Image] = {}
    records: dict[str, dict[str, Any]] = {}
    for mod, idx in match.chosen.items():
        s = study.series[idx]
        warnings += [f"{mod}: {w}" for w in s.warnings]
        try:
            img = load_modality(s)
        except DataError as exc:
            msg = f"{mod} (series {s.text!r}): {exc}"
            if mod in required or mod == g.get("reference"):
                raise DataError(msg) from None
            warnings.append(msg + ": modality left out")
            continue
        images[mod] = img
        records[mod] = {"source": {"text": s.text, **s.info, "geometry": geo.describe(img)}, "steps": []}
    if not images:
        raise DataError(
            "no series could be used (see the rule report: python -m liverfusion.prepare ... dry_run=true)"
        )
    warnings += _exact_copies(images)
    mask = None
    roi_mode = _get(c, "roi.mode", "none")
    if match.mask_index is not None:
        ms = study.series[match.mask_index]
        try:
            mask = load_mask(ms)
        except DataError as exc:
            if roi_mode == "mask":
                raise DataError(f"mask (series {ms.text!r}): {exc}") from None
            warnings.append(f"mask (series {ms.text!r}): {exc}: ignored")
    if roi_mode == "mask" and mask is None:
        raise DataError("roi.mode=mask but no series matched rules.masks")

    # orientation ------------------------------------------------------------------------------------------
    orientation = g.get("orientation")
    for mod in images:
        images[mod], step = geo.reorient(images[mod], orientation)
        if step:
            records[mod]["steps"].append(step)
    if mask is not None:
        mask, _ = geo.reorient(mask, orientation)

    # common grid ------------------------------------------------------------------------------------------
    ref = _reference_name(ctx, list(images))
    if ref not in images:
        raise DataError(f"reference modality {ref!r} is missing (have {sorted(images)})")
    resample = g.get("resample", "reference")
    grid = None
    if resample == "reference":
        grid = images[ref]
    elif resample == "spacing":
        grid = geo.spacing_grid(images[ref], g["spacing"])
    interp = str(g.get("interpolation", "linear"))
    dtype = str(_get(c, "output.dtype", "keep"))
    min_cov = float(g.get("min_coverage", 0.5))
    reg_cfg = dict(g.get("registration") or {})
    transforms: dict[str, sitk.Transform] = {}
    for mod in _registration_targets(ctx, list(images), ref):
        try:
            tx, info = geo.register_rigid(images[ref], images[mod], reg_cfg)
        except RuntimeError as exc:
            warnings.append(
                f"{mod}: rigid registration failed ({str(exc).strip().splitlines()[-1][:200]}): not registered"
            )
            continue
        shift = max(abs(t) for t in info["translation_mm_xyz"])
        turn = max(abs(a) for a in info["rotation_deg_xyz"])
        if shift > float(reg_cfg.get("max_translation_mm", 20)) or turn > float(
            reg_cfg.get("max_rotation_deg", 10)
        ):
            info["accepted"] = False
            warnings.append(
                f"{mod}: registration result rejected (translation {shift:.1f} mm, rotation {turn:.1f} deg above "
                "geometry.registration.max_*): not registered"
            )
        else:
            info["accepted"] = True
            transforms[mod] = tx
            records[mod]["steps"].append(
                f"rigid registration to {ref}: rotation {info['rotation_deg_xyz']} deg, "
                f"translation {info['translation_mm_xyz']} mm"
            )
        records[mod]["registration"] = info
    if grid is not None:
        for mod in list(images):
            tx = transforms.get(mod)
            if tx is None and geo.same_grid(images[mod], grid):
                continue
            cov = geo.coverage(images[mod], grid, tx)
            records[mod]["coverage_of_grid"] = round(cov, 4)
            if cov < min_cov:
                warnings.append(
                    f"{mod}: covers only {cov:.0%} of the {ref} grid (geometry.min_coverage={min_cov:.0%})"
                )
            images[mod] = geo.resample_onto(images[mod], grid, interp, tx, dtype=dtype)
            target = f"{ref} grid" if resample == "reference" else f"{g['spacing']} mm grid over {ref}"
            records[mod]["steps"].append(f"resampled onto the {target} ({interp})")
        if mask is not None and not geo.same_grid(mask, grid):
            mask = geo.resample_mask(mask, grid)
    elif transforms:
        for mod, tx in transforms.items():
            images[mod] = geo.resample_onto(images[mod], images[mod], interp, tx, dtype=dtype)
    images = {m: _cast_output(img, dtype) for m, img in images.items()}
    ref_img = grid if grid is not None else images[ref]

    # region of interest -----------------------------------------------------------------------------------
    r = _get(c, "roi", {})
    boxes: list[tuple[IndexBox, dict[str, Any], Any]] = []  # box in ref_img's grid, record, label override
    if roi_mode == "none":
        boxes = []
    elif roi_mode == "mask":
        labels = r.get("mask_labels")
        found = mask_boxes(
            mask, labels, bool(r.get("components", False)), int(r.get("min_component_voxels", 1))
        )
        if not found:
            raise DataError(f"mask is empty (roi.mask_labels={labels})")
        n = len(found)
        for k, b in enumerate(found):
            what = f"component {k + 1} of {n}" if r.get("components") else "whole mask"
            boxes.append(
                (_grow(b, mask, r), {"source": f"mask bounding box ({what})", "mask_box": b.to_dict()}, None)
            )
        ref_for_boxes = mask
    else:  # centre
        if not study.centres:
            raise DataError("roi.mode=centre but the centres CSV has no row for this case")
        size = dhw_to_xyz(r.get("size") or [16, 64, 64])
        for k, centre in enumerate(study.centres):
            b = centre_box(ref_img, centre["point_lps"], [int(v) for v in size])  # type: ignore[union-attr]
            boxes.append((b, {"source": f"centre {k + 1} of {len(study.centres)}"}, centre.get("label_raw")))
        ref_for_boxes = ref_img
    pad = float(r.get("pad_value", 0))
    save_mask = bool(r.get("save_mask", True)) and mask is not None
    shown_mask = _selected(mask, r.get("mask_labels")) if mask is not None else None
    out: list[BuiltCase] = []
    if not boxes:
        vols = dict(images)
        if save_mask and grid is not None:
            vols[MASK] = mask
        rec = {
            "modalities": {m: {**records[m], "output": geo.describe(images[m])} for m in images},
            "roi": {"mode": "none"},
        }
        panels = [
            Panel(m, images[m], None, images[m], shown_mask if grid is not None else None) for m in images
        ]
        out.append(BuiltCase("0", vols, study.label_raw, dict(study.extra), rec, list(warnings), panels))
        return out, []
    failures: list[dict[str, Any]] = []
    must_have = required | {ref}
    for k, (box, box_rec, label_override) in enumerate(boxes):
        case_warn = list(warnings)
        vols: dict[str, sitk.Image] = {}
        panels = []
        mod_recs = {}
        padded: list[str] = []
        outside: list[str] = []
        for m, img in images.items():
            b = (
                box
                if (ref_for_boxes is img or geo.same_grid(ref_for_boxes, img))
                else box_in_grid(box, ref_for_boxes, img)
            )
            if b.outside(img.GetSize()):
                outside.append(m)
                continue
            if b.leaves(img.GetSize()):
                padded.append(m)
            vols[m] = crop_with_pad(img, b, pad)
            mod_recs[m] = {**records[m], "output": geo.describe(vols[m]), "box": b.to_dict()}
            on_grid = shown_mask is not None and geo.same_grid(shown_mask, img)
            panels.append(Panel(m, img, b, vols[m], shown_mask if on_grid else None))
        lost = [m for m in outside if m in must_have]
        if lost or not vols:
            where = "every modality" if not vols else f"the image of {', '.join(lost)}"
            failures.append(
                {
                    "roi": box_rec["source"],
                    "reason": f"box {box.to_dict()} lies entirely outside {where} "
                    f"(its grid: D, H, W = {list(ref_for_boxes.GetSize()[::-1])})",
                }
            )
            continue
        for m in outside:
            case_warn.append(f"{m}: the box lies entirely outside this optional modality's volume: left out")
        if padded:
            which = "every modality" if len(padded) == len(vols) else ", ".join(padded)
            case_warn.append(
                f"box {box.to_dict()} reaches past the image border ({which}): padded with {pad:g}"
            )
        if save_mask:
            mb = box if geo.same_grid(ref_for_boxes, mask) else box_in_grid(box, ref_for_boxes, mask)
            vols[MASK] = crop_with_pad(mask, mb, 0)
        rec = {"modalities": mod_recs, "roi": {"mode": roi_mode, **box_rec, "box": box.to_dict()}}
        label = study.label_raw if label_override in (None, "") else label_override
        out.append(BuiltCase(str(k), vols, label, dict(study.extra), rec, case_warn, panels))
    if not out:
        raise DataError("; ".join(f["reason"] for f in failures))
    return out, failures


def _exact_copies(images: Mapping[str, sitk.Image]) -> list[str]:
    """Exports fill missing sequences with copies of another one (LGG: FLAIR): say so, the data layer masks them."""
    seen: dict[str, str] = {}
    out = []
    for name, img in images.items():
        digest = hashlib.blake2b(sitk.GetArrayViewFromImage(img).tobytes(), digest_size=16).hexdigest()
        key = f"{img.GetSize()}{digest}"
        if key in seen:
            out.append(f"{name} is a voxel-exact copy of {seen[key]} (a filler for a missing sequence?)")
        else:
            seen[key] = name
    return out


def _selected(mask: sitk.Image, labels: Any) -> sitk.Image:
    """The voxels of ``mask`` that count for the region of interest, as 0/1 (for the QA outline)."""
    arr = sitk.GetArrayViewFromImage(mask)
    sel = np.isin(arr, list(labels)) if labels else arr != 0
    out = sitk.GetImageFromArray(sel.astype(np.uint8))
    out.CopyInformation(mask)
    return out


def _grow(box: IndexBox, image: sitk.Image, r: Mapping[str, Any]) -> IndexBox:
    margin = margin_voxels(image, r.get("margin"), r.get("margin_mm"))
    grown = box.expanded(margin)
    min_size = dhw_to_xyz(r.get("min_size"))
    return grown.at_least([int(v) for v in min_size]) if min_size else grown


def build_lldmmri(
    ctx: Context, study: StudySource, match: StudyMatch, warnings: list[str]
) -> tuple[list[BuiltCase], list[dict[str, Any]]]:
    """One case per lesion; each phase cropped on its own box (official margins), real geometry kept."""
    c = ctx.cfg
    lcfg = _get(c, "lldmmri", {})
    margin = [int(v) for v in lcfg.get("margin", [2, 16, 16])]
    pad_slices = bool(lcfg.get("pad_slices", False))
    tol = float(lcfg.get("spacing_tolerance", 0.02))
    g = _get(c, "geometry", {})
    dtype = str(_get(c, "output.dtype", "keep"))
    images: dict[str, sitk.Image] = {}
    phase_warn: list[str] = []
    for mod, idx in match.chosen.items():
        s = study.series[idx]
        try:
            images[mod] = load_modality(s)
        except DataError as exc:
            phase_warn.append(f"{mod}: {exc}: phase left out")
            continue
        sp = images[mod].GetSpacing()
        ps, st = s.info.get("pixel_spacing"), s.info.get("slice_thickness")
        try:
            if ps is not None and max(abs(float(a) - b) / b for a, b in zip(list(ps)[:2], sp[:2])) > tol:
                phase_warn.append(
                    f"{mod}: pixel_spacing {list(ps)} in Annotation.json differs from the image header {list(sp[:2])}"
                )
            if st is not None and abs(float(st) - sp[2]) / sp[2] > tol:
                phase_warn.append(
                    f"{mod}: slice_thickness {st} in Annotation.json differs from the slice spacing {sp[2]:.3g}"
                )
        except (TypeError, ValueError):
            phase_warn.append(f"{mod}: pixel_spacing/slice_thickness in Annotation.json are not numbers")
    keys = sorted(
        {k for i in match.chosen.values() for k in study.series[i].boxes}, key=lambda k: (len(k), k)
    )
    if not keys:
        raise DataError("no lesion box in any usable phase")
    ref = _reference_name(ctx, list(images) or list(match.chosen))
    out: list[BuiltCase] = []
    failures: list[dict[str, Any]] = []
    for key in keys:
        case_warn = list(warnings) + list(phase_warn)
        vols: dict[str, sitk.Image] = {}
        panels: list[Panel] = []
        mod_recs: dict[str, Any] = {}
        categories: list[Any] = []
        for mod, img in images.items():
            box = study.series[match.chosen[mod]].boxes.get(key)
            if box is None:
                case_warn.append(f"{mod}: no box for this lesion: phase left out")
                continue
            if box.error:
                case_warn.append(f"{mod}: {box.error}: phase left out")
                continue
            try:
                crop_box, w = official_crop_box(box, img.GetSize(), margin, pad_slices)
                crop = crop_with_pad(img, crop_box, float(lcfg.get("pad_value", 0)))
            except DataError as exc:
                case_warn.append(f"{mod}: {exc.reason}: phase left out")
                continue
            case_warn += [f"{mod}: {x}" for x in w]
            categories.append(box.category)
            rec = {
                "source": {"text": study.series[match.chosen[mod]].text, "geometry": geo.describe(img)},
                "annotation_box": {"lo_xyz": list(box.lo), "hi_xyz_inclusive": list(box.hi)},
                "crop": crop_box.to_dict(),
                "steps": [],
            }
            crop, step = geo.reorient(crop, g.get("orientation"))
            if step:
                rec["steps"].append(step)
            vols[mod] = crop
            mod_recs[mod] = rec
            panels.append(Panel(mod, img, crop_box, crop))
        if not vols:
            failures.append(
                {"lesion": key, "reason": "; ".join(ctx.scrub(w) for w in case_warn) or "no phase"}
            )
            continue
        missing = [m for m in ctx.rules.required if m not in vols]
        if missing:
            failures.append(
                {"lesion": key, "reason": f"required phase(s) {missing} missing: " + "; ".join(case_warn)}
            )
            continue
        if g.get("resample", "none") != "none" and ref in vols:
            grid = vols[ref] if g["resample"] == "reference" else geo.spacing_grid(vols[ref], g["spacing"])
            for mod in list(vols):
                if not geo.same_grid(vols[mod], grid):
                    vols[mod] = geo.resample_onto(
                        vols[mod], grid, str(g.get("interpolation", "linear")), dtype=dtype
                    )
                    mod_recs[mod]["steps"].append(f"resampled onto the {ref} crop grid")
        vols = {m: _cast_output(v, dtype) for m, v in vols.items()}
        for m in vols:
            mod_recs[m]["output"] = geo.describe(vols[m])
        counts = Counter(str(x) for x in categories if x is not None)
        label = counts.most_common(1)[0][0] if counts else None
        if len(counts) > 1:
            case_warn.append(f"phases disagree on the category {dict(counts)}: using {label}")
        rec = {"modalities": mod_recs, "roi": {"mode": "lldmmri_box", "lesion": key, "margin_dhw": margin}}
        out.append(BuiltCase(key, vols, label, {}, rec, case_warn, panels))
    return out, failures
