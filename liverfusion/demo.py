"""``make demo``: the main job on the embedded phantom, step by step, with the real command-line entry points.

Each step is printed as the command a user would type, then run, so the demo doubles as a tutorial:
1. ``check``: generate the phantom (frozen spec, default seed) and print its data check table;
2. ``pretrain``: pre-train SimSiam on MDA cross-phase pairs and export ``encoder.pt``;
3. ``finetune``: train the CGC fusion classifier on the frozen pre-trained encoder, select the epoch on the
   validation fold, test once on the test split;
4. ``evaluate``: calibrate the saved checkpoint (``calibrate=true``: a temperature fitted on the validation split,
   stored with the model as ``finetune/calibration.json``; a few seconds) and run it on the test split with the
   evaluation CLI (predictions.csv, the LLD-MMRI submission JSON, metrics with bootstrap CIs, ECE before / after
   calibration, reliability diagram, robustness table), reading everything it needs from the checkpoint;
5. ``report``: aggregate the run into results.md, CSVs, figures (calibration included) and a model card; print the
   metrics table. ``python -m liverfusion.predict ckpt_path=<root>/finetune input=<case folders> out=<folder>`` then
   answers for new patients with the calibrated model.
All outputs of one demo go to ``logs/demo/<time>/<step>`` (the phantom to ``data/phantom``, preprocessed volumes to
the per-user cache, ``~/.cache/liverfusion`` or ``$LIVERFUSION_CACHE_DIR``). Budget: 10 minutes on 2 CPU cores after install.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from liverfusion.utils.cli import cli_errors
from liverfusion.utils.help_pages import STEP_NAMES

# simsiam_pretrain is the CPU-sized preset (the GPU-sized one is simsiam_pretrain_gpu): the paper's method as a
# user starts it, sized to the demo's budget of 4 minutes on 2 cores
PRETRAIN_PRESET = "simsiam_pretrain"
FINETUNE_PRESET = "cgc_demo"


def step_commands(root: Path, overrides: list[str]) -> dict[str, list[str]]:
    """The command line of every step; ``overrides`` go to the training steps, data/paths ones to evaluate too."""
    data_overrides = [o for o in overrides if o.lstrip("+~").startswith(("data.", "paths."))]
    encoder = root / "pretrain" / "checkpoints" / "encoder.pt"
    return {
        "check": ["-m", "liverfusion.data.check", "data=phantom", *data_overrides],
        "pretrain": [
            "-m",
            "liverfusion.train",
            f"+experiment={PRETRAIN_PRESET}",
            "extras.print_config=false",
            f"hydra.run.dir={root / 'pretrain'}",
            *overrides,
        ],
        "finetune": [
            "-m",
            "liverfusion.train",
            f"+experiment={FINETUNE_PRESET}",
            f"model.pretrained.path={encoder}",
            "extras.print_config=false",
            f"hydra.run.dir={root / 'finetune'}",
            *overrides,
        ],
        "evaluate": [
            "-m",
            "liverfusion.evaluate",
            f"ckpt_path={root / 'finetune'}",
            "split=test",
            "calibrate=true",
            f"hydra.run.dir={root / 'evaluate'}",
            *data_overrides,
        ],
        "report": [
            "-m",
            "liverfusion.report",
            str(root / "finetune"),
            "--names",
            "cgc_frozen_simsiam",
            "--out",
            str(root / "report"),
        ],
    }


def run_step(name: str, args: list[str]) -> float:
    cmd = [sys.executable, *args]
    shown = "python " + " ".join(shlex.quote(c) for c in cmd[1:])
    print(f"\n=== {name}: {shown}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        sys.exit(f"demo step {name!r} failed with exit code {result.returncode}")
    return time.perf_counter() - start


@cli_errors
def main(argv: list[str] | None = None) -> None:
    from liverfusion.utils.help_pages import build_parser  # the parser and its --help page live there

    parser = build_parser("demo")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEP_NAMES]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {list(STEP_NAMES)}")
    root = Path(args.root or Path("logs") / "demo" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    commands = step_commands(root, list(args.overrides))
    timings = {}
    total = time.perf_counter()
    for name in steps:
        timings[name] = run_step(name, commands[name])
    print("\n=== demo finished")
    for name, seconds in timings.items():
        print(f"  {name:<10} {seconds:7.1f} s")
    print(f"  {'total':<10} {time.perf_counter() - total:7.1f} s")
    print(f"  outputs:   {root}")
    encoder = root / "pretrain" / "checkpoints" / "encoder.pt"
    if encoder.is_file():
        print(f"  encoder:   {encoder}")
    for label, path in (
        ("test", root / "evaluate" / "metrics.md"),
        ("report", root / "report" / "results.md"),
    ):
        if path.is_file():
            print(f"  {label + ':':<10} {path}")
    print("  phantom:   data/phantom (LLD-MMRI layout: images/<case>/<Phase>.nii.gz, labels.txt)")


if __name__ == "__main__":
    main()
