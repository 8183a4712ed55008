"""``results.md``: the tables, comparisons, calibration, runs, figures and robustness of a report as markdown."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from liverfusion.evaluation import table_markdown
from liverfusion.reporting.runs import Arm


def fmt_value(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _wide_table(rows: Sequence[Mapping[str, Any]], arms: Sequence[Arm], metrics: Sequence[str]) -> str:
    """Markdown: one row per arm, one column per metric, ``mean +- std`` (pooled [CI])."""
    by = {(r["arm"], r["metric"]): r for r in rows}
    shown = [m for m in metrics if any((a.name, m) in by for a in arms)]
    lines = ["| arm | runs | " + " | ".join(shown) + " |", "|---|---:|" + "---|" * len(shown)]
    for a in arms:
        cells = []
        for m in shown:
            r = by.get((a.name, m))
            if r is None:
                cells.append("")
                continue
            std = f" ± {r['std']:.3f}" if np.isfinite(r["std"]) else ""
            cells.append(f"{r['mean']:.3f}{std}")
        lines.append(f"| {a.name} | {len(a.runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pooled_table(
    pooled: Mapping[str, tuple[Mapping[str, Mapping[str, float]], str]], metrics: Sequence[str]
) -> str:
    shown = [m for m in metrics if any(m in p for p, _ in pooled.values())]
    lines = [
        "| arm | pooled as | cases | " + " | ".join(shown) + " |",
        "|---|---|---:|" + "---|" * len(shown),
    ]
    for name, (p, kind) in pooled.items():
        cells = [
            f"{fmt_value(p[m]['point'])} [{fmt_value(p[m]['low'])}, {fmt_value(p[m]['high'])}]"
            if m in p
            else ""
            for m in shown
        ]
        n = int(p["n_cases"]["point"]) if "n_cases" in p else ""
        lines.append(f"| {name} | {kind} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _calibration_markdown(calibration: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| arm | temperature | ECE before | ECE after | MCE before | MCE after | Brier before | Brier after | "
        "NLL before | NLL after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in calibration.items():
        b, a = c["before"], c["after"]
        cells = [f"{b[k]:.3f} | {a[k]:.3f}" for k in ("ece", "mce", "brier", "nll")]
        lines.append(f"| {name} | {c['temperature']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(
    arms: Sequence[Arm],
    rows: Sequence[Mapping[str, Any]],
    pooled: Mapping[str, tuple[Mapping[str, Mapping[str, float]], str]],
    comparisons: Sequence[Mapping[str, Any]],
    figures: Mapping[str, Path],
    metrics: Sequence[str],
    metric: str,
    dirs: Sequence[str | Path],
    out: Path,
    calibration: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """``results.md``: figures are linked relative to ``out``; each arm's first run adds its ``robustness.md``."""
    lines = [
        "# Results",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `python -m liverfusion.report "
        + " ".join(str(d) for d in dirs)
        + "`.",
        "",
        "## Per-run test scores: mean ± sample std over runs (folds / seeds)",
        "",
        _wide_table(rows, arms, metrics),
        "",
        "## Pooled predictions with patient-level bootstrap 95 % CIs",
        "",
        _pooled_table(pooled, metrics),
        "",
    ]
    if comparisons:
        lines += [f"## Paired comparisons on common cases ({metric}; paired bootstrap over patients)", ""]
        lines += [table_markdown(comparisons), ""]
    if calibration:
        lines += [
            "## Calibration: the temperature stored with the model, on the pooled test predictions",
            "",
            "ECE over 15 confidence bins (top label), MCE its worst bin, multiclass Brier score and NLL, before and "
            "after dividing the logits by the temperature that `evaluate calibrate=true` fitted on the validation "
            "split (predictions, hence accuracy and F1, are unchanged).",
            "",
            _calibration_markdown(calibration),
            "",
        ]
    lines += ["## Runs", ""]
    for a in arms:
        lines.append(f"- **{a.name}**: " + ", ".join(f"fold {r.fold}: `{r.path}`" for r in a.runs))
    if figures:
        lines += ["", "## Figures", ""]
        for name, path in figures.items():
            lines.append(f"![{name}]({Path(path).relative_to(out)})")
    for a in arms:
        rob = a.runs[0].path / "test" / "robustness.md"
        if rob.is_file():
            lines += [
                "",
                f"## Robustness, first run of {a.name} (each modality dropped in turn)",
                "",
                rob.read_text().strip(),
            ]
    return "\n".join(lines) + "\n"
