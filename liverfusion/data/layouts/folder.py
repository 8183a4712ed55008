"""Unlabelled files matched by patterns, for pre-training pools (e.g. CHAOS ``image_<id>.nii.gz``).

``patterns`` maps each modality to a glob relative to the root; ``case_regex`` pulls the case id out of a matched
file's name, so several modalities of one case are found by their common id.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from liverfusion.data.case import Case
from liverfusion.data.layouts.base import Layout, patient_from_case
from liverfusion.errors import ConfigError


class FolderLayout(Layout):
    def __init__(
        self,
        root: str | Path,
        patterns: Mapping[str, str],
        case_regex: str = r"^(?:image_)?(?P<case>.+?)\.nii(?:\.gz)?$",
        mask_pattern: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(root, list(patterns), (), **kwargs)
        self.patterns = dict(patterns)
        self.case_regex = re.compile(case_regex)
        if "case" not in self.case_regex.groupindex:
            raise ConfigError(f"case_regex {case_regex!r} needs a named group (?P<case>...)")
        self.mask_pattern = mask_pattern

    def _scan(self) -> list[Case]:
        found: dict[str, dict[str, Path]] = {}
        for modality, pattern in self.patterns.items():
            for path in sorted(self.root.glob(pattern)):
                m = self.case_regex.match(path.name)
                if m:
                    found.setdefault(m.group("case"), {})[modality] = path
        cases = []
        for case_id in sorted(found, key=_natural_key):
            mask = None
            if self.mask_pattern:
                candidate = self.root / self.mask_pattern.format(case=case_id)
                mask = candidate if candidate.is_file() else None
            cases.append(
                Case(
                    case_id=case_id,
                    patient_id=patient_from_case(case_id, self.patient_regex),
                    images=found[case_id],
                    label=None,
                    mask=mask,
                )
            )
        return cases


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
