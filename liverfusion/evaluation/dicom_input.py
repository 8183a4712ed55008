"""A DICOM tree as ``predict`` input: the series are mapped to the model's modalities by one of ``prepare``'s rule
sets (``rules=<name>`` or a YAML file), ``prepare`` converts the tree into case folders in a temporary folder (the
same reorientation, resampling onto the reference grid and pseudonymous case ids as a data set prepared for
training), and the cases are predicted from there.

Case ids are pseudonyms (``prepare``'s salted hashes; with ``key_file`` pointing at the private key file of the
training data set they are the ids of that data set). So that the user knows whose prediction is whose, each case
keeps the link to its input: the study folder (relative to the input tree) and the folder of every series used.
That link is as identifying as the input's own folder names: the output belongs with the input, not with a shared
data set.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liverfusion.errors import ConfigError, DataError
from liverfusion.evaluation.inputs import has_dicom_files, name_key, nifti_stem

log = logging.getLogger(__name__)

PREPARE_CONF = Path(__file__).resolve().parents[1] / "conf"
RULES_DIR = PREPARE_CONF / "prepare" / "rules"


@dataclass
class DicomInput:
    """The case folders ``prepare`` made of a DICOM tree, and where each case came from."""

    root: Path
    """``<work>/prepared/subjects``: one folder per case, named by its pseudonym."""
    sources: dict[str, dict[str, Any]]
    """case id -> {"folder": study folder, "series": {modality: series folder}} (relative to the input tree)."""
    failures: list[dict[str, Any]] = field(default_factory=list)
    """Studies ``prepare`` could not convert, with the reason (and their folder)."""
    warnings: list[str] = field(default_factory=list)
    rules: str = ""
    log_path: Path | None = None
    unused: list[str] = field(default_factory=list)
    """Modalities the rule set made that the model does not take (e.g. DCE series for a T2/ADC model): ignored."""
    never: list[str] = field(default_factory=list)
    """The model's modalities the rule set cannot produce: missing (masked) in every case."""


def rule_set_names() -> list[str]:
    return sorted(p.stem for p in RULES_DIR.glob("*.yaml"))


def has_nifti_cases(root: Path) -> bool:
    """A NIfTI file directly in a sub-folder of ``root`` (a case folder input), or in ``root`` itself."""
    for p in root.iterdir():
        if p.is_file() and nifti_stem(p):
            return True
        if (
            p.is_dir()
            and not p.name.startswith(".")
            and any(q.is_file() and nifti_stem(q) for q in p.iterdir())
        ):
            return True
    return False


def looks_like_dicom_tree(root: Path, limit: int = 50) -> bool:
    """Files under ``root`` carry the DICOM preamble magic (``DICM`` at byte 128) and no case folder holds NIfTI."""
    return not has_nifti_cases(root) and has_dicom_files(root, limit)


def _compose_prepare(overrides: Sequence[str]) -> Any:
    """``conf/prepare.yaml`` composed with ``overrides``, also from inside a running Hydra app (predict's CLI):
    the app's global Hydra state is set aside and restored."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(PREPARE_CONF), version_base="1.3"):
            return compose("prepare", overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(
            f"prepare_overrides: {str(exc).splitlines()[0]}",
            fix="pass prepare's own keys, e.g. prepare_overrides=[geometry.resample=none] (docs/prepare.md)",
        ) from None
    finally:
        restore_gh_from_backup(backup)


def prepare_config(
    input_dir: Path,
    work: Path,
    rules: str,
    key_file: Path,
    overrides: Sequence[str] = (),
    progress: bool = False,
) -> dict[str, Any]:
    """The plain ``prepare`` config that converts ``input_dir`` into ``work/prepared`` with rule set ``rules`` (a
    name under ``conf/prepare/rules`` or a YAML file)."""
    from omegaconf import OmegaConf

    from liverfusion.prepare.settings import plain_settings

    rules_file = Path(str(rules)).expanduser()
    by_name = str(rules) in rule_set_names()
    if not by_name and not (rules_file.suffix in (".yaml", ".yml") and rules_file.is_file()):
        raise ConfigError(
            f"rules={rules!r}: no such rule set",
            fix=f"choose one of {rule_set_names()} or pass a rule YAML file (docs/prepare.md)",
        )
    cfg = _compose_prepare(
        [
            f"input={input_dir}",
            f"out={work / 'prepared'}",
            "kind=dicom",
            f"rules={rules if by_name else 'generic'}",
            f"privacy.key_file={key_file}",
            "privacy.audit=false",  # the converted cases stay in a temporary folder: no data set is shared
            "output.qa=false",
            f"progress={str(bool(progress)).lower()}",
            *overrides,
        ]
    )
    plain = plain_settings(cfg)
    if not by_name:
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(rules_file), resolve=True)
        except Exception as exc:  # a YAML syntax error
            raise ConfigError(f"rules={rules_file}: unreadable rule file ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"rules={rules_file}: a rule file is a mapping (modalities:, masks:, ...)")
        plain["rules"] = {"name": rules_file.stem, **loaded}
    return plain


def _check_names(rule_set: Any, modalities: Sequence[str], aliases: Mapping[str, str]) -> list[str]:
    """The rule set must produce some of the model's modality names, directly or through ``aliases``; returns the
    model's modalities it can never produce (missing, hence masked, in every case)."""
    import re

    targets = {name_key(a): str(m) for a, m in aliases.items()} | {name_key(m): str(m) for m in modalities}
    templates = sorted({r.template for r in rule_set.modality_rules})
    produced: set[str] = set()
    for t in templates:
        if "{" in t:  # a name filled from the series text: any model name it can take
            pattern = re.compile(
                "".join(
                    ".+" if part.startswith("{") else re.escape(name_key(part))
                    for part in re.split(r"(\{[^}]*\})", t)
                )
            )
            produced |= {m for k, m in targets.items() if pattern.fullmatch(k)}
        elif name_key(t) in targets:
            produced.add(targets[name_key(t)])
    if not produced:
        raise ConfigError(
            f"rules={rule_set.name}: its modality names {templates} are none of the model's modalities "
            f"{list(modalities)}",
            fix="choose the rule set the training data was prepared with, or map its names with "
            "aliases={<rule name>: <modality>}",
        )
    never = [m for m in modalities if m not in produced]
    if never:
        log.warning(
            "rules=%s names none of the series %s: these modalities will be missing (masked) in every case",
            rule_set.name,
            never,
        )
    return never


def _common_folder(paths: Sequence[str], root: Path) -> str:
    """The deepest folder holding every path, relative to ``root`` (``.`` for the root itself)."""
    if not paths:
        return ""
    common = Path(os.path.commonpath([str(Path(p)) for p in paths]))
    try:
        rel = common.relative_to(root)
    except ValueError:
        return str(common)
    return str(rel) if str(rel) else "."


def _unmatched_studies(inv: Any, rule_set: Any, root: Path) -> list[str]:
    """Studies none of whose series a modality rule claims: ``<folder>: series [...]``."""
    from liverfusion.prepare.rules import match_study

    bad = []
    for patient in inv.patients:
        for study in patient.studies:
            m = match_study(rule_set, [s.text for s in study.series], [s.order for s in study.series])
            if not m.chosen and not m.problems:
                folder = _common_folder([s.path for s in study.series if s.path], root)
                texts = sorted({s.text for s in study.series})
                bad.append(f"{folder}: series {texts}")
    return sorted(bad)


def prepare_dicom(
    input_dir: Path,
    work: Path,
    rules: str | None,
    modalities: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    key_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = False,
) -> DicomInput:
    """Convert the DICOM tree ``input_dir`` into case folders under ``work`` with ``prepare`` (nothing is written
    under the input) and link every case to the folders it came from."""
    from liverfusion.prepare.app import run_prepare, scan, validate
    from liverfusion.prepare.rules import RuleSet

    if not rules:
        raise ConfigError(
            f"input={input_dir} is a DICOM tree: its series must be mapped to the model's modalities {list(modalities)}",
            fix=f"pass rules=<name> (one of {rule_set_names()}) or rules=<your rule YAML>, as for prepare "
            "(docs/prepare.md)",
        )
    work.mkdir(parents=True, exist_ok=True)
    key = Path(key_file).expanduser().resolve() if key_file else work / "private_ids.json"
    cfg = prepare_config(input_dir, work, str(rules), key, overrides, progress)
    inp, _, _ = validate(cfg)
    rule_set = RuleSet.from_config(
        cfg.get("rules") or {}, name=str((cfg.get("rules") or {}).get("name", rules))
    )
    if not rule_set.modality_rules:
        raise ConfigError(f"rules={rules}: the rule set has no modality rules")
    never = _check_names(rule_set, modalities, aliases or {})
    inv = scan(cfg, inp)
    if not inv.patients:
        raise DataError(
            "no DICOM image series found in the input tree",
            path=inp,
            fix="pass the folder holding the exported series (input=<tree>)",
        )
    bad = _unmatched_studies(inv, rule_set, inp)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(
            f"DICOM series match no rule of rules={rule_set.name}: {shown}",
            path=inp,
            fix="choose the rule set of this export (the one the training data was prepared with), or write one: "
            "python -m liverfusion.prepare kind=dicom input=<tree> out=<folder> dry_run=true lists every series "
            "and what it matched",
        )
    result = run_prepare(cfg)
    subjects = work / "prepared" / "subjects"
    sources = _link_sources(inv, key, result, inp, rule_set)
    failures = []
    for f in result.failures:
        entry = dict(f)
        patient = _patient_by_pseudonym(inv, key).get(str(f.get("patient", "")))
        if patient is not None and f.get("study"):
            study = patient.studies[int(f["study"]) - 1]
            entry["folder"] = _common_folder([s.path for s in study.series if s.path], inp)
        failures.append(entry)
        log.warning("%s: not predicted: %s", entry.get("folder") or entry.get("patient"), entry["reason"])
    if not result.cases:
        reasons = "; ".join(f"{f.get('folder') or f.get('patient')}: {f['reason']}" for f in failures[:5])
        raise DataError(
            f"no case of the DICOM tree could be converted ({reasons or 'no case'})",
            path=inp,
            fix="see prepare's rules and checks in docs/prepare.md (dry_run=true lists what matched)",
        )
    keys = {name_key(m) for m in modalities} | {name_key(a) for a in (aliases or {})}
    made = {stem for d in subjects.iterdir() if d.is_dir() for p in d.iterdir() if (stem := nifti_stem(p))}
    unused = sorted(m for m in made if name_key(m) not in keys and m != "mask")
    if unused:
        log.info("modalities %s of rules=%s are not used by the model: ignored", unused, rule_set.name)
    return DicomInput(
        unused=unused,
        never=never,
        root=subjects,
        sources=sources,
        failures=failures,
        warnings=list(result.warnings),
        rules=rule_set.name,
        log_path=result.log_path,
    )


def _patient_by_pseudonym(inv: Any, key_file: Path) -> dict[str, Any]:
    """Pseudonym -> the scanned patient (through the private key file ``prepare`` wrote)."""
    try:
        table = json.loads(key_file.read_text()).get("patients", {})
    except (OSError, ValueError):
        return {}
    by_key = {p.key: p for p in inv.patients}
    return {pid: by_key[src] for src, pid in table.items() if src in by_key}


def _link_sources(
    inv: Any, key_file: Path, result: Any, root: Path, rule_set: Any
) -> dict[str, dict[str, Any]]:
    """Case id -> its study folder and series folders. A patient's cases are its converted studies in order
    (``prepare`` names them ``<pseudonym>``, ``<pseudonym>_1``, ...); when they cannot be told apart (crops of
    several lesions of one study) the patient's folder is given."""
    from liverfusion.prepare.rules import match_study

    patients = _patient_by_pseudonym(inv, key_file)
    failed = {(str(f.get("patient")), int(f["study"])) for f in result.failures if f.get("study")}
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for record in result.cases:
        by_patient.setdefault(str(record["patient"]), []).append(record)
    out: dict[str, dict[str, Any]] = {}
    for pid, records in by_patient.items():
        patient = patients.get(pid)
        if patient is None:
            for r in records:
                out[r["case"]] = {"folder": "", "series": {}}
            continue
        studies = [s for n, s in enumerate(patient.studies) if (pid, n + 1) not in failed]
        records = sorted(records, key=lambda r: (len(r["case"]), r["case"]))
        if len(studies) != len(records):
            folder = _common_folder([s.path for st in patient.studies for s in st.series if s.path], root)
            for r in records:
                out[r["case"]] = {"folder": folder, "series": {}}
            continue
        for r, study in zip(records, studies):
            series: dict[str, str] = {}
            text_to_path = {s.text: s.path for s in study.series if s.path}
            for modality, rec in (r.get("modalities") or {}).items():
                text = (rec.get("source") or {}).get("text")
                if text in text_to_path:
                    series[modality] = _common_folder([text_to_path[text]], root)
            if not series:  # the series texts were redacted in the record: match them again
                m = match_study(rule_set, [s.text for s in study.series])
                series = {mod: _common_folder([study.series[i].path], root) for mod, i in m.chosen.items()}
            out[r["case"]] = {
                "folder": _common_folder([s.path for s in study.series if s.path], root),
                "series": series,
            }
    return out
