"""``python -m liverfusion.data.check data=NAME``: what is in a data set, and every problem found.

Scans the layout, decodes and caches every volume once (the cache lives outside the data folder), builds the
patient-level split, and prints one table. A fatal problem (missing/unreadable/NaN/constant file, unknown label,
duplicate case, a patient in two splits, a config value out of range) prints one line ``error: <file or key>:
<problem>; <fix>`` and exits with status 2 (``liverfusion.utils.cli``). Modalities of one case that disagree in stored
orientation, grid or field of view are warned about by case, modality and file; ``strict=true`` makes warnings exit
with status 1.
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
from liverfusion.utils.cli import cli_errors, hydra_cli
from liverfusion.utils.hydra_utils import CONFIG_DIR  # (importing it registers the resolvers)

WARNINGS_FAIL = 1
"""Exit status of ``strict=true`` when something was warned about (errors exit with 2, as in every entry point)."""
_WORLD_AXIS = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def _world_grid(raw: dict[str, Any]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing in world (x, y, z) order when the file's axis codes are known (so an axis permutation
    that reorientation undoes is no grid difference), else as stored (i, j, k)."""
    shape, spacing = list(raw["shape"])[::-1], list(raw["spacing"])[::-1]  # (D, H, W) -> (i, j, k)
    codes = raw.get("axcodes") or ""
    if len(codes) == 3:
        order = sorted(range(3), key=lambda i: _WORLD_AXIS[codes[i]])
        shape, spacing = [shape[i] for i in order], [spacing[i] for i in order]
    return tuple(int(n) for n in shape), tuple(float(v) for v in spacing)


def geometry_problems(case: Any, raw: dict[str, dict[str, Any]], orientation: str) -> list[str]:
    """Warnings for the modalities of one case that disagree with the case's reference modality (its most common
    stored orientation, else the first modality): stored axis codes, grid (shape, spacing) and field of view (the
    world box the voxels cover, beyond one voxel of the coarser grid). Each names case, modality and file."""
    mods = [m for m in raw if m in case.images]
    if len(mods) < 2:
        return []
    codes = {m: raw[m].get("axcodes") for m in mods}
    common = Counter(codes.values()).most_common(1)[0][0]
    ref = next(m for m in mods if codes[m] == common)
    out: list[str] = []

    def where(m: str) -> str:
        return f"case {case.case_id}: {m!r} ({case.images[m]})"

    for m in mods:
        if m == ref:
            continue
        mine, theirs = codes[m] or "unknown", codes[ref] or "unknown"
        if mine != theirs:
            if not codes[m] or not codes[ref]:
                done = "a file without orientation is read as stored, so they may be mirrored"
            elif orientation == "none":
                done = "fed to the model as stored, mirrored or rotated; set data.preprocess.orientation=RAS"
            else:
                done = f"both reoriented to {orientation} on load"
            out.append(f"{where(m)} is stored {mine}, {ref!r} {theirs}: {done}")
        grid, ref_grid = _world_grid(raw[m]), _world_grid(raw[ref])
        if grid[0] != ref_grid[0] or not np.allclose(grid[1], ref_grid[1], rtol=1e-3):
            out.append(
                f"{where(m)} grid {'x'.join(map(str, grid[0]))} at {'x'.join(f'{v:g}' for v in grid[1])} mm "
                f"differs from {ref!r}'s {'x'.join(map(str, ref_grid[0]))} at "
                f"{'x'.join(f'{v:g}' for v in ref_grid[1])} mm (x, y, z): the channels are not voxel-aligned"
            )
        fov, ref_fov = raw[m].get("fov_mm"), raw[ref].get("fov_mm")
        if fov and ref_fov:
            gap = float(np.max(np.abs(np.asarray(fov) - np.asarray(ref_fov))))
            tol = max(max(raw[m]["spacing"]), max(raw[ref]["spacing"]))
            if gap > tol:
                box = "; ".join(f"{lo:g}..{hi:g}" for lo, hi in zip(*fov))
                ref_box = "; ".join(f"{lo:g}..{hi:g}" for lo, hi in zip(*ref_fov))
                out.append(
                    f"{where(m)} field of view [{box}] differs from {ref!r}'s [{ref_box}] (world mm) by up to "
                    f"{gap:.1f} mm: the images do not cover the same region"
                )
    return out


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
        orientations = Counter((r.get("axcodes") or "unknown",) for r in raws)
        report["modalities"][m] = {
            "present": sum(1 for e in entries if e.present[i]),
            "missing": sum(1 for e in entries if not e.present[i]),
            "duplicated": sum(
                1 for c in cases.values() if any(f"{m!r} is an exact copy" in n for n in c.notes)
            ),
            "shapes": shapes,
            "spacings": spacings,
            "orientations": orientations,
            "range": (
                min((r["min"] for r in raws), default=np.nan),
                max((r["max"] for r in raws), default=np.nan),
            ),
        }
    for c in dm.cases:
        for note in c.notes:
            report["problems"].append(f"case {c.case_id}: {note}")
        entry = dm.entries.get(c.case_id)
        if entry is not None:
            report["problems"] += geometry_problems(c, entry.meta.get("raw", {}), dm.preprocess.orientation)
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
    mod = Table(title="modalities (raw files as stored: D x H x W, axis codes of NIfTI i, j, k)")
    for col in (
        "modality",
        "present",
        "missing",
        "copies",
        "axes",
        "shapes",
        "spacings (mm)",
        "intensity range",
    ):
        mod.add_column(col)
    for m, r in report["modalities"].items():
        lo, hi = r["range"]
        mod.add_row(
            m,
            str(r["present"]),
            str(r["missing"]),
            str(r["duplicated"]),
            _fmt_counter(r["orientations"]),
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


@hydra_cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="check")
@cli_errors
def main(cfg: DictConfig) -> None:
    console = Console(width=max(Console().width, 140))
    with open_dict(cfg):
        cfg.data.split.save_to = None
    dm = instantiate(cfg.data)
    if cfg.clear_cache:
        n = clear_cache(dm.cache_dir, dm.layout.name)
        console.print(f"cleared {n} cached file(s) of {dm.layout.name!r} under {dm.cache_dir}")
    report = inspect(dm)
    render(report, console)
    if cfg.strict and report["problems"]:
        sys.exit(WARNINGS_FAIL)


if __name__ == "__main__":
    main()
