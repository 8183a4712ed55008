"""A report's tables and figures logged to W&B (``--wandb offline|online``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def to_wandb(
    out: Path,
    rows: Sequence[Mapping[str, Any]],
    comparisons: Sequence[Mapping[str, Any]],
    figures: Mapping[str, Path],
    mode: str,
    privacy: bool = False,
) -> None:
    """The tables (per-arm metrics, comparisons: no case ids) and, unless ``privacy``, the figures."""
    import wandb

    run = wandb.init(
        project="liverfusion",
        job_type="report",
        group=out.name,
        name=f"report-{out.name}",
        mode=mode,
        dir=str(out),
    )
    try:
        if rows:
            run.log({"results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        if comparisons:
            cols = list(comparisons[0])
            run.log(
                {
                    "comparisons": wandb.Table(
                        columns=cols, data=[[c.get(k) for k in cols] for c in comparisons]
                    )
                }
            )
        if privacy:
            log.info("privacy: report figures not logged to W&B (they stay in %s)", out)
        else:
            run.log({name: wandb.Image(str(p)) for name, p in figures.items()})
    finally:
        wandb.finish()
