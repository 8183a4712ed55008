"""The embedded phantom seen through the LLD-MMRI reader; generated on first use (frozen spec, default seed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from liverfusion.data.case import Case
from liverfusion.data.layouts.lldmmri import LLDMMRILayout


class PhantomLayout(LLDMMRILayout):
    def __init__(
        self,
        root: str | Path,
        spec: str = "default",
        seed: int = 7,
        n_cases: int = 450,
        n_unlabelled: int = 0,
        shape: Sequence[int] | None = None,
        workers: int = 1,
        generate: bool = True,
        **kwargs: Any,
    ):
        kwargs.setdefault("mask_dir", "masks")
        super().__init__(root, **kwargs)
        self.spec, self.seed, self.n_cases, self.n_unlabelled = (
            spec,
            int(seed),
            int(n_cases),
            int(n_unlabelled),
        )
        self.shape = list(shape) if shape is not None else None
        self.workers = int(workers)
        self.generate = generate

    def ensure(self) -> dict:
        """Generate the phantom unless the same one (spec, seed, counts, shape) is already there."""
        from liverfusion.data.phantom import generate_phantom

        return generate_phantom(
            self.root,
            self.spec,
            seed=self.seed,
            n_cases=self.n_cases,
            n_unlabelled=self.n_unlabelled,
            workers=self.workers,
            shape=self.shape,
        )

    def scan(self) -> list[Case]:
        if self.generate:
            self.ensure()
        return super().scan()

    def describe(self) -> dict:
        info = super().describe()
        meta = self.root / "phantom.json"
        if meta.is_file():
            info["phantom"] = {k: v for k, v in json.loads(meta.read_text()).items() if k != "cases"}
        return info
