"""``python -m liverfusion.report DIR [DIR ...]``: aggregate cross-validation runs (one multirun, or several for
ablations) into ``results.md``, CSV tables and figures.

A run is a folder with ``test/summary.json`` (written by the classifier's test step). Runs are grouped into arms:
by the Hydra overrides that vary between them (``.hydra/overrides.yaml``, leaving out ``data.fold`` and ``seed``,
which are replicates), else by fusion / init / fine-tune mode / label fraction. Each DIR given is its own arm family.
A model card (``docs/model_card_template.md``) is filled for the first arm. ``--wandb offline|online`` logs the
tables and figures to W&B too. The work is done by ``liverfusion.reporting``; this module is its command line.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from liverfusion.errors import DataError
from liverfusion.reporting import make_report
from liverfusion.utils.cli import cli_errors


def format_console(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = ("macro_f1", "lld_score", "auroc", "balanced_accuracy"),
) -> str:
    """A compact text table for terminals (the demo prints it)."""
    buf = io.StringIO()
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    shown = [m for m in metrics if any(r["metric"] == m for r in rows)]
    buf.write(f"{'arm':<28}" + "".join(f"{m:>26}" for m in shown) + "\n")
    for a in arms:
        buf.write(f"{a[:27]:<28}")
        for m in shown:
            r = next((r for r in rows if r["arm"] == a and r["metric"] == m), None)
            cell = "" if r is None else f"{r['pooled']:.3f} [{r['pooled_low']:.3f},{r['pooled_high']:.3f}]"
            buf.write(f"{cell:>26}")
        buf.write("\n")
    return buf.getvalue()


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a problem ends it with one line and exit status 2 (``liverfusion.utils.cli``)."""
    # the parser and its --help page live in liverfusion.help (answered there without importing torch)
    from liverfusion.help import build_parser
    from liverfusion.utils.console import quiet_third_party

    args = build_parser("report").parse_args(argv)
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for d in args.dirs:  # before anything is written (the default output folder lies inside the first DIR)
        if not Path(d).is_dir():
            raise DataError("no such folder: pass a multirun or run folder", path=d)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    res = make_report(
        args.dirs,
        out,
        names=args.names,
        metric=args.metric,
        n_boot=args.n_boot,
        seed=args.seed,
        embedding=args.embedding,
        plots=not args.no_plots,
        card_template=args.card_template,
        wandb_mode=args.wandb,
    )
    print(format_console(res["summary"]))
    print(f"report: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
