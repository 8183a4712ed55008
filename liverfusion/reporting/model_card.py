"""The model card: ``docs/model_card_template.md`` filled with the facts of a report's first arm."""

from __future__ import annotations

import datetime as dt
import json
import logging
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from liverfusion.evaluation import lldmmri_style, metrics_markdown
from liverfusion.reporting.markdown import fmt_value
from liverfusion.reporting.runs import Arm
from liverfusion.reporting.tables import HEADLINE

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parents[2] / "docs" / "model_card_template.md"


CARD_NEUTRAL = (
    (
        r"- Lesion crops are assumed to be centred on the lesion \(the LLD-MMRI convention\); the model does not "
        r"detect\s+lesions\.",
        "- Inputs are assumed to be cropped and centred as the training data were; the model does not localise "
        "findings.",
    ),
    (r"each lesion \(case\)", "each case"),
    (r"phase timing", "acquisition timing"),
    (r"\blesions\b", "cases"),
    (r"\blesion\b", "case"),
)
"""Liver-lesion wording of the model card template made neutral for other data (LGG, prostate, ...)."""


def neutral_card(text: str) -> str:
    """``text`` without the LLD-MMRI / lesion wording (for a model trained on other data)."""
    import re

    for pattern, repl in CARD_NEUTRAL:
        text = re.sub(pattern, repl, text)
    return text


def fill_model_card(
    arm: Arm,
    pooled: tuple[Mapping[str, Mapping[str, float]], str],
    rows: Sequence[Mapping[str, Any]],
    template: str | Path | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> str | None:
    """The model card template filled with the facts of ``arm`` (None when no template is found); the lesion
    wording only for LLD-MMRI-style data, and the calibration when one is stored with the model."""
    path = Path(template) if template else TEMPLATE
    if not path.is_file():
        log.warning("model card template %s not found: no model card written", path)
        return None
    run = arm.runs[0]
    cfg = run.config
    data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    layout = data.get("layout", {}) if isinstance(data, dict) else {}
    model = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    pre = run.summary.get("pretrained") or {}
    ci, kind = pooled
    class_names = run.summary.get("class_names") or []
    lld = lldmmri_style(class_names)
    arm_rows = [r for r in rows if r["arm"] == arm.name]
    cv = "\n".join(
        f"| {r['metric']} | {r['mean']:.3f} ± {fmt_value(r['std'])} | {r['n_runs']} |" for r in arm_rows
    )
    split_rows = []
    for part, info in (run.summary.get("splits") or {}).items():
        per_class = ", ".join(f"{k} {v}" for k, v in (info.get("per_class") or {}).items())
        split_rows.append(
            f"| {part} | {info.get('cases')} | {info.get('patients')} | {info.get('unlabelled')} | {per_class} |"
        )
    data_table = (
        "| split (first run) | cases | patients | labels withheld | per class |\n|---|---:|---:|---:|---|\n"
        + "\n".join(split_rows)
        if split_rows
        else "(split sizes not recorded)"
    )
    values = {
        "data_table": data_table,
        "title": arm.name or "liverfusion classifier",
        "date": dt.date.today().isoformat(),
        "dataset": str(layout.get("name", "?")),
        "data_root": str(layout.get("root", "?")),
        "modalities": ", ".join(run.summary.get("modalities") or []),
        "classes": ", ".join(class_names),
        "preprocess": json.dumps(data.get("preprocess", {})),
        "fusion": str(run.summary.get("fusion")),
        "encoder": str((model.get("encoder") or {}).get("arch", "?")),
        "init": str(run.summary.get("init")),
        "finetune": str(run.summary.get("finetune_mode")),
        "pretrained_from": str(pre.get("path", "none (random initialisation)")),
        "pretrained_on": json.dumps((pre.get("source") or {}).get("dataset")),
        "n_runs": str(len(arm.runs)),
        "split": json.dumps(data.get("split", {})),
        "selection": f"{run.summary.get('selection_metric')} on the validation fold",
        "pooled_kind": kind,
        "metrics_table": metrics_markdown(ci, [m for m in HEADLINE if m in ci], class_names=class_names),
        "cv_table": "| metric | mean ± std | runs |\n|---|---|---:|\n" + cv,
        "n_cases": str(int(ci["n_cases"]["point"])) if "n_cases" in ci else "?",
        "n_patients": str(int(ci["n_patients"]["point"])) if "n_patients" in ci else "?",
        "unit": "lesion" if lld else "case",
        "units": "lesions" if lld else "cases",
    }
    text = path.read_text()
    if not lld:
        text = neutral_card(text)
    card = string.Template(text).safe_substitute(values)
    if calibration:
        b, a = calibration["before"], calibration["after"]
        card = card.rstrip("\n") + (
            "\n\n## Calibration\n"
            f"Temperature {calibration['temperature']:.3f} (stored with the model, fitted on "
            f"{calibration.get('fitted_on') or 'the validation split'}); on the pooled test predictions: ECE "
            f"{b['ece']:.3f} -> {a['ece']:.3f}, MCE {b['mce']:.3f} -> {a['mce']:.3f}, Brier {b['brier']:.3f} -> "
            f"{a['brier']:.3f}, NLL {b['nll']:.3f} -> {a['nll']:.3f}. `liverfusion.predict` applies it.\n"
        )
    return card
