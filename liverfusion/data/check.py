"""``python -m liverfusion.data.check data=NAME``: what is in a data set, and every problem found.

Scans the layout, decodes and caches every volume once (the cache lives outside the data folder), builds the
patient-level split, and prints one table. A fatal problem (missing/unreadable/NaN/constant file, unknown label,
duplicate case, a patient in two splits) prints the file and the reason and exits with status 1.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from typing import Any

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from liverfusion.data.cache import clear_cache
from liverfusion.data.datamodule import MultiModalDataModule
from liverfusion.errors import LiverfusionError
from liverfusion.utils import hydra_utils  # noqa: F401  (registers resolvers)


def inspect(dm: MultiModalDataModule) -> dict[str, Any]:
    """Run setup and collect the facts and problems the table shows."""
    dm.setup()
    entries = list(dm.entries.values())
    cases = {c.case_id: c for c in dm.cases}
    report: dict[str, Any] = {
        "name": dm.layout.name,
        "root": str(dm.layout.root),
        "cases": len(entries),
        "patients": len({e.patient_id for e in entries}),
        "multi_lesion_patients": sum(1 for v in Counter(e.patient_id for e in entries).values() if v > 1),
        "per_class": Counter(dm.class_names[e.label] for e in entries if e.label is not None),
        "unlabelled": sum(1 for e in entries if e.label is None),
        "modalities": {},
        "problems": [],
        "splits": {k: len(v) for k, v in dm.partition.items()},
    }
    for i, m in enumerate(dm.modalities):
        raws = [e.meta["raw"][m] for e in entries if m in e.meta.get("raw", {})]
        shapes = Counter(tuple(r["shape"]) for r in raws)
        spacings = Counter(tuple(r["spacing"]) for r in raws)
        report["modalities"][m] = {
            "present": sum(1 for e in entries if e.present[i]),
            "missing": sum(1 for e in entries if not e.present[i]),
            "duplicated": sum(
                1 for c in cases.values() if any(f"{m!r} is an exact copy" in n for n in c.notes)
            ),
            "shapes": shapes,
            "spacings": spacings,
            "range": (
                min((r["min"] for r in raws), default=np.nan),
                max((r["max"] for r in raws), default=np.nan),
            ),
        }
    for c in dm.cases:
        for note in c.notes:
            report["problems"].append(f"case {c.case_id}: {note}")
    for case_id, why in dm.layout.skipped:
        report["problems"].append(f"case {case_id} left out: {why}")
    return report


def _fmt_counter(counter: Counter, limit: int = 3) -> str:
    items = counter.most_common()
    text = ", ".join(f"{'x'.join(str(v) for v in k)} ({n})" for k, n in items[:limit])
    return text + (f", +{len(items) - limit} more" if len(items) > limit else "")


def render(report: dict[str, Any], console: Console) -> None:
    head = Table(title=f"data set {report['name']}  ({report['root']})", show_header=False)
    head.add_row("cases", str(report["cases"]))
    head.add_row("patients", f"{report['patients']} ({report['multi_lesion_patients']} with several lesions)")
    head.add_row("classes", ", ".join(f"{k}: {v}" for k, v in sorted(report["per_class"].items())) or "none")
    head.add_row("unlabelled cases", str(report["unlabelled"]))
    head.add_row("split (patients)", ", ".join(f"{k}: {v}" for k, v in report["splits"].items()))
    console.print(head)
    mod = Table(title="modalities (raw files, D x H x W)")
    for col in ("modality", "present", "missing", "copies", "shapes", "spacings (mm)", "intensity range"):
        mod.add_column(col)
    for m, r in report["modalities"].items():
        lo, hi = r["range"]
        mod.add_row(
            m,
            str(r["present"]),
            str(r["missing"]),
            str(r["duplicated"]),
            _fmt_counter(r["shapes"]),
            _fmt_counter(r["spacings"]),
            f"{lo:g} .. {hi:g}",
        )
    console.print(mod)
    problems = report["problems"]
    if problems:
        by_kind: dict[str, int] = defaultdict(int)
        console.print(f"[yellow]{len(problems)} warning(s):[/yellow]")
        for p in problems[:50]:
            console.print(f"  - {p}")
            by_kind[p.split(": ", 1)[-1]] += 1
        if len(problems) > 50:
            console.print(f"  ... and {len(problems) - 50} more")
    else:
        console.print("[green]no problems found[/green]")


@hydra.main(version_base="1.3", config_path="../conf", config_name="check")
def main(cfg: DictConfig) -> None:
    console = Console(width=max(Console().width, 140))
    with open_dict(cfg):
        cfg.data.split.save_to = None
    try:
        dm = instantiate(cfg.data)
        if cfg.clear_cache:
            n = clear_cache(dm.cache_dir, dm.layout.name)
            console.print(f"cleared {n} cached file(s) of {dm.layout.name!r} under {dm.cache_dir}")
        report = inspect(dm)
    except LiverfusionError as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        sys.exit(1)
    render(report, console)
    if cfg.strict and report["problems"]:
        sys.exit(2)


if __name__ == "__main__":
    main()
