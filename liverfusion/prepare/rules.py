"""Modality mapping: regex rules on a series' text (DICOM SeriesDescription, a NIfTI file name, an LLD-MMRI phase).

A rule set is a YAML mapping (``conf/prepare/rules/*.yaml``)::

    modalities:            # output name -> regexes (searched, case-insensitive by default)
      t2w_tra: ['t2_tse_tra', '^t2w_tra$']
      'dce_t{t}s': ['^dce_t(?P<t>\\d+)s$']   # a name template filled from named groups
    masks: ['^mask$']      # region-of-interest masks (not modalities)
    ignore: ['localizer']  # silently dropped series
    required: [t2w_tra]    # a case without these fails
    reference: t2w_tra     # default grid for resampling
    on_duplicate: error    # two series for one modality in a study: error | first | last

Every series ends up ``matched``, ``mask``, ``ignored``, ``unmatched`` or ``ambiguous`` (two rules claim it);
:class:`MatchReport` is the dry-run table a user reads before the first real run.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from liverfusion.errors import ConfigError

STATUSES = ("matched", "mask", "ignored", "unmatched", "ambiguous")
MASK = "mask"
"""Output file name (``mask.nii.gz``) and role of region-of-interest masks."""

_SAFE_NAME = re.compile(r"^[^/\\\x00]+$")


@dataclass(frozen=True)
class Rule:
    template: str
    pattern: re.Pattern[str]

    def apply(self, text: str) -> str | None:
        m = self.pattern.search(text)
        if m is None:
            return None
        fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        if not fields:
            return self.template
        groups = {k: v for k, v in m.groupdict().items() if v is not None}
        try:
            return self.template.format(**groups)
        except (KeyError, IndexError):
            raise ConfigError(
                f"modality name template {self.template!r} uses a field that the regex {self.pattern.pattern!r} "
                "does not capture as a named group"
            ) from None


@dataclass(frozen=True)
class Classification:
    status: str
    names: tuple[str, ...] = ()

    @property
    def modality(self) -> str | None:
        return self.names[0] if self.status in ("matched", "mask") and self.names else None


@dataclass
class RuleSet:
    modality_rules: list[Rule]
    mask_patterns: list[re.Pattern[str]] = field(default_factory=list)
    ignore_patterns: list[re.Pattern[str]] = field(default_factory=list)
    required: list[str] = field(default_factory=list)
    reference: str | None = None
    on_duplicate: str = "error"
    name: str = "custom"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, name: str = "custom") -> RuleSet:
        """Build from the ``rules`` config node; regex errors and bad names become :class:`ConfigError`."""
        cfg = dict(cfg or {})
        flags = re.IGNORECASE if cfg.get("ignore_case", True) else 0

        def compile_all(patterns: Any, where: str) -> list[re.Pattern[str]]:
            if patterns is None:
                return []
            if isinstance(patterns, str):
                patterns = [patterns]
            out = []
            for p in patterns:
                try:
                    out.append(re.compile(str(p), flags))
                except re.error as exc:
                    raise ConfigError(f"rules.{where}: bad regex {p!r} ({exc})") from None
            return out

        rules = []
        for modality, patterns in dict(cfg.get("modalities") or {}).items():
            modality = str(modality)
            if not _SAFE_NAME.match(modality) or modality.startswith(".") or modality == MASK:
                raise ConfigError(f"rules.modalities: {modality!r} cannot be a file name (or is reserved)")
            rules += [Rule(modality, p) for p in compile_all(patterns, f"modalities.{modality}")]
        on_duplicate = str(cfg.get("on_duplicate", "error"))
        if on_duplicate not in ("error", "first", "last"):
            raise ConfigError(f"rules.on_duplicate must be error, first or last, not {on_duplicate!r}")
        return cls(
            modality_rules=rules,
            mask_patterns=compile_all(cfg.get("masks"), "masks"),
            ignore_patterns=compile_all(cfg.get("ignore"), "ignore"),
            required=[str(m) for m in (cfg.get("required") or [])],
            reference=cfg.get("reference"),
            on_duplicate=on_duplicate,
            name=str(cfg.get("name", name)),
        )

    def classify(self, text: str) -> Classification:
        """What one series is; 'matched twice' (two different names or modality + mask) is ``ambiguous``."""
        if any(p.search(text) for p in self.ignore_patterns):
            return Classification("ignored")
        names: list[str] = []
        if any(p.search(text) for p in self.mask_patterns):
            names.append(MASK)
        for rule in self.modality_rules:
            name = rule.apply(text)
            if name is not None and name not in names:
                names.append(name)
        if not names:
            return Classification("unmatched")
        if len(names) > 1:
            return Classification("ambiguous", tuple(names))
        return Classification("mask" if names[0] == MASK else "matched", (names[0],))

    def describe(self) -> dict[str, Any]:
        by_name: dict[str, list[str]] = defaultdict(list)
        for r in self.modality_rules:
            by_name[r.template].append(r.pattern.pattern)
        return {
            "name": self.name,
            "modalities": dict(by_name),
            "masks": [p.pattern for p in self.mask_patterns],
            "ignore": [p.pattern for p in self.ignore_patterns],
            "required": self.required,
            "reference": self.reference,
            "on_duplicate": self.on_duplicate,
        }


@dataclass
class StudyMatch:
    """Rule outcome for the series of one study: ``chosen`` maps modality -> index into the series list."""

    case: str
    entries: list[dict[str, Any]]
    chosen: dict[str, int]
    mask_index: int | None
    duplicates: dict[str, int]
    missing_required: list[str]
    problems: list[str]


def match_study(
    rules: RuleSet, texts: Sequence[str], order: Sequence[Any] | None = None, case: str = ""
) -> StudyMatch:
    """Classify each series text of one study and pick one series per modality (``rules.on_duplicate``)."""
    order = list(order) if order is not None else list(range(len(texts)))
    entries = []
    claims: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        c = rules.classify(text)
        entries.append({"text": text, "status": c.status, "names": list(c.names)})
        if c.modality is not None:
            claims[c.modality].append(i)
    chosen: dict[str, int] = {}
    duplicates: dict[str, int] = {}
    problems: list[str] = []
    for name, idx in claims.items():
        if len(idx) > 1:
            duplicates[name] = len(idx)
            ranked = sorted(idx, key=lambda i: (order[i], i))
            if rules.on_duplicate == "error":
                shown = sorted({texts[i] for i in idx})
                problems.append(
                    f"{len(idx)} series match {name!r} ({shown}); choose with rules.on_duplicate=first|last "
                    "or make the rule stricter"
                )
                continue
            keep = ranked[0] if rules.on_duplicate == "first" else ranked[-1]
        else:
            keep = idx[0]
        chosen[name] = keep
        entries[keep]["used"] = True
    mask_index = chosen.pop(MASK, None)
    missing = [m for m in rules.required if m not in chosen]
    return StudyMatch(case, entries, chosen, mask_index, duplicates, missing, problems)


@dataclass
class MatchReport:
    """Dry-run summary over all studies: what matched, what did not, what matched twice."""

    studies: list[StudyMatch] = field(default_factory=list)

    def add(self, m: StudyMatch) -> None:
        self.studies.append(m)

    def summary(self) -> dict[str, Any]:
        per_modality: Counter[str] = Counter()
        unmatched: Counter[str] = Counter()
        ignored: Counter[str] = Counter()
        ambiguous: dict[str, list[str]] = {}
        duplicates: Counter[str] = Counter()
        missing: Counter[str] = Counter()
        for s in self.studies:
            per_modality.update(s.chosen.keys())
            if s.mask_index is not None:
                per_modality[MASK] += 1
            for e in s.entries:
                if e["status"] == "unmatched":
                    unmatched[e["text"]] += 1
                elif e["status"] == "ignored":
                    ignored[e["text"]] += 1
                elif e["status"] == "ambiguous":
                    ambiguous[e["text"]] = e["names"]
            duplicates.update(s.duplicates.keys())
            missing.update(s.missing_required)
        return {
            "studies": len(self.studies),
            "studies_per_modality": dict(sorted(per_modality.items())),
            "unmatched_texts": dict(unmatched.most_common()),
            "ignored_texts": dict(ignored.most_common()),
            "ambiguous_texts": ambiguous,
            "studies_with_duplicates": dict(duplicates),
            "studies_missing_required": dict(missing),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "studies": [
                {
                    "case": s.case,
                    "series": s.entries,
                    "missing_required": s.missing_required,
                    "duplicates": s.duplicates,
                    "problems": s.problems,
                }
                for s in self.studies
            ],
        }

    def format_table(self) -> str:
        """Human-readable report for the console."""
        s = self.summary()
        lines = [f"rule report over {s['studies']} studies"]
        lines.append(
            "  matched per modality: "
            + (", ".join(f"{k}={v}" for k, v in s["studies_per_modality"].items()) or "none")
        )
        for title, key in (
            ("unmatched", "unmatched_texts"),
            ("ignored", "ignored_texts"),
            ("duplicated (matched by >1 series in a study)", "studies_with_duplicates"),
            ("missing required", "studies_missing_required"),
        ):
            if s[key]:
                lines.append(f"  {title}: " + ", ".join(f"{k!r} x{v}" for k, v in s[key].items()))
        for text, names in s["ambiguous_texts"].items():
            lines.append(f"  ambiguous: {text!r} matches {names}")
        return "\n".join(lines)
