"""Several layouts as one pool, e.g. labelled phantom cases + an unlabelled liver MRI pool for pre-training.

Case and patient ids are prefixed with each member's name so that two data sets cannot collide; the union's
modalities are the union of the members' (in order), and a member's absent modalities count as missing.
"""

from __future__ import annotations

from collections.abc import Sequence

from liverfusion.data.case import Case
from liverfusion.data.layouts.base import Layout
from liverfusion.errors import ConfigError


class UnionLayout(Layout):
    def __init__(
        self,
        layouts: Sequence[Layout],
        name: str = "union",
        class_names: Sequence[str] | None = None,
        prefix_ids: bool = True,
    ):
        if not layouts:
            raise ConfigError("UnionLayout needs at least one layout")
        modalities: list[str] = []
        for layout in layouts:
            modalities += [m for m in layout.modalities if m not in modalities]
        names = (
            class_names
            if class_names is not None
            else next((ly.class_names for ly in layouts if ly.class_names), [])
        )
        for layout in layouts:
            if layout.class_names and list(layout.class_names) != list(names):
                raise ConfigError(
                    f"layout {layout.name!r} has classes {layout.class_names}, union expects {list(names)}"
                )
        super().__init__(
            layouts[0].root,
            modalities,
            names,
            name=name,
            on_missing_modality="mask",
            detect_duplicates=False,
            clinical=any(ly.clinical for ly in layouts),
        )
        self.layouts = list(layouts)
        self.prefix_ids = prefix_ids

    def scan(self) -> list[Case]:
        self.skipped = []
        cases = []
        for layout in self.layouts:
            for case in layout.scan():
                if self.prefix_ids:
                    case.case_id = f"{layout.name}:{case.case_id}"
                    case.patient_id = f"{layout.name}:{case.patient_id}"
                for m in self.modalities:
                    if m not in case.images:
                        case.missing.add(m)
                cases.append(case)
            self.skipped += layout.skipped
        return cases

    def _scan(self) -> list[Case]:  # scan() is overridden: members validate themselves
        raise AssertionError("UnionLayout.scan() delegates to its members")

    def describe(self) -> dict:
        return {**super().describe(), "members": [ly.describe() for ly in self.layouts]}
